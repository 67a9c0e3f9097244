//! The batch loader: shuffles per epoch, augments the samples of a batch in parallel (rayon) and
//! prepares the next batches on a background thread while the model computes.
//!
//! A batch depends only on (seed, epoch, batch index): the order comes from an RNG seeded with
//! (seed, epoch) and each sample's views from an RNG seeded with (seed, epoch, sample index), so a
//! run resumed at batch `b` sees exactly the batches it would have seen.

use std::sync::mpsc;
use std::sync::Arc;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::Split;
use crate::augment::{sample_rng, Augment, ImageBatch};

/// One batch: for each kind of view `v`, `views[v]` stacks that view of every sample.
#[derive(Debug, Clone)]
pub struct Batch {
    pub epoch: u64,
    pub index: usize,
    /// Dataset indices of the samples, in batch order.
    pub samples: Vec<usize>,
    pub labels: Option<Vec<u32>>,
    pub views: Vec<ImageBatch>,
}

#[derive(Clone)]
pub struct Loader {
    split: Split,
    augment: Arc<dyn Augment>,
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// (rank, world size): each batch keeps rows rank, rank + W, ... of the global batch of
    /// `batch_size` (see [`crate::dist`]); (0, 1) keeps all.
    pub shard: (usize, usize),
}

impl Loader {
    /// A shuffling loader that drops the last incomplete batch (what pre-training wants).
    pub fn new(
        split: Split,
        augment: Arc<dyn Augment>,
        batch_size: usize,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        if split.is_empty() {
            bail!("split '{}' has no images", split.name);
        }
        Ok(Loader {
            split,
            augment,
            batch_size,
            shuffle: true,
            drop_last: true,
            seed,
            prefetch: 2,
            shard: (0, 1),
        })
    }

    /// This rank's share of every batch: rows `rank`, `rank + world`, ... (see [`crate::dist`]).
    pub fn sharded(mut self, rank: usize, world: usize) -> Self {
        self.shard = (rank, world);
        self
    }

    /// In dataset order, keeping the last incomplete batch (what evaluation wants).
    pub fn sequential(mut self) -> Self {
        self.shuffle = false;
        self.drop_last = false;
        self
    }

    pub fn split(&self) -> &Split {
        &self.split
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.split.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Fails with a clear message when an epoch would hold no batch; `key` is the recipe key
    /// the batch size comes from (`train.batch_size`).
    pub fn check(&self, key: &str) -> Result<()> {
        if self.batches_per_epoch() == 0 {
            bail!(
                "{key} = {}: more than the {} images of split '{}', and the last partial batch of an epoch is dropped, so an epoch would hold no batch (lower {key} or use more images)",
                self.batch_size,
                self.split.len(),
                self.split.name
            );
        }
        Ok(())
    }

    /// The sample order of `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.split.len()).collect();
        if self.shuffle {
            // Index u64::MAX is never a sample: this stream is the epoch's shuffle alone.
            order.shuffle(&mut sample_rng(self.seed, epoch, u64::MAX));
        }
        order
    }

    /// Batch `index` of `epoch`, its samples augmented in parallel.
    pub fn batch(&self, epoch: u64, index: usize) -> Batch {
        self.batch_of(epoch, index, &self.order(epoch))
    }

    fn batch_of(&self, epoch: u64, index: usize, order: &[usize]) -> Batch {
        let start = index * self.batch_size;
        let (rank, world) = self.shard;
        let samples: Vec<usize> = order[start..(start + self.batch_size).min(order.len())]
            .iter()
            .skip(rank)
            .step_by(world)
            .copied()
            .collect();
        let per_sample: Vec<_> = samples
            .par_iter()
            .map(|&i| {
                self.augment.views(
                    &self.split.images[i],
                    &mut sample_rng(self.seed, epoch, i as u64),
                )
            })
            .collect();
        let num_views = per_sample.first().map_or(0, Vec::len);
        let views = (0..num_views)
            .map(|v| {
                let column: Vec<_> = per_sample.iter().map(|s| &s[v]).collect();
                ImageBatch::stack(&column).expect("an augmentation gives views of the same size")
            })
            .collect();
        let labels = self
            .split
            .labels
            .as_ref()
            .map(|l| samples.iter().map(|&i| l[i]).collect());
        Batch {
            epoch,
            index,
            samples,
            labels,
            views,
        }
    }

    /// The batches of `epoch` from batch `from` on, prepared `prefetch` ahead on another thread.
    pub fn epoch(&self, epoch: u64, from: usize) -> impl Iterator<Item = Batch> {
        let (tx, rx) = mpsc::sync_channel(self.prefetch.max(1));
        let loader = self.clone();
        std::thread::spawn(move || {
            let order = loader.order(epoch);
            for index in from..loader.batches_per_epoch() {
                if tx.send(loader.batch_of(epoch, index, &order)).is_err() {
                    break; // the consumer stopped
                }
            }
        });
        rx.into_iter()
    }
}

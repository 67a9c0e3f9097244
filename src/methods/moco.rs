//! MoCo v1/v2 (He et al. 2020; Chen et al. 2020): a query encoder θq learned by
//! back-propagation, a key encoder θk that only follows it by momentum,
//!
//!   θk ← m·θk + (1−m)·θq,
//!
//! and a FIFO queue of K past keys as negatives. For queries q = g(f(x1)), keys
//! k = g_k(f_k(x2)) (both l2-normalised) the loss is InfoNCE with the positive in column 0:
//!
//!   logits = [q·k₊, q·queue₁, …, q·queue_K] / τ,   L = −log softmax(logits)₀.
//!
//! v1: linear head to 128-d, τ 0.07, m 0.999. v2: 2-layer MLP head, τ 0.2, blur views, cosine lr.
//! The strong CIFAR recipes add a cosine momentum schedule m → 1 and the symmetric loss
//! (both views as queries, both keys enqueued).
//!
//! Shuffle-BN on one device: with one batch-norm batch, a query and its key would share batch
//! statistics that the queue's keys lack, a shortcut that identifies the positive. As MoCo spreads
//! the batch over GPUs and shuffles keys across them, both encoders here normalise in
//! `bn_splits` groups in one pass (the CIFAR demo's `SplitBatchNorm`: image i in group
//! i mod `bn_splits`), and keys are grouped after a random permutation, so a key is normalised
//! with other images than its query.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::dist::{gather_kept, global_batch, local_rows};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, positive};
use crate::losses::{embedding_std, info_nce, l2_normalize};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{
    ema_update, momentum_copy, Backbone, BackboneConfig, OutputNorm, ProjectionHead,
    ProjectionHeadConfig,
};
use crate::train::optim::cosine_ramp;
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MocoConfig {
    /// τ: 0.07 (v1), 0.2 (v2).
    pub temperature: f64,
    /// Base key-encoder momentum m: 0.999 (v1, v2 on ImageNet), 0.99 (solo-learn CIFAR).
    pub momentum: f64,
    /// Momentum at the end of training, reached by a cosine from `momentum` (1.0 in solo-learn;
    /// equal to `momentum` for the constant of the papers).
    pub final_momentum: Option<f64>,
    /// K, the number of negatives kept; any size, not only a multiple of the batch.
    pub queue_size: usize,
    /// Hidden width of the v2 MLP head; 0 gives v1's linear head.
    pub proj_hidden: usize,
    pub proj_dim: usize,
    /// Both views serve as queries (loss averaged over the two directions), both keys enqueued.
    pub symmetric: bool,
    /// Batch-norm groups for shuffle-BN; 1 normalises the whole batch at once (no shuffle).
    pub bn_splits: usize,
}

impl Default for MocoConfig {
    /// MoCo v2.
    fn default() -> Self {
        MocoConfig {
            temperature: 0.2,
            momentum: 0.999,
            final_momentum: None,
            queue_size: 65536,
            proj_hidden: 2048,
            proj_dim: 128,
            symmetric: false,
            bn_splits: 8,
        }
    }
}

impl MocoConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        positive("method.temperature", self.temperature)?;
        for (name, m) in [
            ("momentum", Some(self.momentum)),
            ("final_momentum", self.final_momentum),
        ] {
            if let Some(m) = m.filter(|m| !(0.0..=1.0).contains(m)) {
                anyhow::bail!("method.{name} = {m}: must lie in [0, 1]");
            }
        }
        at_least_one("method.queue_size", self.queue_size)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.bn_splits", self.bn_splits)?;
        feed.views("moco", 2, "a query and a key")?;
        if feed.batch < 2 * self.bn_splits || feed.batch % self.bn_splits != 0 {
            anyhow::bail!(
                "method.bn_splits = {}: the batch is split into groups of equal size, at least 2 images each, and train.batch_size is {}",
                self.bn_splits,
                feed.batch
            );
        }
        if self.bn_splits > 1 && !self.bn_splits.is_multiple_of(feed.world) {
            anyhow::bail!(
                "method.bn_splits = {}: each of the {} ranks of this run normalises its own groups, so the rank count must divide it",
                self.bn_splits,
                feed.world
            );
        }
        Ok(())
    }

    /// Query encoder and head, the key encoder as their copy, a queue of
    /// random unit vectors (as the official code starts it). Draws from burn's generator: call
    /// inside [`init_seeded`](crate::models::init_seeded).
    pub fn init(&self, model: &BackboneConfig, device: &Device) -> Moco {
        let head = match self.proj_hidden {
            0 => ProjectionHeadConfig::linear(model.feature_dim(), self.proj_dim),
            hidden => ProjectionHeadConfig {
                input: model.feature_dim(),
                hidden,
                output: self.proj_dim,
                layers: 2,
                batch_norm: false,
                output_norm: OutputNorm::Off,
            },
        };
        let (backbone, projector) = (model.init(device), head.init(device));
        let queue = l2_normalize(Tensor::random(
            [self.queue_size, self.proj_dim],
            Distribution::Normal(0.0, 1.0),
            device,
        ));
        Moco {
            key_backbone: momentum_copy(model.init(device), &backbone),
            key_head: momentum_copy(head.init(device), &projector),
            backbone,
            head: projector,
            queue: Param::initialized(ParamId::new(), queue).set_require_grad(false),
            temperature: self.temperature,
            momentum: self.momentum,
            final_momentum: self.final_momentum.unwrap_or(self.momentum),
            symmetric: self.symmetric,
            bn_splits: self.bn_splits,
        }
    }
}

impl MethodSpec for MocoConfig {
    type Method = Moco;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("moco_v2_cifar10");
    const ENCODERS: Option<[&'static str; 2]> = Some(["query encoder", "key encoder"]);

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        MocoConfig::check(self, feed)
    }

    fn init(&self, ctx: &InitContext) -> Moco {
        MocoConfig::init(self, ctx.model, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Moco {
    backbone: Backbone,
    head: ProjectionHead,
    key_backbone: Backbone,
    key_head: ProjectionHead,
    /// `[K, d]` unit keys, oldest overwritten first; a parameter without gradient, so that
    /// checkpoints hold it.
    queue: Param<Tensor<2>>,
    temperature: f64,
    momentum: f64,
    final_momentum: f64,
    symmetric: bool,
    bn_splits: usize,
}

impl Moco {
    /// Unit queries of `x`, batch norm per group of images `i ≡ g (mod bn_splits)`.
    pub fn queries(&self, x: Tensor<4>) -> Tensor<2> {
        let features = self.backbone.forward_split_bn(x, self.bn_splits);
        l2_normalize(self.head.forward(features))
    }

    /// Unit keys of `x` (no gradient): images permuted by `shuffle` (a permutation of the
    /// global batch) before the grouped batch norm, the keys put back in the images' order. Over
    /// several ranks, as the official `_batch_shuffle_ddp`: every rank's images gathered,
    /// shuffled, this rank's rows of the shuffled batch encoded, the keys gathered and put back.
    pub fn keys(&self, x: Tensor<4>, shuffle: &[usize]) -> Tensor<2> {
        let [n, c, h, w] = x.dims();
        let global = shuffle.len();
        let device = x.device();
        let index = |v: &[usize]| {
            let v: Vec<i64> = v.iter().map(|&i| i as i64).collect();
            Tensor::<1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), &device)
        };
        let mut unshuffle = vec![0; global];
        for (pos, &i) in shuffle.iter().enumerate() {
            unshuffle[i] = pos;
        }
        let split = global != n;
        let x = match split {
            true => gather_kept(x.detach().reshape([n, c * h * w]), n).reshape([global, c, h, w]),
            false => x.detach(),
        };
        let mut shuffled = x.select(0, index(shuffle));
        if split {
            shuffled = shuffled.select(0, index(&local_rows(global)));
        }
        let features = self.key_backbone.forward_split_bn(shuffled, self.bn_splits);
        let mut k = self.key_head.forward(features);
        if split {
            k = gather_kept(k.detach(), n);
        }
        let mut k = k.select(0, index(&unshuffle));
        if split {
            k = k.select(0, index(&local_rows(global)));
        }
        l2_normalize(k).detach()
    }

    /// `[n, 1 + K]` logits: q·k₊ in column 0, then q against the queue, all over τ.
    pub fn logits(&self, q: Tensor<2>, k: Tensor<2>) -> Tensor<2> {
        let positive = (q.clone() * k).sum_dim(1);
        let negative = q.matmul(self.queue.val().transpose());
        Tensor::cat(vec![positive, negative], 1).div_scalar(self.temperature)
    }

    pub fn queue(&self) -> Tensor<2> {
        self.queue.val()
    }

    fn contrast(&self, q: Tensor<2>, k: Tensor<2>) -> Tensor<1> {
        let [n, _] = q.dims();
        info_nce(self.logits(q, k), &vec![0; n])
    }
}

/// Writes `keys` into the ring buffer `queue` from row `ptr` on, wrapping around (FIFO: the
/// oldest rows are replaced). With more keys than rows, the newest `K` are kept.
pub fn enqueue(queue: Tensor<2>, keys: Tensor<2>, ptr: usize) -> Tensor<2> {
    let [k, d] = queue.dims();
    let [b, _] = keys.dims();
    let (keys, ptr) = if b > k {
        (keys.narrow(0, b - k, k), (ptr + b - k) % k)
    } else {
        (keys, ptr % k)
    };
    let b = keys.dims()[0];
    let first = b.min(k - ptr);
    let queue = queue.slice_assign([ptr..ptr + first, 0..d], keys.clone().narrow(0, 0, first));
    if first < b {
        queue.slice_assign([0..b - first, 0..d], keys.narrow(0, first, b - first))
    } else {
        queue
    }
}

/// The key permutation of step `step`: a function of the step, so a resumed run repeats it.
pub fn shuffle_order(n: usize, step: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(0x6d6f636f ^ step as u64));
    order
}

impl Method for Moco {
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let shuffle = shuffle_order(global_batch(n), progress.step);
        let q1 = self.queries(views[0].clone());
        let k2 = self.keys(views[1].clone(), &shuffle);
        let z_std = embedding_std(q1.clone());
        let (loss, keep) = if self.symmetric {
            let q2 = self.queries(views[1].clone());
            let k1 = self.keys(views[0].clone(), &shuffle);
            let loss = (self.contrast(q1, k2.clone()) + self.contrast(q2, k1.clone())) / 2.0;
            (loss, Tensor::cat(vec![k1, k2], 0))
        } else {
            (self.contrast(q1, k2.clone()), k2)
        };
        StepOutput {
            loss,
            scalars: vec![("z_std", z_std)],
            keep: Some(keep),
        }
    }

    /// The momentum update of the key encoder, then the step's keys into the queue. The queue
    /// position follows from the step count (every step enqueues as many keys), so it needs no
    /// state of its own.
    fn after_step(mut self, keys: Option<Tensor<2>>, progress: &Progress) -> Self {
        let m = cosine_ramp(
            progress.step,
            progress.total_steps,
            self.momentum,
            self.final_momentum,
        );
        self.key_backbone = ema_update(self.key_backbone, &self.backbone, m);
        self.key_head = ema_update(self.key_head, &self.head, m);
        if let Some(keys) = keys {
            let b = keys.dims()[0];
            self.queue = self
                .queue
                .map(|q| enqueue(q, keys, progress.step * b).set_require_grad(false));
        }
        self
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn teacher(&self) -> Option<&Backbone> {
        Some(&self.key_backbone)
    }

    fn start_from(self, weights: Backbone) -> Self {
        Moco {
            key_backbone: momentum_copy(self.key_backbone, &weights),
            backbone: weights,
            ..self
        }
    }
}

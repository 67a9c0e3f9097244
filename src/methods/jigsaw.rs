//! Jigsaw puzzles (Noroozi & Favaro 2016): an image is cut into 3×3 tiles (with gaps and
//! jitter), the tiles are shuffled by one permutation π of a fixed set of P, a shared-weight
//! encoder f embeds each tile, and an MLP on the embeddings concatenated in position order
//! classifies which permutation was used:
//!
//!   L = −log softmax(h([f(t_π(1)), …, f(t_π(9))]))_π.
//!
//! The set holds permutations far apart in Hamming distance (chosen greedily, as in the paper),
//! so that the task cannot be solved from a few tiles.

use std::sync::Arc;

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::augment::pretext::JigsawTiles;
use crate::augment::{Augment, Pipeline};
use crate::losses::{accuracy, cross_entropy};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{Backbone, BackboneConfig, OutputNorm, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

/// Tiles per image: a 3×3 grid.
pub const TILES: usize = 9;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JigsawConfig {
    /// P, the number of permutations (classes): 100 by default, up to 1000.
    pub permutations: usize,
    /// Side of each tile in pixels, cut from a cell of a third of the view's side.
    pub tile: u32,
    /// Hidden width of the MLP on the concatenated tile embeddings.
    pub hidden: usize,
    /// How the permutation set is chosen (see [`permutation_set`]).
    pub selection: Selection,
    /// Per-tile colour jitter: each channel of each tile shifted by a whole number of grey
    /// levels drawn from [−n, n) and clipped to 0..=255, as the PyTorch port of the paper's code
    /// does (`rgb_jittering`, n = 2). After each tile's own normalisation only the clipping of
    /// that shift remains; 0 turns it off.
    pub tile_jitter: u8,
}

/// How [`permutation_set`] chooses, greedily after a random first permutation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// The largest mean Hamming distance to those chosen: Noroozi & Favaro's
    /// `select_permutations.py` (selection `max`).
    #[default]
    MaxMean,
    /// The largest minimum distance: no two permutations closer than 6 of 9 tiles (for 100).
    MaxMin,
}

impl Default for JigsawConfig {
    fn default() -> Self {
        JigsawConfig {
            permutations: 100,
            tile: 9,
            hidden: 1024,
            selection: Selection::MaxMean,
            tile_jitter: 2,
        }
    }
}

impl JigsawConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        feed.views("jigsaw", 1, "it cuts one view of each image into tiles")?;
        let view_size = feed.view_sizes[0];
        // The backbone sees the tiles.
        feed.model.check_input(self.tile, "method.tile")?;
        if !(2..=1000).contains(&self.permutations) {
            anyhow::bail!(
                "method.permutations = {}: must lie in 2..=1000",
                self.permutations
            );
        }
        crate::config::at_least_one("method.hidden", self.hidden)?;
        if self.tile == 0 || self.tile > view_size / 3 {
            anyhow::bail!(
                "method.tile = {}: a tile must fit in a third of the {view_size} px view",
                self.tile
            );
        }
        Ok(())
    }

    pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        Arc::new(JigsawTiles {
            base: Arc::new(base),
            grid: 3,
            tile: self.tile,
            jitter: self.tile_jitter,
        })
    }

    /// The encoder, the MLP, and the permutation set drawn from `seed` (kept in checkpoints).
    pub fn init(&self, model: &BackboneConfig, seed: u64, device: &Device) -> Jigsaw {
        let set = permutation_set(self.permutations, seed, self.selection);
        tracing::info!(
            "jigsaw: {} permutations, minimum Hamming distance {}",
            set.len(),
            min_hamming(&set)
        );
        let flat: Vec<f32> = set.iter().flatten().map(|&t| t as f32).collect();
        let table = Tensor::from_data(TensorData::new(flat, [set.len(), TILES]), device);
        Jigsaw {
            backbone: model.init(device),
            head: ProjectionHeadConfig {
                input: TILES * model.feature_dim(),
                hidden: self.hidden,
                output: self.permutations,
                layers: 2,
                batch_norm: true,
                output_norm: OutputNorm::Off,
            }
            .init(device),
            permutations: Param::initialized(ParamId::new(), table).set_require_grad(false),
        }
    }
}

impl MethodSpec for JigsawConfig {
    type Method = Jigsaw;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("jigsaw_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        JigsawConfig::check(self, feed)
    }

    fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        JigsawConfig::augment(self, base)
    }

    fn init(&self, ctx: &InitContext) -> Jigsaw {
        JigsawConfig::init(self, ctx.model, ctx.seed, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Jigsaw {
    backbone: Backbone,
    head: ProjectionHead,
    /// `[P, 9]`: row p says which tile sits at each position under permutation p.
    permutations: Param<Tensor<2>>,
}

impl Jigsaw {
    pub fn permutations(&self) -> Vec<[u8; TILES]> {
        let v: Vec<f32> = self
            .permutations
            .val()
            .into_data()
            .try_to_vec_as()
            .unwrap_or_default();
        v.chunks(TILES)
            .map(|r| std::array::from_fn(|j| r[j] as u8))
            .collect()
    }

    /// Logits over the permutations for `tiles` (`tiles[t]` is tile t of every image) shuffled
    /// by permutation `labels[i]` for image i.
    pub fn logits(&self, tiles: &[Tensor<4>], labels: &[usize]) -> Tensor<2> {
        let [n, _, _, _] = tiles[0].dims();
        let features = self.backbone.forward(Tensor::cat(tiles.to_vec(), 0));
        let [_, d] = features.dims();
        let set = self.permutations();
        // Row (i, position j) of the puzzle is the embedding of tile π_i(j) of image i.
        let index: Vec<i64> = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &p)| set[p].map(|t| (t as usize * n + i) as i64))
            .collect();
        let index =
            Tensor::<1, Int>::from_data(TensorData::new(index, [n * TILES]), &features.device());
        self.head
            .forward(features.select(0, index).reshape([n, TILES * d]))
    }
}

impl Method for Jigsaw {
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        // The puzzles of a step follow from the step: a resumed run draws the same.
        let mut rng = ChaCha8Rng::seed_from_u64(0x6a6967 ^ progress.step as u64);
        let p = self.permutations.dims()[0];
        // Drawn for the global batch: this rank's rows of it (crate::dist).
        let labels: Vec<usize> = (0..crate::dist::global_batch(n))
            .map(|_| rng.random_range(0..p))
            .collect();
        let labels = crate::dist::local_share(&labels);
        let logits = self.logits(views, &labels);
        let acc = accuracy(logits.clone(), &labels);
        StepOutput::new(cross_entropy(logits, &labels), vec![("pretext_acc", acc)])
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Jigsaw {
            backbone: weights,
            ..self
        }
    }
}

/// Number of positions where two permutations differ.
pub fn hamming(a: &[u8; TILES], b: &[u8; TILES]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// The smallest Hamming distance between two members of `set`.
pub fn min_hamming(set: &[[u8; TILES]]) -> usize {
    let mut min = TILES;
    for (i, a) in set.iter().enumerate() {
        for b in &set[i + 1..] {
            min = min.min(hamming(a, b));
        }
    }
    min
}

/// `count` permutations of the 9 tiles, chosen greedily: a random first one, then each time the
/// permutation farthest from those chosen in Hamming distance, by `selection` (their mean, as
/// Noroozi's `select_permutations.py`, or their minimum), ties broken at random.
pub fn permutation_set(count: usize, seed: u64, selection: Selection) -> Vec<[u8; TILES]> {
    let mut all = Vec::with_capacity(362_880);
    let mut p: [u8; TILES] = std::array::from_fn(|i| i as u8);
    loop {
        all.push(p);
        if !next_permutation(&mut p) {
            break;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    all.shuffle(&mut rng);
    let count = count.min(all.len());
    // Each candidate's distance to the chosen: the sum (the mean, times their count) or the
    // minimum; chosen ones drop out.
    let mut score = vec![
        match selection {
            Selection::MaxMean => 0u32,
            Selection::MaxMin => u32::MAX,
        };
        all.len()
    ];
    let mut taken = vec![false; all.len()];
    let (mut chosen, mut last) = (Vec::with_capacity(count), 0);
    taken[0] = true;
    chosen.push(all[0]);
    while chosen.len() < count {
        for (s, q) in score.iter_mut().zip(&all) {
            let d = hamming(&all[last], q) as u32;
            *s = match selection {
                Selection::MaxMean => *s + d,
                Selection::MaxMin => (*s).min(d),
            };
        }
        // `all` is shuffled: the first farthest is a random one of them.
        last = (0..all.len())
            .filter(|&j| !taken[j])
            .max_by_key(|&j| (score[j], std::cmp::Reverse(j)))
            .unwrap_or(0);
        taken[last] = true;
        chosen.push(all[last]);
    }
    chosen
}

/// Lexicographic successor; false after the last permutation.
fn next_permutation(p: &mut [u8]) -> bool {
    let Some(i) = (1..p.len()).rev().find(|&i| p[i - 1] < p[i]) else {
        return false;
    };
    let j = (i..p.len()).rev().find(|&j| p[j] > p[i - 1]).unwrap_or(i);
    p.swap(i - 1, j);
    p[i..].reverse();
    true
}

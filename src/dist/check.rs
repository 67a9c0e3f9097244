//! Checks that a launch trains as one process: a few steps of a recipe on the current world
//! and, on every rank, the same steps as a lone process over the same global batches; then how
//! far apart they are. `selfsup dist-check` runs it under `mpirun`, `tests/dist.rs` on ranks
//! that are threads.

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use serde::Serialize;

use super::{world, Single};
use crate::config::Recipe;
use crate::data::{Loader, Split};
use crate::methods::{with_method, MethodUser};
use crate::precision::{autocast, LossScale, Precision};
use crate::train::{Method, Progress, Trainer};

/// The largest weight change of the first step compared: its SGD learning rate is this over the
/// first step's largest gradient (when above 1), so that a step stays close to linear in the
/// gradient whatever the loss's scale. These small networks amplify rounding: at 5e-3, SimCLR's
/// loss after 3 SGD steps moves 1e-5 between runs whose first gradients agree to 1e-6, and a
/// lone process moves as much when only its batch-norm kernel changes (fused or composed);
/// Barlow Twins' loss, 20 at the start, moved the weights 1e-3 apart in 3 steps at a fixed 1e-3
/// (1.5e-7 with steps 10 times smaller).
pub const CHECK_LR: f64 = 1e-3;

/// How far a launch is from one process, each relative.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Gaps {
    pub world: usize,
    /// The gap of the first step's mean loss (both sides on the same weights, so only the
    /// rounding of the ranks' sums apart), to one process's loss or to 1, whichever is larger:
    /// a loss that passes near 0 (SimSiam's, a mean of cosines) has no relative error. The later
    /// steps' losses are not compared: SGD amplifies that rounding from step to step (BYOL's
    /// loss moved 1.4e-5 by step 3 on an AVX2 CPU, where its first gradients agreed to 2e-7), and
    /// what they depend on is in `weights`.
    pub loss: f32,
    /// The first step's averaged gradients: the largest gap to the largest gradient (a bias
    /// that batch norm cancels has a true gradient of 0, and one of float noise in any run).
    pub grads: f32,
    /// Every float tensor (parameters, batch-norm statistics, queue, centre) after the last
    /// step: the norm of the gap to the norm of one process's change of them.
    pub weights: f32,
}

impl Gaps {
    /// The most each gap may be in a launch that trains as one process: `loss`, `grads`,
    /// `weights`. The first step's two are float rounding of the ranks' sums. The weights after
    /// a few steps are looser, for ResNets: over seeds 0-13 of the tests' small recipes at 3
    /// ranks (`tests/common`'s `small_recipe`, 48 images, 3 steps, an AVX2 CPU), SwAV's weights
    /// ended 1-2e-6 of their change apart for most seeds and up to 5.1e-4 for some (1.8e-4 with
    /// the gemm tap products instead of the direct convolution), SimCLR's up to 6.7e-5, BYOL's
    /// up to 4.3e-5, in jumps from one step to the next; the ViTs stayed at 2e-8 (DINO) and
    /// 2e-6 (MAE) on every seed. Likely cause: rounding that puts a ReLU's input on the other
    /// side of 0 switches that unit's whole gradient on or off, a step GELU does not have.
    pub const BOUNDS: [f32; 3] = [1e-6, 1e-5, 1e-3];

    /// Whether every gap is within [`Gaps::BOUNDS`].
    pub fn as_one_process(&self) -> bool {
        let [loss, grads, weights] = Self::BOUNDS;
        self.loss < loss && self.grads < grads && self.weights < weights
    }
}

/// What one rank saw: the mean loss of each step, the averaged gradients of the first, and
/// every float tensor of the method before the first step and after the last.
struct Outcome {
    losses: Vec<f32>,
    grads: Vec<f32>,
    start: Vec<f32>,
    weights: Vec<f32>,
}

/// `steps` steps of `recipe` on `split` (SGD, steps of [`CHECK_LR`] at most) on the current world and as a
/// lone process, on every rank; how far apart they are.
///
/// # Errors
/// `steps` is 0, or the ranks ended with different weights or logged different losses.
pub fn compare(recipe: &Recipe, split: &Split, steps: usize) -> Result<Gaps> {
    if steps == 0 {
        bail!("a check needs at least one step (steps = 0)");
    }
    // SGD whatever the recipe's optimiser: every rank runs the optimiser alike on the averaged
    // gradients, and SGD's step is proportional to the gradient, so that rounding stays
    // rounding. AdamW and LARS normalise each step: a gradient that is rounding noise (a bias a
    // normalisation cancels; Adam's first step is sign(g)) becomes a full step in any run.
    let mut recipe = recipe.clone();
    recipe.train.optim.optimizer = crate::train::OptimizerKind::Sgd;
    recipe.train.optim.momentum = 0.9;
    recipe.train.optim.final_weight_decay = None;
    let recipe = &recipe;
    let single = super::with_world(Arc::new(Single), || run(recipe, split, steps))?;
    let mine = run(recipe, split, steps)?;
    let w = world();
    let hash = |v: &[f32]| super::hash_floats(v.iter().copied(), 0xcbf2_9ce4_8422_2325);
    for (what, value) in [("weights", &mine.weights), ("losses", &mine.losses)] {
        let all = w.all_gather_u64(hash(value));
        if let Some(r) = (1..all.len()).find(|&r| all[r] != all[0]) {
            bail!("rank {r}'s {what} differ from rank 0's");
        }
    }
    let (a, b) = (mine.losses[0], single.losses[0]);
    let loss = (a - b).abs() / b.abs().max(1.0);
    let norm = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let change = norm(&single.weights, &single.start);
    Ok(Gaps {
        world: w.size(),
        loss,
        grads: relative_gap(&mine.grads, &single.grads),
        weights: (norm(&mine.weights, &single.weights) / change) as f32,
    })
}

/// The largest difference of `a` and `b`, relative to the largest magnitude of `b`.
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `steps` steps of `recipe` on this rank's rows of the first global batches of `split`.
fn run(recipe: &Recipe, split: &Split, steps: usize) -> Result<Outcome> {
    let (rank, size) = super::rank_size();
    let augment = recipe.method.augment(recipe.augment.build()?);
    let loader = Loader::new(split.clone(), augment, recipe.train.batch_size, recipe.seed)?
        .sharded(rank, size);
    if loader.batches_per_epoch() < steps {
        bail!(
            "{steps} steps of train.batch_size = {} need {} images; the split has {}",
            recipe.train.batch_size,
            steps * recipe.train.batch_size,
            split.len()
        );
    }
    let device = Device::flex().autodiff();
    with_method(
        recipe,
        None,
        &device,
        Steps {
            recipe,
            loader,
            steps,
            device: device.clone(),
        },
    )
}

struct Steps<'a> {
    recipe: &'a Recipe,
    loader: Loader,
    steps: usize,
    device: Device,
}

impl MethodUser<Result<Outcome>> for Steps<'_> {
    fn call<M: Method>(self, mut method: M) -> Result<Outcome> {
        let train = &self.recipe.train;
        let trainer = Trainer::new(train.clone(), std::env::temp_dir(), self.device.clone());
        let (mut optim, mut aux) = (train.optim.init(), train.optim.init());
        let n = train.batch_size / world().size();
        let mut outcome = Outcome {
            losses: vec![],
            grads: vec![],
            start: flat_weights(&method)?,
            weights: vec![],
        };
        let mut lr = CHECK_LR;
        // In the recipe's precision: f16's loss scaled as the trainer scales it.
        let mut scale = (train.precision == Precision::F16)
            .then(|| LossScale::new(train.loss_scale.unwrap_or(LossScale::INITIAL)));
        for step in 0..self.steps {
            let batch = self.loader.batch(0, step);
            let views: Vec<Tensor<4>> = batch
                .views
                .iter()
                .map(|v| v.to_tensor(&self.device))
                .collect();
            let progress = Progress {
                epoch: 0,
                step,
                total_steps: 10 * self.steps,
                steps_per_epoch: 10 * self.steps,
            };
            let out = autocast(train.precision, || method.loss(&views, &progress));
            let mut loss = out.loss.clone().try_into_vec_as::<f32>()?;
            super::mean_over_ranks(&mut loss);
            outcome.losses.push(loss[0]);
            let factor = scale.map_or(1.0, |s| s.scale);
            let grads = GradientsParams::from_grads((out.loss * factor).backward(), &method);
            let grads = super::average_gradients(grads, &method);
            if step == 0 {
                let unscale = |g: f32| g / factor as f32;
                outcome.grads = flat_grads(&grads, &method)?
                    .into_iter()
                    .map(unscale)
                    .collect();
                let largest = outcome.grads.iter().fold(1f32, |m, g| m.max(g.abs()));
                lr = CHECK_LR / largest as f64;
            }
            method = trainer.step(
                method,
                &mut optim,
                &mut aux,
                grads,
                scale.as_mut(),
                out.keep,
                n,
                lr,
                &progress,
            )?;
        }
        outcome.weights = flat_weights(&method)?;
        Ok(outcome)
    }
}

/// Every float tensor of `module`, in its order.
pub fn flat_weights<M: Module>(module: &M) -> Result<Vec<f32>> {
    struct Flat(Vec<Tensor<1>>);
    impl ModuleVisitor for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().flatten(0, D - 1));
        }
    }
    let mut flat = Flat(vec![]);
    module.visit(&mut flat);
    Ok(Tensor::cat(flat.0, 0).try_into_vec_as::<f32>()?)
}

/// The gradients of `module`'s parameters, in its order.
fn flat_grads<M: Module>(grads: &GradientsParams, module: &M) -> Result<Vec<f32>> {
    struct Flat<'a>(&'a GradientsParams, Vec<Tensor<1>>);
    impl ModuleVisitor for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1.push(g.flatten(0, D - 1));
            }
        }
    }
    let mut flat = Flat(grads, vec![]);
    module.visit(&mut flat);
    Ok(Tensor::cat(flat.1, 0).try_into_vec_as::<f32>()?)
}

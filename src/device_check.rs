//! `selfsup check-device`: does a device train as the CPU does, and how fast? Made for a GPU
//! machine that has the driver but no Rust toolchain (the built binary is carried there;
//! `scripts/gpu-check.sh` runs every case and samples the GPU's memory beside it).
//!
//! - `parity`: a few training steps of SimCLR (ResNet-18, LARS) and of DINO (ViT, multi-crop,
//!   EMA teacher) from the same initial weights (drawn on the CPU, then moved) on the same
//!   batches, on the CPU and on the device. Training amplifies rounding from step to step, and
//!   a GPU rounds differently (burn's CUDA matmul and convolution autotune may pick TF32 tensor
//!   cores for f32, as PyTorch's cuDNN does by default): so each step's loss must agree within
//!   [`tolerance`] of the CPU's: 1e-3 (relative), or ten times the most that rounding the
//!   initial weights to TF32 has moved the CPU's own loss by that step, whichever is larger.
//! - `simclr`: SimCLR ResNet-18 (full width, CIFAR stem) at batch 256 on 32 px images;
//! - `dino`: DINO ViT-S/16 with 2 global crops at 224 px and 8 local at 96 px, batch 64;
//!   both in the `--precision` given (`train.precision`), reporting the timed epoch's mean loss
//!   beside the throughput, so that a bf16 run can be set beside the f32 one.
//!
//! Throughput is the whole training loop (augmentation on the CPU threads, the step on the
//! device), timed over one epoch of `steps` batches after a warm-up epoch (kernel compilation,
//! autotuning), on synthetic images (uniform noise, so that no dataset has to travel).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use burn::module::{ModuleMapper, Param};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::Recipe;
use crate::data::{Loader, Split};
use crate::methods::{with_method, MethodUser};
use crate::models::{BackboneConfig, VitConfig};
use crate::precision::Precision;
use crate::train::{Method, Trainer};

/// One case's outcome, printed as a JSON line.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// `parity/simclr`, `parity/dino`, `simclr` or `dino`.
    pub case: String,
    /// The device as named on the command line.
    pub device: String,
    /// Per step: (CPU loss, device loss), for `parity`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub losses: Vec<(f32, f32)>,
    /// Largest |a − b| / max(|a|, 1e-6) over the steps, for `parity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_diff: Option<f32>,
    /// Per step: the largest relative change, up to that step, of the CPU's loss when its
    /// initial weights are rounded to TF32 (the CPU's own sensitivity to rounding), for `parity`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounding_spread: Vec<f32>,
    /// Training throughput, for `simclr` and `dino`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub images_per_s: Option<f64>,
    /// `train.precision` of a throughput case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<&'static str>,
    /// The mean loss of the timed epoch, for `simclr` and `dino`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_loss: Option<f32>,
    /// Parity held (always true for a throughput case that ran).
    pub ok: bool,
}

/// Runs `case` (`parity`, `simclr` or `dino`) on `device`, `steps` batches (each parity run,
/// or the timed epoch; a throughput case in `precision`, parity always in f32), and hands each
/// outcome to `emit` as soon as it is known (a parity case gives two, so that a time limit keeps
/// the first).
pub fn run(
    case: &str,
    device_name: &str,
    device: &Device,
    steps: usize,
    precision: Precision,
    mut emit: impl FnMut(Outcome) -> Result<()>,
) -> Result<()> {
    let cpu = Device::flex();
    match case {
        "parity" => {
            for name in ["simclr", "dino"] {
                let recipe = parity_recipe(name)?;
                let split = noise(recipe.train.batch_size * steps, 32, 1);
                let reference = losses(&recipe, &split, &cpu, 1, false)?.0;
                let rounded = losses(&recipe, &split, &cpu, 1, true)?.0;
                let theirs = losses(&recipe, &split, device, 1, false)?.0;
                if reference.is_empty() || reference.len() != theirs.len() {
                    bail!(
                        "parity/{name}: {} steps on the CPU, {} on {device_name}",
                        reference.len(),
                        theirs.len()
                    );
                }
                let relative = |a: &[f32], b: &[f32]| -> Vec<f32> {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-6))
                        .collect()
                };
                let diff = relative(&reference, &theirs);
                // The rounded run drifts away from the reference step by step; one step's loss
                // reads that drift noisily (it may cross back), so a step's spread is the
                // largest up to it.
                let spread: Vec<f32> = relative(&reference, &rounded)
                    .into_iter()
                    .scan(0.0f32, |max, s| {
                        *max = max.max(s);
                        Some(*max)
                    })
                    .collect();
                emit(Outcome {
                    case: format!("parity/{name}"),
                    device: device_name.into(),
                    losses: reference.into_iter().zip(theirs).collect(),
                    max_rel_diff: Some(diff.iter().copied().fold(0.0, f32::max)),
                    ok: diff.iter().zip(&spread).all(|(&d, &s)| d <= tolerance(s)),
                    rounding_spread: spread,
                    images_per_s: None,
                    precision: None,
                    mean_loss: None,
                })?;
            }
            Ok(())
        }
        "simclr" | "dino" => {
            let (mut recipe, side) = throughput_recipe(case)?;
            recipe.train.precision = precision;
            let split = noise(recipe.train.batch_size * steps, side, 2);
            let (losses, rate) = losses(&recipe, &split, device, 2, false)?;
            let timed = &losses[losses.len().saturating_sub(steps)..];
            emit(Outcome {
                case: case.into(),
                device: device_name.into(),
                losses: vec![],
                max_rel_diff: None,
                rounding_spread: vec![],
                images_per_s: Some(rate),
                precision: Some(precision.name()),
                mean_loss: Some(timed.iter().sum::<f32>() / timed.len().max(1) as f32),
                ok: true,
            })
        }
        other => bail!("unknown case '{other}' (parity, simclr, dino)"),
    }
}

/// The largest relative loss difference a device may show at a step where rounding the initial
/// weights to TF32 moved the CPU's own loss by `spread` (relative): 1e-3, or 10 × `spread` where
/// the recipe amplifies rounding more than that. A wrong kernel (a missing term, a wrong
/// gradient) moves the loss by far more than rounding does.
pub fn tolerance(spread: f32) -> f32 {
    (10.0 * spread).max(1e-3)
}

/// `x` rounded to the nearest TF32 value (10 explicit mantissa bits, f32's exponent range; ties
/// to even), the precision at which a TF32 tensor-core kernel reads f32 operands.
pub fn round_to_tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let bits = x.to_bits();
    // Round half to even on the 13 dropped bits.
    let half = 0x0fff + ((bits >> 13) & 1);
    f32::from_bits(bits.wrapping_add(half) & !0x1fff)
}

/// Small versions of the published recipes, for parity: SimCLR ResNet-18 at batch 16; DINO with a
/// 2-block ViT, 2 global + 2 local crops, batch 8.
fn parity_recipe(name: &str) -> Result<Recipe> {
    let mut recipe = Recipe::defaults(name)?;
    if name == "dino" {
        recipe.model = BackboneConfig::Vit(VitConfig {
            depth: 2,
            ..VitConfig::preset("tiny", 32, 4)?
        });
        recipe.augment.local_crops = Some(2);
        recipe.train.batch_size = 8;
    } else {
        recipe.train.batch_size = 16;
    }
    recipe.check()?;
    Ok(recipe)
}

/// The benchmark recipes and their image side: SimCLR ResNet-18 b256 at 32 px; DINO ViT-S/16
/// with the official ImageNet head (65,536 prototypes), 224 / 96 px crops (2 + 8), b64.
fn throughput_recipe(name: &str) -> Result<(Recipe, u32)> {
    let mut recipe = Recipe::defaults(name)?;
    let side = if name == "dino" {
        recipe.model = BackboneConfig::Vit(VitConfig::preset("small", 224, 16)?);
        if let crate::methods::MethodConfig::Dino(c) = &mut recipe.method {
            c.out_dim = 65536;
        }
        recipe.augment.size = 224;
        recipe.augment.local_size = Some(96);
        recipe.augment.local_crops = Some(8);
        recipe.augment.blur = true; // ImageNet DINO blurs; the CIFAR recipe does not
        recipe.train.batch_size = 64;
        256
    } else {
        recipe.train.batch_size = 256;
        32
    };
    recipe.check()?;
    Ok((recipe, side))
}

/// `n` images of uniform noise, `side` px square, from `seed`.
fn noise(n: usize, side: u32, seed: u64) -> Split {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let images = (0..n)
        .map(|_| RgbImage::from_fn(side, side, |_, _| image::Rgb(rng.random())))
        .collect();
    Split::new("train", images, None)
}

/// Trains `recipe` on `split` for `epochs` epochs on `device`, from weights drawn on the CPU
/// (rounded to TF32 if `tf32_weights`): every step's loss, and the images a second of the last
/// epoch (as the trainer logs it).
fn losses(
    recipe: &Recipe,
    split: &Split,
    device: &Device,
    epochs: usize,
    tf32_weights: bool,
) -> Result<(Vec<f32>, f64)> {
    let out = scratch()?;
    let loader = Loader::new(
        split.clone(),
        recipe.method.augment(recipe.augment.build()?),
        recipe.train.batch_size,
        recipe.seed,
    )?;
    let mut config = recipe.train.clone();
    config.epochs = epochs;
    (config.warmup_epochs, config.warmup_fraction) = (0.0, None);
    // One checkpoint, at the end (DINO ViT-S's is about a gigabyte).
    config.checkpoint_every = epochs;
    let mut trainer = Trainer::new(config, &out, device.clone().autodiff());
    trainer.progress = false;
    // Drawn on the CPU (burn's generators differ between devices), then moved.
    struct Steps<'a> {
        trainer: &'a Trainer<'a>,
        loader: &'a Loader,
        tf32_weights: bool,
    }
    impl MethodUser<Result<Vec<f32>>> for Steps<'_> {
        fn call<M: Method>(self, method: M) -> Result<Vec<f32>> {
            let method = match self.tf32_weights {
                true => method.map(&mut Tf32Weights),
                false => method,
            };
            let method = crate::models::to_device(method, &self.trainer.device);
            let epochs = self.trainer.config.epochs;
            let (_, report) = self.trainer.run_until(method, self.loader, epochs)?;
            Ok(report.step_losses)
        }
    }
    let result = with_method(
        recipe,
        None,
        &Device::flex(),
        Steps {
            trainer: &trainer,
            loader: &loader,
            tf32_weights,
        },
    )
    .and_then(|losses| Ok((losses, last_epoch_rate(&out)?)));
    let _ = std::fs::remove_dir_all(&out);
    result
}

/// Rounds every float parameter to TF32 ([`round_to_tf32`]).
struct Tf32Weights;

impl ModuleMapper for Tf32Weights {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let device = t.device();
            let shape = t.shape();
            let values: Vec<f32> = t.into_data().iter::<f32>().map(round_to_tf32).collect();
            Tensor::from_data(TensorData::new(values, shape), &device)
        })
    }
}

/// `img_per_s` of the last epoch line of a run's metrics.jsonl.
fn last_epoch_rate(out: &std::path::Path) -> Result<f64> {
    crate::train::metrics::read(&out.join(crate::train::metrics::FILE))?
        .into_iter()
        .filter(|v| v["kind"] == "epoch")
        .filter_map(|v| v["img_per_s"].as_f64())
        .last()
        .context("the run logged no epoch")
}

/// A fresh folder for a check's run files.
fn scratch() -> Result<PathBuf> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("selfsup-check-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

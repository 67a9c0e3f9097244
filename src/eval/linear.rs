//! Linear evaluation: a linear classifier trained on a frozen encoder's features.
//!
//! - [`linear_eval`], the papers' protocol: the classifier learns from random-resized crops and
//!   flips of the labelled images, through the frozen encoder (batch norm in evaluation mode),
//!   with SGD or LARS. Each method's published recipe sets the settings of
//!   its official code (`[linear_eval]`): DINO `eval_linear.py` (SGD 0.001 × b/256, 100 epochs,
//!   a ViT's class tokens of its last 4 blocks), MAE `main_linprobe.py` (LARS 0.1 × b/256, 90
//!   epochs with 10 of warm-up, batch norm without affine parameters before the classifier),
//!   MoCo `main_lincls.py` (SGD 30, 100 epochs, × 0.1 at epochs 60 and 80), SimCLR (SGD
//!   0.1 × b/256, 90 epochs). The classifier starts from N(0, 0.01) with a zero bias, as all of
//!   them. Each has its own lr schedule ([`LinearSchedule`]).
//! - [`linear_probe`], the quick check: AdamW on fixed, standardised centre-crop features,
//!   extracted once; minutes instead of hours on a CPU, and not what the papers report.

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::optim::AdamWConfig;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::supervised::Supervised;
use super::{accuracy, classifier_head, Accuracy, EvalConfig, Features};
use crate::augment::{sample_rng, Pipeline};
use crate::config::{at_least_one, not_negative, positive};
use crate::data::{Batch, Loader, Split};
use crate::kernels::batch_norm;
use crate::losses::cross_entropy;
use crate::models::{init_seeded, Backbone};
use crate::train::optim::{warmup_cosine, OptimConfig, OptimizerKind};

/// `[linear_eval]` of a recipe: the papers' linear evaluation ([`linear_eval`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinearEvalConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// `sgd` (momentum 0.9) or `lars`.
    pub optimizer: OptimizerKind,
    /// Peak lr = base_lr × batch / 256, after `warmup_epochs` of linear warm-up.
    pub base_lr: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// How the lr falls from its peak (each official code's own).
    pub schedule: LinearSchedule,
    /// Epochs from which the `step` schedule multiplies the lr by 0.1 each (MoCo's
    /// `--schedule 60 80`; absolute epochs, as there).
    pub milestones: Vec<usize>,
    /// A ViT's features: the class tokens of its last `last_blocks` blocks, each through the
    /// final norm, concatenated (DINO's ViT-S/16: 4; MAE: 1, the class token). A ResNet's are
    /// its pooled features.
    pub last_blocks: usize,
    /// A ResNet's features: the pooled output of this stage (1-4; 4 the encoder's own).
    /// RotNet finds an intermediate block's features best for its rotation pretext.
    pub stage: usize,
    /// Batch norm without affine parameters before the classifier (MAE's linear probe).
    pub batch_norm: bool,
    /// Labelled training images used (0: all), drawn per class by
    /// [`crate::pretrain::linear_eval_accuracy`] before it calls [`linear_eval`].
    pub train_limit: usize,
}

impl Default for LinearEvalConfig {
    /// SimCLR's: SGD 0.1 × b/256, no weight decay, 90 epochs, pooled features.
    fn default() -> Self {
        LinearEvalConfig {
            epochs: 90,
            batch_size: 256,
            optimizer: OptimizerKind::Sgd,
            base_lr: 0.1,
            weight_decay: 0.0,
            warmup_epochs: 0.0,
            schedule: LinearSchedule::Cosine,
            milestones: vec![60, 80],
            last_blocks: 1,
            stage: 4,
            batch_norm: false,
            train_limit: 0,
        }
    }
}

/// The lr schedules of the official linear evaluations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearSchedule {
    /// A cosine to 0 over the steps after the warm-up (SimCLR; MAE's `main_linprobe.py`).
    Cosine,
    /// A cosine to 0 stepped once an epoch (DINO's `eval_linear.py`: `CosineAnnealingLR`).
    EpochCosine,
    /// × 0.1 from each of `milestones` (MoCo's `main_lincls.py` without `--cos`).
    Step,
}

impl LinearEvalConfig {
    /// The lr of `step` (0-based, in `epoch`), with `steps_per_epoch` steps an epoch, for a
    /// batch of `batch_size`.
    pub fn lr(&self, step: usize, epoch: usize, steps_per_epoch: usize) -> f64 {
        let peak = self.base_lr * self.batch_size as f64 / 256.0;
        let warmup = (self.warmup_epochs * steps_per_epoch as f64).round() as usize;
        if step < warmup {
            return peak * (step + 1) as f64 / warmup as f64;
        }
        match self.schedule {
            LinearSchedule::Cosine => {
                warmup_cosine(step, warmup, steps_per_epoch * self.epochs, peak, 0.0)
            }
            LinearSchedule::EpochCosine => {
                let t = epoch as f64 / self.epochs as f64;
                peak * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            LinearSchedule::Step => {
                let passed = self.milestones.iter().filter(|&&m| epoch >= m).count();
                peak * 0.1f64.powi(passed as i32)
            }
        }
    }

    /// Checks every value of `[linear_eval]`; the error names the key.
    pub fn check(&self) -> Result<()> {
        at_least_one("linear_eval.epochs", self.epochs)?;
        at_least_one("linear_eval.batch_size", self.batch_size)?;
        at_least_one("linear_eval.last_blocks", self.last_blocks)?;
        if !(1..=4).contains(&self.stage) {
            bail!(
                "linear_eval.stage = {}: a ResNet has stages 1 to 4",
                self.stage
            );
        }
        if self.optimizer == OptimizerKind::Adamw {
            bail!("linear_eval.optimizer = \"adamw\": the papers' protocol is sgd or lars (AdamW on fixed features is `selfsup eval linear --quick`)");
        }
        positive("linear_eval.base_lr", self.base_lr)?;
        not_negative("linear_eval.weight_decay", self.weight_decay)?;
        not_negative("linear_eval.warmup_epochs", self.warmup_epochs)
    }

    /// The protocol in words, printed beside its result.
    pub fn describe(&self, backbone: &Backbone) -> String {
        let optimizer = match self.optimizer {
            OptimizerKind::Lars => "LARS",
            _ => "SGD",
        };
        let features = match backbone {
            Backbone::Vit(_) if self.last_blocks > 1 => {
                format!("class tokens of the last {} blocks", self.last_blocks)
            }
            Backbone::Vit(_) => "the class token".into(),
            Backbone::ResNet(_) if self.stage < 4 => {
                format!("pooled stage-{} features", self.stage)
            }
            Backbone::ResNet(_) => "pooled features".into(),
        };
        let warmup = match self.warmup_epochs > 0.0 {
            true => format!(", {} of warm-up", self.warmup_epochs),
            false => String::new(),
        };
        let norm = if self.batch_norm {
            " through batch norm without affine"
        } else {
            ""
        };
        let schedule = match self.schedule {
            LinearSchedule::Cosine => "cosine".to_string(),
            LinearSchedule::EpochCosine => "cosine by epoch".to_string(),
            LinearSchedule::Step => format!("x0.1 at epochs {:?}", self.milestones),
        };
        format!(
            "linear eval ({optimizer} lr {} x batch {}/256, {schedule}, wd {}, {} epochs{warmup} on random-resized crops and flips; {features}{norm})",
            self.base_lr, self.batch_size, self.weight_decay, self.epochs
        )
    }
}

/// The classifier of [`linear_eval`]: optional batch norm without affine parameters, then one
/// linear layer.
#[derive(Module, Debug)]
struct ProbeHead {
    norm: Option<BatchNorm>,
    linear: Linear,
}

impl ProbeHead {
    fn new(dim: usize, classes: usize, batch_norm: bool, device: &Device) -> ProbeHead {
        // DINO, MAE, MoCo: weight N(0, 0.01), bias 0.
        let linear = classifier_head(dim, classes, 0.01, device);
        // PyTorch's BatchNorm1d(affine=False, eps=1e-6): γ = 1 and β = 0, never trained.
        let norm = batch_norm.then(|| {
            let bn = BatchNormConfig::new(dim).with_epsilon(1e-6).init(device);
            BatchNorm {
                gamma: bn.gamma.clone().set_require_grad(false),
                beta: bn.beta.clone().set_require_grad(false),
                ..bn
            }
        });
        ProbeHead { norm, linear }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = match &self.norm {
            Some(bn) => batch_norm(bn, x),
            None => x,
        };
        self.linear.forward(x)
    }
}

/// The features [`linear_eval`] classifies, `[n, d]`: see [`LinearEvalConfig::last_blocks`]
/// and [`LinearEvalConfig::stage`].
pub fn probe_features(backbone: &Backbone, x: Tensor<4>, config: &LinearEvalConfig) -> Tensor<2> {
    match backbone {
        Backbone::Vit(v) => v.last_blocks_cls(x, config.last_blocks),
        Backbone::ResNet(r) => r.stage_features(x, config.stage),
    }
}

/// Trains a linear classifier on `backbone`'s frozen features of `train` (views from `augment`:
/// random-resized crops and flips) with `config`, and measures it on `test` (views from `eval`).
#[allow(clippy::too_many_arguments)]
pub fn linear_eval(
    backbone: &Backbone,
    train: &Split,
    test: &Split,
    classes: usize,
    augment: &Pipeline,
    eval: &Pipeline,
    config: &LinearEvalConfig,
    device: &Device,
) -> Result<Accuracy> {
    config.check()?;
    if train.labels.is_none() {
        bail!(
            "split '{}' has no labels to train a classifier on",
            train.name
        );
    }
    let frozen = backbone.valid().to_device(device);
    // Each rank classifies its rows of every batch (the features and the head's batch norm
    // see no other randomness than the loader's, which is per image).
    crate::dist::check_batch("linear_eval.batch_size", config.batch_size)?;
    let (rank, world) = crate::dist::rank_size();
    let loader = Loader::new(
        train.clone(),
        Arc::new(augment.clone()),
        config.batch_size,
        0,
    )?
    .sharded(rank, world);
    loader.check("linear_eval.batch_size")?;
    let ad = device.clone().autodiff();
    let side = augment.views[0].size as usize;
    let dim = probe_features(&frozen, Tensor::zeros([1, 3, side, side], device), config).dims()[1];
    let mut head = ProbeHead::new(dim, classes, config.batch_norm, &ad);
    let mut optim = OptimConfig {
        optimizer: config.optimizer,
        weight_decay: config.weight_decay,
        momentum: 0.9,
        ..OptimConfig::default()
    }
    .init();
    let steps_per_epoch = loader.batches_per_epoch();
    let hint = " (lower linear_eval.base_lr)";
    let mut run = Supervised::new("linear eval", hint, config.epochs, steps_per_epoch);
    for epoch in 0..config.epochs {
        let batches = loader.epoch(epoch as u64, 0);
        let loss = |head: &ProbeHead, batch: Batch| {
            let labels = batch.labels.unwrap_or_default();
            let labels: Vec<usize> = labels.iter().map(|&c| c as usize).collect();
            let features = probe_features(&frozen, batch.views[0].to_tensor(device), config);
            let features = Tensor::<2>::from_data(features.into_data(), &ad);
            Ok(cross_entropy(head.forward(features), &labels))
        };
        let lr = |step| config.lr(step, epoch, steps_per_epoch);
        head = run.epoch(epoch, head, batches, &mut optim, loss, lr)?;
    }
    drop(run);
    let head = head.valid();
    super::classify(test, eval, config.batch_size, device, &frozen, |b, x| {
        head.forward(probe_features(b, x, config))
    })
}

/// A linear classifier on frozen features (standardised with the training statistics), trained
/// with AdamW and cross-entropy for `epochs` passes over shuffled mini-batches: the quick check.
pub fn linear_probe(
    train: &Features,
    test: &Features,
    classes: usize,
    config: &EvalConfig,
    device: &Device,
) -> Result<Accuracy> {
    super::finite_rows(train.rows(), "the probe's training features")?;
    super::finite_rows(test.rows(), "the probe's test features")?;
    let d = train.dim;
    let mean: Vec<f32> = (0..d)
        .map(|j| train.data.iter().skip(j).step_by(d).sum::<f32>() / train.len() as f32)
        .collect();
    let std: Vec<f32> = (0..d)
        .map(|j| {
            (train
                .data
                .iter()
                .skip(j)
                .step_by(d)
                .map(|v| (v - mean[j]).powi(2))
                .sum::<f32>()
                / train.len() as f32)
                .sqrt()
                .max(1e-6)
        })
        .collect();
    let standardise = |f: &Features| -> Vec<f32> {
        f.data
            .iter()
            .enumerate()
            .map(|(i, v)| (v - mean[i % d]) / std[i % d])
            .collect()
    };
    let (xtr, xte) = (standardise(train), standardise(test));
    let ad = device.clone().autodiff();
    let mut model = init_seeded(&ad, 0, || LinearConfig::new(d, classes).init(&ad));
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let steps_per_epoch = train.len().div_ceil(config.batch_size);
    let epochs = config.linear_epochs;
    let mut run = Supervised::new("linear probe", "", epochs, steps_per_epoch);
    for epoch in 0..epochs {
        order.shuffle(&mut sample_rng(0, epoch as u64, u64::MAX));
        let lr = warmup_cosine(epoch, 0, epochs, config.linear_lr, 0.0);
        let loss = |model: &Linear, chunk: &[usize]| {
            let x: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| xtr[i * d..(i + 1) * d].iter().copied())
                .collect();
            let targets: Vec<usize> = chunk.iter().map(|&i| train.labels[i] as usize).collect();
            let x = Tensor::<2>::from_data(TensorData::new(x, [chunk.len(), d]), &ad);
            Ok(cross_entropy(model.forward(x), &targets))
        };
        let batches = order.chunks(config.batch_size);
        model = run.epoch(epoch, model, batches, &mut optim, loss, |_| lr)?;
    }
    drop(run);
    let model = model.valid();
    let logits = model.forward(Tensor::<2>::from_data(
        TensorData::new(xte, [test.len(), d]),
        device,
    ));
    let logits: Vec<f32> = logits
        .into_data()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let scores: Vec<Vec<f32>> = logits.chunks(classes).map(<[f32]>::to_vec).collect();
    accuracy(&scores, &test.labels)
}

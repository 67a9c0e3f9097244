//! Fine-tuning: the whole encoder and a linear classifier trained on labels (AdamW, warm-up +
//! cosine), with layer-wise learning-rate decay for ViTs as in MAE and BEiT: block i of a
//! depth-d ViT learns at lr·decay^(d − i), the embeddings at lr·decay^(d + 1), the head at lr.
//! As MAE's `main_finetune.py`: views of random-resized crops, flips and RandAugment
//! `rand-m9-mstd0.5-inc1` ([`crate::augment::randaugment`]), random erasing 0.25, mixup 0.8 /
//! CutMix 1.0 ([`crate::augment::mix`]), stochastic depth in the ViT (`drop_path`, 0.1), label
//! smoothing (0.1), the head's weights from N(0, (2e-5)²) with a zero bias, no weight decay on
//! biases, norms, the class token and position embeddings, and a mean-pooling ViT classified
//! through a fresh fc_norm of its mean token ([`crate::models::Vit::mean_patch_token`]). The
//! same call on a randomly initialised encoder is the from-scratch baseline.

use anyhow::{bail, Result};
use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::module::Module;
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::supervised::Supervised;
use super::{classifier_head, Accuracy};
use crate::augment::mix::{random_erase, smoothed_targets, Mix};
use crate::augment::randaugment::RandAugment;
use crate::augment::Pipeline;
use crate::config::{at_least_one, fraction, not_negative, positive, probability};
use crate::data::{Batch, Loader, Split};
use crate::kernels::layer_norm;
use crate::losses::{cross_entropy_smoothed, soft_cross_entropy};
use crate::models::{Backbone, Pool, LAYER_NORM_EPS};
use crate::train::optim::{warmup_cosine, OptimConfig, OptimizerKind};

/// `[finetune]` of a recipe (MAE's fine-tuning recipe, scaled down by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak lr = base_lr × batch / 256.
    pub base_lr: f64,
    pub layer_decay: f64,
    pub weight_decay: f64,
    pub warmup_epochs: f64,
    /// Labelled training images used (0: all), drawn per class by
    /// [`crate::pretrain::finetune_accuracy`] before it calls [`finetune`].
    pub train_limit: usize,
    /// Stochastic depth rate of a ViT's blocks (MAE: 0.1 for ViT-B); a ResNet has none.
    pub drop_path: f64,
    /// Label smoothing ε of the cross-entropy (MAE: 0.1).
    pub label_smoothing: f64,
    /// Mixup's Beta(α, α) (MAE: 0.8; 0: off).
    pub mixup: f64,
    /// CutMix's Beta(α, α) (MAE: 1.0; 0: off).
    pub cutmix: f64,
    /// With both on, the probability that a batch takes CutMix rather than mixup (0.5).
    pub mixup_switch_prob: f64,
    /// Probability of random erasing per image (MAE: 0.25).
    pub random_erasing: f64,
    /// RandAugment of the fine-tuning views (MAE: `rand-m9-mstd0.5-inc1`, n 2).
    pub rand_augment: RandAugment,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 100,
            batch_size: 256,
            base_lr: 1e-3,
            layer_decay: 0.75,
            weight_decay: 0.05,
            warmup_epochs: 5.0,
            train_limit: 0,
            drop_path: 0.1,
            label_smoothing: 0.1,
            mixup: 0.8,
            cutmix: 1.0,
            mixup_switch_prob: 0.5,
            random_erasing: 0.25,
            rand_augment: RandAugment {
                n: 2,
                ..RandAugment::default()
            },
        }
    }
}

impl FinetuneConfig {
    /// Checks every value of `[finetune]`; the error names the key.
    pub fn check(&self) -> Result<()> {
        at_least_one("finetune.epochs", self.epochs)?;
        at_least_one("finetune.batch_size", self.batch_size)?;
        positive("finetune.base_lr", self.base_lr)?;
        positive("finetune.layer_decay", self.layer_decay)?;
        not_negative("finetune.weight_decay", self.weight_decay)?;
        not_negative("finetune.warmup_epochs", self.warmup_epochs)?;
        fraction("finetune.drop_path", self.drop_path)?;
        fraction("finetune.label_smoothing", self.label_smoothing)?;
        not_negative("finetune.mixup", self.mixup)?;
        not_negative("finetune.cutmix", self.cutmix)?;
        probability("finetune.mixup_switch_prob", self.mixup_switch_prob)?;
        probability("finetune.random_erasing", self.random_erasing)?;
        self.rand_augment.check("finetune.rand_augment")
    }
}

#[derive(Module, Debug)]
struct Classifier {
    backbone: Backbone,
    /// A mean-pooling ViT's fresh norm of the mean patch token (MAE's `fc_norm`).
    fc_norm: Option<LayerNorm>,
    head: Linear,
}

impl Classifier {
    /// The features the head classifies, with stochastic depth at `drop_path`.
    fn features(&self, x: Tensor<4>, drop_path: f64, rng: &mut impl rand::Rng) -> Tensor<2> {
        match (&self.backbone, &self.fc_norm) {
            (Backbone::Vit(v), Some(fc_norm)) => layer_norm(
                fc_norm,
                v.mean_patch_token(x, drop_path, rng),
                LAYER_NORM_EPS,
            ),
            (backbone, _) => backbone.forward_drop_path(x, drop_path, rng),
        }
    }
}

/// What [`finetune`] returns.
pub struct FineTuned {
    /// Top-1/top-5 on the test split.
    pub accuracy: Accuracy,
    /// Labelled training images used.
    pub labelled: usize,
    /// The fine-tuned encoder (evaluation mode, on the given device).
    pub backbone: Backbone,
}

/// Fine-tunes `backbone` (every parameter, batch norm in training mode) with a new linear head on
/// `train` (views from `augment`), then measures it on `test` (views from `eval`).
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    backbone: Backbone,
    feature_dim: usize,
    train: &Split,
    test: &Split,
    classes: usize,
    augment: &Pipeline,
    eval: &Pipeline,
    config: &FinetuneConfig,
    device: &Device,
) -> Result<FineTuned> {
    config.check()?;
    let ad = device.clone().autodiff();
    // MAE: trunc_normal_(head.weight, std=2e-5), a zero bias.
    let head = classifier_head(feature_dim, classes, 2e-5, &ad);
    // MAE fine-tunes a mean-pooling ViT through a fresh fc_norm in place of the final norm.
    let fc_norm = match &backbone {
        Backbone::Vit(v) if v.pool_kind() == Pool::Mean => Some(
            LayerNormConfig::new(feature_dim)
                .with_epsilon(LAYER_NORM_EPS)
                .init(&ad),
        ),
        _ => None,
    };
    let mut model = Classifier {
        backbone: crate::models::to_device(backbone, &ad),
        fc_norm,
        head,
    };
    // Layer-wise scales, shallow groups smallest; the head and anything unnamed take lr itself.
    let groups = match &model.backbone {
        Backbone::Vit(v) => v.layer_groups(),
        Backbone::ResNet(_) => vec![],
    };
    let depth = groups.len() as i32 - 1;
    let scales: Vec<f64> = (0..groups.len())
        .map(|j| config.layer_decay.powi(depth - j as i32))
        .collect();
    let lr_at = |lr: f64| -> ModuleLearningRate {
        let mut s = ModuleLrScheduler::new(lr);
        for (g, scale) in groups.iter().zip(&scales) {
            s = s.with_group(g.clone(), lr * scale);
        }
        s.step()
    };
    let mut optim = OptimConfig {
        optimizer: OptimizerKind::Adamw,
        weight_decay: config.weight_decay,
        momentum: 0.9,
        betas: [0.9, 0.999],
        eta: 0.001,
        exempt_embeddings: true,
        ..OptimConfig::default()
    }
    .init();
    // Each rank fine-tunes on its rows of every global batch; every draw is made for the
    // global batch (random erasing per image, keyed by the step and the image's row; mixing and
    // drop path per step) and each image is mixed with its partner in the global batch, so the
    // run is that of one process (crate::dist).
    crate::dist::check_batch("finetune.batch_size", config.batch_size)?;
    let (rank, world) = crate::dist::rank_size();
    let loader = Loader::new(
        train.clone(),
        Arc::new(augment.clone()),
        config.batch_size,
        0,
    )?
    .sharded(rank, world);
    loader.check("finetune.batch_size")?;
    if train.labels.is_none() {
        bail!("split '{}' has no labels to fine-tune on", train.name);
    }
    let steps_per_epoch = loader.batches_per_epoch();
    let total = steps_per_epoch * config.epochs;
    let warmup = (config.warmup_epochs * steps_per_epoch as f64).round() as usize;
    let peak = config.base_lr * config.batch_size as f64 / 256.0;
    let mut run = Supervised::new("fine-tuning", "", config.epochs, steps_per_epoch);
    for epoch in 0..config.epochs {
        let loss = |model: &Classifier, batch: Batch| {
            let step = (batch.epoch as usize * steps_per_epoch + batch.index) as u64;
            let labels: Vec<usize> = batch
                .labels
                .as_ref()
                .map(|l| l.iter().map(|&c| c as usize).collect())
                .unwrap_or_default();
            let mut images = batch.views[0].clone();
            let [n, c, h, w] = images.shape;
            let rows = crate::dist::global_rows(n);
            for (image, &row) in images.data.chunks_mut(c * h * w).zip(&rows) {
                let mut rng = step_rng(step, 1 + row as u64);
                random_erase(image, [c, h, w], config.random_erasing, &mut rng);
            }
            // Mixing, then drop path in the forward pass, from the step's stream 0.
            let mut rng = step_rng(step, 0);
            let mix = Mix::draw(
                config.mixup,
                config.cutmix,
                config.mixup_switch_prob,
                [h, w],
                &mut rng,
            );
            let x = images.to_tensor(&ad);
            let (x, targets) = match &mix {
                Some(mix) => {
                    let smoothed = smoothed_targets(&labels, classes, config.label_smoothing, &ad);
                    let (x, t) = mix_global(mix, x, smoothed);
                    (x, Some(t))
                }
                None => (x, None),
            };
            let logits = model
                .head
                .forward(model.features(x, config.drop_path, &mut rng));
            Ok(match targets {
                Some(targets) => soft_cross_entropy(logits, targets),
                None => cross_entropy_smoothed(logits, &labels, config.label_smoothing),
            })
        };
        let lr = |step| lr_at(warmup_cosine(step, warmup, total, peak, 0.0));
        let batches = loader.epoch(epoch as u64, 0);
        model = run.epoch(epoch, model, batches, &mut optim, loss, lr)?;
    }
    drop(run);
    let model = model.valid().to_device(device);
    let accuracy = super::classify(
        test,
        eval,
        config.batch_size,
        device,
        &model.backbone,
        |_, x| {
            let mut unused = ChaCha8Rng::seed_from_u64(0); // no drop path here
            model.head.forward(model.features(x, 0.0, &mut unused))
        },
    )?;
    Ok(FineTuned {
        accuracy,
        labelled: train.len(),
        backbone: model.backbone,
    })
}

/// The generator of fine-tuning step `step`'s draws: stream 0 for the batch's (mixing, drop
/// path), stream 1 + i for image i of the global batch's (random erasing).
fn step_rng(step: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6674 ^ step);
    rng.set_stream(stream);
    rng
}

/// `mix` of the global batch, whose rows are spread over the ranks: this rank's rows of the mixed
/// images (`x`, `[n, c, h, w]`) and of the mixed targets (`targets`, `[n, classes]`), each image
/// mixed with its partner in the global batch wherever that is.
fn mix_global(mix: &Mix, x: Tensor<4>, targets: Tensor<2>) -> (Tensor<4>, Tensor<2>) {
    use crate::dist::{all_gather_rows, global_batch, local_part};
    let n = targets.dims()[0];
    if global_batch(n) == n {
        return (mix.apply(x), mix.apply_targets(targets));
    }
    (
        local_part(mix.apply(all_gather_rows(x))),
        local_part(mix.apply_targets(all_gather_rows(targets))),
    )
}

//! Recipes: TOML files that say what to train on and how. Every value is checked before work
//! starts, and an error names the file and the field at fault.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::augment::{Pipeline, Sizes, ViewSpec};
use crate::data::LoadOptions;
use crate::eval::finetune::FinetuneConfig;
use crate::eval::EvalConfig;
use crate::methods::MethodConfig;
use crate::models::{BackboneConfig, ResNetConfig, Stem};
use crate::train::{LrScaling, OptimConfig, OptimizerKind, TrainConfig};

/// `[data]`: where the images are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder or archive `Dataset::open` reads; the command line's `--data` overrides it.
    pub source: Option<PathBuf>,
    pub train_split: String,
    pub test_split: String,
    /// Train on this many images of the train split, spread over it (0: all): quick runs.
    pub train_limit: usize,
    pub load_size: Option<u32>,
    pub skip_bad: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: None,
            train_split: "train".into(),
            test_split: "test".into(),
            train_limit: 0,
            load_size: None,
            skip_bad: false,
        }
    }
}

impl DataConfig {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            load_size: self.load_size,
            skip_bad: self.skip_bad,
        }
    }
}

/// `[augment]`: a named pipeline to start from, its sizes, and optionally every view spelled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// One of `augment::PRESETS`.
    pub pipeline: String,
    pub size: u32,
    /// Local crop side and count for `dino` (default: half the size, 6 crops).
    pub local_size: Option<u32>,
    pub local_crops: Option<usize>,
    /// Replaces the preset's views entirely (`[[augment.views]]` tables).
    pub views: Option<Vec<ViewSpec>>,
    /// Normalisation (default: ImageNet's statistics).
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            pipeline: "simclr".into(),
            size: 32,
            local_size: None,
            local_crops: None,
            views: None,
            mean: None,
            std: None,
        }
    }
}

impl AugmentConfig {
    /// The deterministic pipeline features are extracted with: the central square at `size`,
    /// normalised like the training views.
    pub fn eval_pipeline(&self) -> Result<Pipeline> {
        let train = self.build()?;
        let mut p = Pipeline::preset("eval", Sizes::small(self.size))?;
        (p.mean, p.std) = (train.mean, train.std);
        Ok(p)
    }

    pub fn build(&self) -> Result<Pipeline> {
        let small = Sizes::small(self.size);
        let sizes = Sizes {
            size: self.size,
            local_size: self.local_size.unwrap_or(small.local_size),
            local_crops: self.local_crops.unwrap_or(small.local_crops),
        };
        let mut p = Pipeline::preset(&self.pipeline, sizes).context("augment.pipeline")?;
        if let Some(views) = &self.views {
            p.views = views.clone();
        }
        p.mean = self.mean.unwrap_or(p.mean);
        p.std = self.std.unwrap_or(p.std);
        p.check()?;
        Ok(p)
    }
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::Resnet(ResNetConfig {
            depth: 18,
            stem: Stem::Cifar,
            width: 1.0,
        })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 100,
            batch_size: 256,
            accumulate: 1,
            optim: OptimConfig {
                optimizer: OptimizerKind::Lars,
                weight_decay: 1e-6,
                momentum: 0.9,
                betas: [0.9, 0.999],
                eta: 0.001,
                ..OptimConfig::default()
            },
            base_lr: 0.3,
            lr_scaling: LrScaling::Linear,
            warmup_epochs: 10.0,
            final_lr: 0.0,
            checkpoint_every: 10,
            monitor_every: 0,
        }
    }
}

/// A whole recipe file: `seed` and the sections `[data]`, `[augment]`, `[method]`, `[model]`,
/// `[train]`, `[eval]`, `[finetune]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub seed: u64,
    pub data: DataConfig,
    pub augment: AugmentConfig,
    pub method: MethodConfig,
    pub model: BackboneConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("recipe {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Recipe> {
        let recipe: Recipe = toml::from_str(text)?;
        recipe.check()?;
        Ok(recipe)
    }

    /// Checks every section; the error names the field at fault.
    pub fn check(&self) -> Result<()> {
        let pipeline = self.augment.build()?;
        self.method.check(&self.model, &pipeline)?;
        self.model.check()?;
        self.train.check()?;
        if let MethodConfig::Moco(m) = &self.method {
            if self.train.batch_size < 2 * m.bn_splits {
                anyhow::bail!(
                    "method.bn_splits = {}: batch norm needs at least 2 images per group, and train.batch_size is {}",
                    m.bn_splits,
                    self.train.batch_size
                );
            }
        }
        Ok(())
    }
}

//! Recipes: TOML files that say what to train on and how. Every value is checked before work
//! starts, and an error names the file and the field at fault.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::augment::{Pipeline, Sizes, ViewSpec};
use crate::data::LoadOptions;

/// `[data]`: where the images are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder or archive `Dataset::open` reads; the command line's `--data` overrides it.
    pub source: Option<PathBuf>,
    pub train_split: String,
    pub test_split: String,
    pub load_size: Option<u32>,
    pub skip_bad: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: None,
            train_split: "train".into(),
            test_split: "test".into(),
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// A whole recipe file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub seed: u64,
    pub data: DataConfig,
    pub augment: AugmentConfig,
}

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let recipe: Recipe =
            toml::from_str(&text).with_context(|| format!("recipe {}", path.display()))?;
        recipe
            .augment
            .build()
            .with_context(|| format!("recipe {}", path.display()))?;
        Ok(recipe)
    }
}

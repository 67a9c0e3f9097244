//! Self-supervised methods, one file each, each reading like its paper.

pub mod dino;
pub mod inpainting;
pub mod jigsaw;
pub mod mae;
pub mod moco;
pub mod rotation;
pub mod simclr;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use anyhow::bail;

use crate::augment::{Augment, Pipeline};
use crate::models::BackboneConfig;
pub use dino::{Dino, DinoConfig};
pub use inpainting::{Inpainting, InpaintingConfig};
pub use jigsaw::{Jigsaw, JigsawConfig};
pub use mae::{Mae, MaeConfig};
pub use moco::{Moco, MocoConfig};
pub use rotation::{Rotation, RotationConfig};
pub use simclr::{SimClr, SimclrConfig};

/// `[method]` of a recipe: `name` picks the method, the other keys are its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum MethodConfig {
    Simclr(SimclrConfig),
    Moco(MocoConfig),
    Mae(MaeConfig),
    Dino(DinoConfig),
    Rotation(RotationConfig),
    Jigsaw(JigsawConfig),
    Inpainting(InpaintingConfig),
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Simclr(SimclrConfig::default())
    }
}

impl MethodConfig {
    /// Checks the settings, and what the loss and layers need of every forward pass (views per
    /// image, their sizes, images per batch and per batch-norm group), against `feed`. The error
    /// names the recipe key at fault and why the method needs it.
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        match self {
            MethodConfig::Simclr(c) => c.check(feed),
            MethodConfig::Moco(c) => c.check(feed),
            MethodConfig::Mae(c) => c.check(feed),
            MethodConfig::Dino(c) => c.check(feed),
            MethodConfig::Rotation(_) => {
                feed.views("rotation", 1, "it turns one view of each image four ways")
            }
            MethodConfig::Jigsaw(c) => c.check(feed),
            MethodConfig::Inpainting(c) => c.check(feed),
        }
    }

    /// The `name` of the recipe's `[method]`.
    /// Whether the method keeps a momentum encoder beside the trained one (DINO, MoCo).
    pub fn has_teacher(&self) -> bool {
        matches!(self, MethodConfig::Dino(_) | MethodConfig::Moco(_))
    }

    pub fn name(&self) -> &'static str {
        match self {
            MethodConfig::Simclr(_) => "simclr",
            MethodConfig::Moco(_) => "moco",
            MethodConfig::Mae(_) => "mae",
            MethodConfig::Dino(_) => "dino",
            MethodConfig::Rotation(_) => "rotation",
            MethodConfig::Jigsaw(_) => "jigsaw",
            MethodConfig::Inpainting(_) => "inpainting",
        }
    }

    /// What turns an image into the method's views: the recipe's pipeline itself for the
    /// joint-embedding methods, built upon its first view for the pretext tasks.
    pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        match self {
            MethodConfig::Rotation(c) => c.augment(base),
            MethodConfig::Jigsaw(c) => c.augment(base),
            MethodConfig::Inpainting(c) => c.augment(base),
            MethodConfig::Simclr(_)
            | MethodConfig::Moco(_)
            | MethodConfig::Mae(_)
            | MethodConfig::Dino(_) => Arc::new(base),
        }
    }
}

/// What a recipe feeds its method in one forward pass, for [`MethodConfig::check`].
pub struct Feed<'a> {
    pub model: &'a BackboneConfig,
    /// The side of each view of an image, in the order of the loss's `views`.
    pub view_sizes: Vec<u32>,
    /// `augment.size`: the side of the views of evaluation, fine-tuning and pictures.
    pub size: u32,
    /// `train.batch_size`: images per forward pass.
    pub batch: usize,
}

impl Feed<'_> {
    /// Refuses a pipeline that does not make exactly `n` views of each image.
    pub fn views(&self, method: &str, n: usize, why: &str) -> anyhow::Result<()> {
        let made = self.view_sizes.len();
        if made != n {
            bail!("augment: method {method} needs {n} view(s) of each image ({why}); this pipeline makes {made} (set augment.pipeline or [[augment.views]])");
        }
        Ok(())
    }

    /// Refuses views `range` of differing sizes (they go through the network as one batch).
    pub fn same_size(&self, method: &str, range: std::ops::Range<usize>) -> anyhow::Result<()> {
        let sizes = &self.view_sizes[range.clone()];
        if sizes.windows(2).any(|w| w[0] != w[1]) {
            bail!("augment: method {method} batches views {}..{} together, so they need one size; they are {sizes:?} px", range.start, range.end);
        }
        Ok(())
    }

    /// Refuses a batch smaller than `n` images.
    pub fn min_batch(&self, method: &str, n: usize, why: &str) -> anyhow::Result<()> {
        if self.batch < n {
            bail!(
                "train.batch_size = {}: method {method} needs at least {n} images per batch ({why})",
                self.batch
            );
        }
        Ok(())
    }
}

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
    /// Checks the settings against the recipe's model and views.
    pub fn check(&self, model: &BackboneConfig, views: &Pipeline) -> anyhow::Result<()> {
        let view_size = views.views[0].size;
        match self {
            MethodConfig::Simclr(c) => c.check(),
            MethodConfig::Moco(c) => c.check(),
            MethodConfig::Mae(c) => c.check(model),
            MethodConfig::Dino(c) => c.check(views.num_views()),
            MethodConfig::Rotation(_) => Ok(()),
            MethodConfig::Jigsaw(c) => c.check(view_size),
            MethodConfig::Inpainting(c) => c.check(view_size),
        }
    }

    /// The `name` of the recipe's `[method]`.
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

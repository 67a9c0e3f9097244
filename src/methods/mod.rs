//! Self-supervised methods, one file each, each reading like its paper.

pub mod moco;
pub mod simclr;

use serde::{Deserialize, Serialize};

pub use moco::{Moco, MocoConfig};
pub use simclr::{SimClr, SimclrConfig};

/// `[method]` of a recipe: `name` picks the method, the other keys are its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum MethodConfig {
    Simclr(SimclrConfig),
    Moco(MocoConfig),
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Simclr(SimclrConfig::default())
    }
}

impl MethodConfig {
    pub fn check(&self) -> anyhow::Result<()> {
        match self {
            MethodConfig::Simclr(c) => c.check(),
            MethodConfig::Moco(c) => c.check(),
        }
    }
}

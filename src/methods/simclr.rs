//! SimCLR (Chen et al. 2020): two random views of each image, an encoder f, a projection head
//! g (an MLP with batch norm, discarded after training), and the NT-Xent loss over the 2N
//! projections z = g(f(x)):
//!
//!   ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) ),
//!
//! averaged over all 2N positive pairs (i, j) and (j, i), sim = cosine similarity.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::losses::{embedding_std, nt_xent};
use crate::methods::Feed;
use crate::models::{Backbone, BackboneConfig, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimclrConfig {
    /// τ: 0.5 in the paper at batch 256-512 on CIFAR, 0.2 in solo-learn's CIFAR recipe.
    pub temperature: f64,
    pub proj_hidden: usize,
    pub proj_dim: usize,
}

impl Default for SimclrConfig {
    fn default() -> Self {
        SimclrConfig {
            temperature: 0.5,
            proj_hidden: 2048,
            proj_dim: 128,
        }
    }
}

impl SimclrConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        if !(self.temperature > 0.0) {
            anyhow::bail!(
                "method.temperature = {}: must be positive",
                self.temperature
            );
        }
        feed.views("simclr", 2, "the positive pair")?;
        feed.same_size("simclr", 0..2)?;
        feed.min_batch(
            "simclr",
            2,
            "the negatives of a view are the other images of its batch",
        )
    }

    pub fn init(&self, model: &BackboneConfig, device: &Device) -> SimClr {
        let head = ProjectionHeadConfig {
            input: model.feature_dim(),
            hidden: self.proj_hidden,
            output: self.proj_dim,
            layers: 2,
            batch_norm: true,
        };
        SimClr {
            backbone: model.init(device),
            projector: head.init(device),
            temperature: self.temperature,
        }
    }
}

#[derive(Module, Debug)]
pub struct SimClr {
    backbone: Backbone,
    projector: ProjectionHead,
    temperature: f64,
}

impl Method for SimClr {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        // Both views in one pass: batch norm sees all 2N images, as in SimCLR's global BN.
        let z = self.projector.forward(
            self.backbone
                .forward(Tensor::cat(vec![views[0].clone(), views[1].clone()], 0)),
        );
        let (z1, z2) = (z.clone().narrow(0, 0, n), z.clone().narrow(0, n, n));
        let loss = nt_xent(z1, z2, self.temperature);
        StepOutput::new(loss, vec![("z_std", embedding_std(z))])
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        SimClr {
            backbone: weights,
            ..self
        }
    }
}

//! Barlow Twins (Zbontar et al. 2021): the cross-correlation between the two views' embeddings,
//! each standardised over the batch, is pulled towards the identity:
//!
//!   C_ij = Σ_b ẑ₁[b, i]·ẑ₂[b, j] / N,   L = Σ_i (1 − C_ii)² + λ·Σ_{i≠j} C_ij²,
//!
//! ẑ the projector's output batch-normalised without affine parameters (`self.bn` of
//! facebookresearch/barlowtwins `main.py`), N the global batch. The diagonal makes the views
//! agree; the off-diagonal terms decorrelate the dimensions, which prevents collapse without
//! negatives. λ = 0.0051 (the official default, about 1/d for d = 8192). The projector is Linear →
//! BN → ReLU, `proj_layers − 1` times, then a Linear; each view goes through the network on its
//! own. Across ranks C is summed over every rank's rows (the official `all_reduce(c)`), with
//! gradient. `scale_loss` multiplies L (solo-learn's CIFAR recipe: 0.1; the official: 1).

use burn::module::Module;
use burn::nn::BatchNorm;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, not_negative, positive};
use crate::dist::{all_reduce, global_batch};
use crate::kernels::batch_norm;
use crate::losses::{barlow_twins_loss, embedding_std};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{plain_batch_norm, Backbone, OutputNorm, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BarlowTwinsConfig {
    /// Hidden width of the projector (8192).
    pub proj_hidden: usize,
    /// Width d of the embeddings whose cross-correlation is taken (8192).
    pub proj_dim: usize,
    /// Linear layers of the projector (3).
    pub proj_layers: usize,
    /// λ, the weight of the off-diagonal (redundancy-reduction) terms.
    pub lambda: f64,
    /// A factor on the whole loss.
    pub scale_loss: f64,
}

impl Default for BarlowTwinsConfig {
    /// The official `main.py`: `--projector 8192-8192-8192 --lambd 0.0051`.
    fn default() -> Self {
        BarlowTwinsConfig {
            proj_hidden: 8192,
            proj_dim: 8192,
            proj_layers: 3,
            lambda: 0.0051,
            scale_loss: 1.0,
        }
    }
}

impl MethodSpec for BarlowTwinsConfig {
    type Method = BarlowTwins;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("barlow_twins_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.proj_layers", self.proj_layers)?;
        not_negative("method.lambda", self.lambda)?;
        positive("method.scale_loss", self.scale_loss)?;
        feed.pair("barlow_twins")
    }

    fn init(&self, ctx: &InitContext) -> BarlowTwins {
        let (model, device) = (ctx.model, ctx.device);
        let projector = ProjectionHeadConfig::mlp(
            model.feature_dim(),
            self.proj_hidden,
            self.proj_dim,
            self.proj_layers,
            OutputNorm::Off,
        );
        BarlowTwins {
            backbone: model.init(device),
            projector: projector.init(device),
            standardise: plain_batch_norm(self.proj_dim, device),
            lambda: self.lambda,
            scale_loss: self.scale_loss,
        }
    }
}

#[derive(Module, Debug)]
pub struct BarlowTwins {
    backbone: Backbone,
    projector: ProjectionHead,
    /// Batch norm without affine parameters: each view's embeddings standardised over the batch.
    standardise: BatchNorm,
    lambda: f64,
    scale_loss: f64,
}

impl BarlowTwins {
    /// The projector's output z = g(f(x)) `[n, proj_dim]`.
    pub fn project(&self, x: Tensor<4>) -> Tensor<2> {
        self.projector.forward(self.backbone.forward(x))
    }

    /// C `[d, d]` of the two views' embeddings over the global batch.
    pub fn cross_correlation(&self, z1: Tensor<2>, z2: Tensor<2>) -> Tensor<2> {
        let [n, _] = z1.dims();
        let (z1, z2) = (
            batch_norm(&self.standardise, z1),
            batch_norm(&self.standardise, z2),
        );
        all_reduce(z1.transpose().matmul(z2)).div_scalar(global_batch(n) as f64)
    }
}

impl Method for BarlowTwins {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (z1, z2) = (
            self.project(views[0].clone()),
            self.project(views[1].clone()),
        );
        let z_std = embedding_std(z1.clone());
        let c = self.cross_correlation(z1, z2);
        let loss = barlow_twins_loss(c, self.lambda).mul_scalar(self.scale_loss);
        StepOutput::new(loss, vec![("z_std", z_std)])
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        BarlowTwins {
            backbone: weights,
            ..self
        }
    }
}

//! SimCLR (Chen et al. 2020): two random views of each image, an encoder f, a projection head
//! g (an MLP with batch norm, discarded after training), and the NT-Xent loss over the 2N
//! projections z = g(f(x)):
//!
//!   ℓ(i, j) = −log( exp(sim(z_i, z_j)/τ) / Σ_{k≠i} exp(sim(z_i, z_k)/τ) ),
//!
//! sim = cosine similarity. As the official code (`tf2/objective.py`), the loss is the mean over
//! the N pairs of each direction, summed over the two directions (2× the mean over all 2N rows:
//! the gradient's scale matters to the parameters that LARS does not adapt, biases and batch
//! norm). The head follows `tf2/model.py`: linear (no bias) → BN → ReLU, hidden width = the
//! encoder's, then linear (no bias) → BN without β.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, positive};
use crate::dist::all_gather_rows;
use crate::losses::{embedding_std, nt_xent};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{Backbone, BackboneConfig, OutputNorm, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimclrConfig {
    /// τ: 0.5 in the paper at batch 256-512 on CIFAR, 0.2 in solo-learn's CIFAR recipe.
    pub temperature: f64,
    /// Width of the head's hidden layers; unset: the encoder's feature width (official).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proj_hidden: Option<usize>,
    pub proj_dim: usize,
    /// Linear layers of the head: 2 in SimCLR v1, 3 in v2.
    pub proj_layers: usize,
    /// Batch norm (without β) on the head's output, as the official code.
    pub proj_output_norm: bool,
}

impl Default for SimclrConfig {
    fn default() -> Self {
        SimclrConfig {
            temperature: 0.5,
            proj_hidden: None,
            proj_dim: 128,
            proj_layers: 2,
            proj_output_norm: true,
        }
    }
}

impl SimclrConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        positive("method.temperature", self.temperature)?;
        at_least_one("method.proj_layers", self.proj_layers)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        if let Some(hidden) = self.proj_hidden {
            at_least_one("method.proj_hidden", hidden)?;
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
            hidden: self.proj_hidden.unwrap_or(model.feature_dim()),
            output: self.proj_dim,
            layers: self.proj_layers,
            batch_norm: true,
            output_norm: match self.proj_output_norm {
                true => OutputNorm::NoShift,
                false => OutputNorm::Off,
            },
        };
        SimClr {
            backbone: model.init(device),
            projector: head.init(device),
            temperature: self.temperature,
        }
    }
}

impl MethodSpec for SimclrConfig {
    type Method = SimClr;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("simclr_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        SimclrConfig::check(self, feed)
    }

    fn init(&self, ctx: &InitContext) -> SimClr {
        SimclrConfig::init(self, ctx.model, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct SimClr {
    backbone: Backbone,
    projector: ProjectionHead,
    temperature: f64,
}

impl SimClr {
    /// z = g(f(x)) of both views, `[2N, proj_dim]`, view 1 first: one pass, so that batch norm
    /// sees all 2N images, as SimCLR's global batch norm does.
    pub fn projections(&self, views: &[Tensor<4>]) -> Tensor<2> {
        self.projector.forward(
            self.backbone
                .forward(Tensor::cat(vec![views[0].clone(), views[1].clone()], 0)),
        )
    }
}

impl Method for SimClr {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let z = self.projections(views);
        // Every rank's projections, with their gradient (crate::dist): the negatives of a view
        // are the other images of the global batch, and every rank computes the same loss.
        let (z1, z2) = (
            all_gather_rows(z.clone().narrow(0, 0, n)),
            all_gather_rows(z.clone().narrow(0, n, n)),
        );
        let loss = nt_xent(z1, z2, self.temperature).mul_scalar(2.0);
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

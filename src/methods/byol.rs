//! BYOL (Grill et al. 2020): an online network (encoder f, projector g, predictor q) learns to
//! predict, from one view, the target network's projection of the other view; the target
//! (f_ξ, g_ξ) is an exponential moving average of the online encoder and projector:
//!
//!   L = ‖q(z₁)‾ − z′₂‾‖² + ‖q(z₂)‾ − z′₁‾‖²,   ‖ā − b̄‖² = 2 − 2·cos(a, b),
//!   ξ ← τ·ξ + (1 − τ)·θ,   τ = 1 − (1 − τ_base)·(cos(πk/K) + 1)/2,
//!
//! z = g(f(x)) online, z′ = g_ξ(f_ξ(x)) target (no gradient), each term averaged over the batch
//! (deepmind-research `byol/byol_experiment.py`). No negatives: the predictor and the slowly
//! moving target keep the embeddings from collapsing. Projector and predictor are Linear → BN →
//! ReLU → Linear (`byol/utils/networks.py`'s `MLP`); each view goes through the networks on its
//! own, so batch norm sees one view at a time, as the official code.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, momentum};
use crate::losses::{byol_loss, embedding_std};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::OutputNorm::Off;
use crate::models::{ema_update, momentum_copy, Backbone, ProjectionHead, ProjectionHeadConfig};
use crate::train::optim::cosine_ramp;
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ByolConfig {
    /// Hidden width of the projector (4096 in the paper).
    pub proj_hidden: usize,
    /// Width of the projection z and the prediction q(z) (256).
    pub proj_dim: usize,
    /// Hidden width of the predictor (4096).
    pub pred_hidden: usize,
    /// τ_base, the target's EMA momentum at the start (0.996; 0.99 in solo-learn's CIFAR recipe).
    pub momentum: f64,
    /// τ at the end of training, reached by a cosine (1.0 in the paper).
    pub final_momentum: f64,
}

impl Default for ByolConfig {
    /// The paper's ImageNet settings (`byol/configs/byol.py`).
    fn default() -> Self {
        ByolConfig {
            proj_hidden: 4096,
            proj_dim: 256,
            pred_hidden: 4096,
            momentum: 0.996,
            final_momentum: 1.0,
        }
    }
}

impl MethodSpec for ByolConfig {
    type Method = Byol;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("byol_cifar10");
    const ENCODERS: Option<[&'static str; 2]> = Some(["online encoder", "target encoder"]);

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.pred_hidden", self.pred_hidden)?;
        momentum("method.momentum", self.momentum)?;
        momentum("method.final_momentum", self.final_momentum)?;
        feed.pair("byol")
    }

    /// Online network, and the target network as its copy.
    fn init(&self, ctx: &InitContext) -> Byol {
        let (model, device) = (ctx.model, ctx.device);
        // Linear → BN → ReLU → Linear, as the projector so the predictor.
        let head =
            ProjectionHeadConfig::mlp(model.feature_dim(), self.proj_hidden, self.proj_dim, 2, Off);
        let (backbone, projector) = (model.init(device), head.init(device));
        Byol {
            target_backbone: momentum_copy(model.init(device), &backbone),
            target_projector: momentum_copy(head.init(device), &projector),
            backbone,
            projector,
            predictor: ProjectionHeadConfig::mlp(
                self.proj_dim,
                self.pred_hidden,
                self.proj_dim,
                2,
                Off,
            )
            .init(device),
            momentum: self.momentum,
            final_momentum: self.final_momentum,
        }
    }
}

#[derive(Module, Debug)]
pub struct Byol {
    backbone: Backbone,
    projector: ProjectionHead,
    predictor: ProjectionHead,
    /// The target network: an EMA of the online encoder and projector, never trained.
    target_backbone: Backbone,
    target_projector: ProjectionHead,
    momentum: f64,
    final_momentum: f64,
}

impl Byol {
    /// The online projection z = g(f(x)) `[n, proj_dim]`.
    pub fn project(&self, x: Tensor<4>) -> Tensor<2> {
        self.projector.forward(self.backbone.forward(x))
    }

    /// The online prediction q(z) of a projection.
    pub fn predict(&self, z: Tensor<2>) -> Tensor<2> {
        self.predictor.forward(z)
    }

    /// The target's projection z′ = g_ξ(f_ξ(x)), without gradient.
    pub fn target(&self, x: Tensor<4>) -> Tensor<2> {
        self.target_projector
            .forward(self.target_backbone.forward(x.detach()))
            .detach()
    }
}

impl Method for Byol {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (z1, z2) = (
            self.project(views[0].clone()),
            self.project(views[1].clone()),
        );
        let (t1, t2) = (self.target(views[0].clone()), self.target(views[1].clone()));
        let z_std = embedding_std(z1.clone());
        let loss = byol_loss(self.predict(z1), t2) + byol_loss(self.predict(z2), t1);
        StepOutput::new(loss, vec![("z_std", z_std)])
    }

    /// The target follows the online network: ξ ← τ·ξ + (1 − τ)·θ, τ on its cosine schedule.
    fn after_step(mut self, _kept: Option<Tensor<2>>, progress: &Progress) -> Self {
        let tau = cosine_ramp(
            progress.step,
            progress.total_steps,
            self.momentum,
            self.final_momentum,
        );
        self.target_backbone = ema_update(self.target_backbone, &self.backbone, tau);
        self.target_projector = ema_update(self.target_projector, &self.projector, tau);
        self
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn teacher(&self) -> Option<&Backbone> {
        Some(&self.target_backbone)
    }

    fn start_from(self, weights: Backbone) -> Self {
        Byol {
            target_backbone: momentum_copy(self.target_backbone, &weights),
            backbone: weights,
            ..self
        }
    }
}

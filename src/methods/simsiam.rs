//! SimSiam (Chen & He 2021): one network (encoder f and projector g) for both views, a predictor
//! h, and a stop-gradient on the branch being predicted:
//!
//!   L = ½·D(p₁, z₂) + ½·D(p₂, z₁),   D(p, z) = −cos(p, stopgrad(z)),   z = g(f(x)), p = h(z).
//!
//! No negatives, no momentum encoder: the stop-gradient alone keeps it from collapsing (the
//! paper's figure 2; the logged `z_std` of the normalised z stays near 1/√d unless it does).
//! As `simsiam/builder.py`: the projector is `proj_layers` Linear → BN → ReLU with the last
//! Linear followed by batch norm without affine parameters, the predictor Linear → BN → ReLU →
//! Linear with a narrow hidden layer; `main_simsiam.py --fix-pred-lr` trains the predictor at the
//! peak learning rate throughout.

use burn::module::{Module, ParamGroup};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::at_least_one;
use crate::losses::{embedding_std, negative_cosine};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::OutputNorm::{Off, Plain};
use crate::models::{Backbone, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimsiamConfig {
    /// Hidden width of the projector (2048; the official code: the encoder's feature width).
    pub proj_hidden: usize,
    /// Width of z and p (2048).
    pub proj_dim: usize,
    /// Linear layers of the projector: 3 (ImageNet), 2 (the paper's CIFAR experiments).
    pub proj_layers: usize,
    /// Hidden width of the predictor's bottleneck (512).
    pub pred_hidden: usize,
    /// Train the predictor at the peak learning rate, outside the schedule (`--fix-pred-lr`).
    pub fix_pred_lr: bool,
}

impl Default for SimsiamConfig {
    /// `main_simsiam.py`'s ImageNet settings, with `--fix-pred-lr` as its README runs it.
    fn default() -> Self {
        SimsiamConfig {
            proj_hidden: 2048,
            proj_dim: 2048,
            proj_layers: 3,
            pred_hidden: 512,
            fix_pred_lr: true,
        }
    }
}

impl MethodSpec for SimsiamConfig {
    type Method = SimSiam;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("simsiam_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.proj_layers", self.proj_layers)?;
        at_least_one("method.pred_hidden", self.pred_hidden)?;
        feed.pair("simsiam")
    }

    fn init(&self, ctx: &InitContext) -> SimSiam {
        let (model, device) = (ctx.model, ctx.device);
        let (input, hidden, dim) = (model.feature_dim(), self.proj_hidden, self.proj_dim);
        let projector = ProjectionHeadConfig::mlp(input, hidden, dim, self.proj_layers, Plain);
        let predictor = ProjectionHeadConfig::mlp(dim, self.pred_hidden, dim, 2, Off);
        SimSiam {
            backbone: model.init(device),
            projector: projector.init(device),
            predictor: predictor.init(device),
            fix_pred_lr: self.fix_pred_lr,
        }
    }
}

#[derive(Module, Debug)]
pub struct SimSiam {
    backbone: Backbone,
    projector: ProjectionHead,
    predictor: ProjectionHead,
    fix_pred_lr: bool,
}

impl SimSiam {
    /// z = g(f(x)) `[n, proj_dim]` and p = h(z).
    pub fn project_predict(&self, x: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let z = self.projector.forward(self.backbone.forward(x));
        let p = self.predictor.forward(z.clone());
        (z, p)
    }
}

impl Method for SimSiam {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (z1, p1) = self.project_predict(views[0].clone());
        let (z2, p2) = self.project_predict(views[1].clone());
        let z_std = embedding_std(z1.clone());
        let loss = (negative_cosine(p1, z2) + negative_cosine(p2, z1)).mul_scalar(0.5);
        StepOutput::new(loss, vec![("z_std", z_std)])
    }

    fn constant_lr(&self) -> Option<ParamGroup> {
        self.fix_pred_lr
            .then(|| ParamGroup::ids_from_module(self.predictor.clone()))
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        SimSiam {
            backbone: weights,
            ..self
        }
    }
}

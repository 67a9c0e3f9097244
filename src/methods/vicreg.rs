//! VICReg (Bardes, Ponce & LeCun 2022): three terms on the two views' embeddings z₁, z₂ `[N, d]`:
//!
//!   L = λ·s(z₁, z₂) + μ·(v(z₁) + v(z₂))/2 + ν·(c(z₁) + c(z₂)),
//!
//! invariance s = the mean squared error, variance v = mean_j max(0, 1 − √(Var z_j + ε)) (a
//! hinge keeping every dimension's std at 1 or more, ε = 1e-4), covariance c = Σ_{i≠j} C_ij²/d
//! (decorrelating the dimensions); λ = μ = 25, ν = 1 (facebookresearch/vicreg `main_vicreg.py`).
//! As the official code, the invariance is over this rank's rows and the variance and covariance
//! over every rank's (`FullGatherLayer`, with gradient). The projector is Linear → BN → ReLU,
//! `proj_layers − 1` times, then a Linear; each view goes through the network on its own.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, not_negative};
use crate::dist::all_gather_rows;
use crate::losses::{embedding_std, vicreg_covariance, vicreg_variance};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{Backbone, OutputNorm, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VicregConfig {
    /// Hidden width of the projector (8192).
    pub proj_hidden: usize,
    /// Width d of the embeddings (8192).
    pub proj_dim: usize,
    /// Linear layers of the projector (3).
    pub proj_layers: usize,
    /// λ, the weight of the invariance term.
    pub sim_coeff: f64,
    /// μ, the weight of the variance term.
    pub std_coeff: f64,
    /// ν, the weight of the covariance term.
    pub cov_coeff: f64,
}

impl Default for VicregConfig {
    /// `main_vicreg.py`: `--mlp 8192-8192-8192 --sim-coeff 25 --std-coeff 25 --cov-coeff 1`.
    fn default() -> Self {
        VicregConfig {
            proj_hidden: 8192,
            proj_dim: 8192,
            proj_layers: 3,
            sim_coeff: 25.0,
            std_coeff: 25.0,
            cov_coeff: 1.0,
        }
    }
}

impl MethodSpec for VicregConfig {
    type Method = Vicreg;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("vicreg_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.proj_layers", self.proj_layers)?;
        not_negative("method.sim_coeff", self.sim_coeff)?;
        not_negative("method.std_coeff", self.std_coeff)?;
        not_negative("method.cov_coeff", self.cov_coeff)?;
        feed.pair("vicreg")
    }

    fn init(&self, ctx: &InitContext) -> Vicreg {
        let (model, device) = (ctx.model, ctx.device);
        let projector = ProjectionHeadConfig::mlp(
            model.feature_dim(),
            self.proj_hidden,
            self.proj_dim,
            self.proj_layers,
            OutputNorm::Off,
        );
        Vicreg {
            backbone: model.init(device),
            projector: projector.init(device),
            coeffs: [self.sim_coeff, self.std_coeff, self.cov_coeff],
        }
    }
}

#[derive(Module, Debug)]
pub struct Vicreg {
    backbone: Backbone,
    projector: ProjectionHead,
    /// λ, μ, ν.
    coeffs: [f64; 3],
}

/// VICReg's three terms (invariance s, variance (v₁ + v₂)/2, covariance c₁ + c₂) for the two
/// views' embeddings `z1`, `z2` `[n, d]` of this rank, each `[1]`: see the module's formula.
pub fn vicreg_terms(z1: Tensor<2>, z2: Tensor<2>) -> [Tensor<1>; 3] {
    let invariance = (z1.clone() - z2.clone()).square().mean();
    let (z1, z2) = (all_gather_rows(z1), all_gather_rows(z2));
    let variance = (vicreg_variance(z1.clone()) + vicreg_variance(z2.clone())).mul_scalar(0.5);
    let covariance = vicreg_covariance(z1) + vicreg_covariance(z2);
    [invariance, variance, covariance]
}

impl Vicreg {
    /// The projector's output z = g(f(x)) `[n, proj_dim]`.
    pub fn project(&self, x: Tensor<4>) -> Tensor<2> {
        self.projector.forward(self.backbone.forward(x))
    }
}

impl Method for Vicreg {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (z1, z2) = (
            self.project(views[0].clone()),
            self.project(views[1].clone()),
        );
        let z_std = embedding_std(z1.clone());
        let [s, v, c] = vicreg_terms(z1, z2);
        let [sim, std, cov] = self.coeffs;
        let loss =
            s.clone().mul_scalar(sim) + v.clone().mul_scalar(std) + c.clone().mul_scalar(cov);
        let scalars = vec![
            ("z_std", z_std),
            ("invariance", s.detach()),
            ("variance", v.detach()),
            ("covariance", c.detach()),
        ];
        StepOutput::new(loss, scalars)
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Vicreg {
            backbone: weights,
            ..self
        }
    }
}

//! MoCo v3 (Chen, Xie & He 2021): a query encoder (encoder f, projector g, predictor q) and a
//! momentum encoder (f_k, g_k, its EMA); each view's prediction is contrasted with the momentum
//! keys of the other view over the whole batch, no queue:
//!
//!   L = ctr(q₁, k₂) + ctr(q₂, k₁),   ctr(q, k) = 2τ · CE(q̄·k̄ᵀ/τ, own image),
//!   θk ← m·θk + (1 − m)·θq,   m from 0.99 to 1 by cosine (`--moco-m-cos`).
//!
//! As moco-v3's `builder.py`: every linear layer without bias, projector and predictor Linear →
//! BN → ReLU, the projector ending in batch norm without affine; a ResNet gets a 2-layer
//! projector and a predictor without a last batch norm (`MoCo_ResNet`), a ViT a 3-layer projector
//! and a predictor ending in batch norm (`MoCo_ViT`), initialised as its `vits.py` (2-D sin-cos
//! position embeddings, fixed; xavier-uniform layers) with the patch projection frozen at its
//! random init (`--stop-grad-conv1`, the paper's stability trick; `freeze_patch_embed`). Across
//! ranks the keys of every rank are gathered (`concat_all_gather`) and each rank contrasts its own
//! queries with them.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, momentum, positive};
use crate::dist::{gather_kept, global_batch, local_rows};
use crate::losses::{embedding_std, moco_v3_loss};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{
    ema_update, momentum_copy, Backbone, BackboneConfig, OutputNorm, ProjectionHead,
    ProjectionHeadConfig,
};
use crate::train::optim::cosine_ramp;
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MocoV3Config {
    /// τ: 1.0 (the official default, its ResNet recipes), 0.2 (its ViT recipes; solo-learn's
    /// CIFAR recipe).
    pub temperature: f64,
    /// Hidden width of the projector and the predictor (4096).
    pub proj_hidden: usize,
    /// Width of the projections and predictions (256).
    pub proj_dim: usize,
    /// Hidden width of the predictor (4096).
    pub pred_hidden: usize,
    /// m, the momentum encoder's EMA momentum at the start (0.99).
    pub momentum: f64,
    /// m at the end of training, reached by a cosine (1.0).
    pub final_momentum: f64,
    /// A ViT's patch projection stays at its random init (the official ViT recipes' default).
    pub freeze_patch_embed: bool,
}

impl Default for MocoV3Config {
    /// `main_moco.py`'s defaults with `--moco-m-cos` and `--stop-grad-conv1`.
    fn default() -> Self {
        MocoV3Config {
            temperature: 1.0,
            proj_hidden: 4096,
            proj_dim: 256,
            pred_hidden: 4096,
            momentum: 0.99,
            final_momentum: 1.0,
            freeze_patch_embed: true,
        }
    }
}

impl MocoV3Config {
    /// The projector and the predictor for `model`: `MoCo_ResNet`'s or `MoCo_ViT`'s.
    fn heads(&self, model: &BackboneConfig) -> (ProjectionHeadConfig, ProjectionHeadConfig) {
        let vit = matches!(model, BackboneConfig::Vit(_));
        let (input, dim) = (model.feature_dim(), self.proj_dim);
        let (layers, last) = match vit {
            true => (3, OutputNorm::Plain),
            false => (2, OutputNorm::OffUnbiased),
        };
        (
            ProjectionHeadConfig::mlp(input, self.proj_hidden, dim, layers, OutputNorm::Plain),
            ProjectionHeadConfig::mlp(dim, self.pred_hidden, dim, 2, last),
        )
    }
}

impl MethodSpec for MocoV3Config {
    type Method = MocoV3;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("moco_v3_cifar10");
    const ENCODERS: Option<[&'static str; 2]> = Some(["query encoder", "momentum encoder"]);

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        positive("method.temperature", self.temperature)?;
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.pred_hidden", self.pred_hidden)?;
        momentum("method.momentum", self.momentum)?;
        momentum("method.final_momentum", self.final_momentum)?;
        feed.pair("moco_v3")
    }

    /// Query encoder and heads, the momentum encoder as their copy.
    fn init(&self, ctx: &InitContext) -> MocoV3 {
        let (model, device) = (ctx.model, ctx.device);
        let backbone = match model.init(device) {
            Backbone::Vit(v) if self.freeze_patch_embed => {
                Backbone::Vit(v.mae_init(device).freeze_patch_embed())
            }
            Backbone::Vit(v) => Backbone::Vit(v.mae_init(device)),
            resnet => resnet,
        };
        let (head, predictor) = self.heads(model);
        let projector = head.init(device);
        MocoV3 {
            momentum_backbone: momentum_copy(model.init(device), &backbone),
            momentum_projector: momentum_copy(head.init(device), &projector),
            backbone,
            projector,
            predictor: predictor.init(device),
            temperature: self.temperature,
            momentum: self.momentum,
            final_momentum: self.final_momentum,
        }
    }
}

#[derive(Module, Debug)]
pub struct MocoV3 {
    backbone: Backbone,
    projector: ProjectionHead,
    predictor: ProjectionHead,
    /// The momentum encoder and projector: an EMA of the query ones, never trained.
    momentum_backbone: Backbone,
    momentum_projector: ProjectionHead,
    temperature: f64,
    momentum: f64,
    final_momentum: f64,
}

impl MocoV3 {
    /// The query q = q(g(f(x))) `[n, proj_dim]`, and g(f(x)) for the collapse monitor.
    pub fn query(&self, x: Tensor<4>) -> (Tensor<2>, Tensor<2>) {
        let z = self.projector.forward(self.backbone.forward(x));
        (self.predictor.forward(z.clone()), z)
    }

    /// The keys g_k(f_k(x)) of every rank's images `[W·n, proj_dim]`, in global batch order,
    /// without gradient.
    pub fn keys(&self, x: Tensor<4>) -> Tensor<2> {
        let [n, _, _, _] = x.dims();
        let k = self
            .momentum_projector
            .forward(self.momentum_backbone.forward(x.detach()));
        gather_kept(k.detach(), n)
    }
}

impl Method for MocoV3 {
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let ((q1, z1), (q2, _)) = (self.query(views[0].clone()), self.query(views[1].clone()));
        let (k1, k2) = (self.keys(views[0].clone()), self.keys(views[1].clone()));
        // This rank's row i is row r + i·W of the global batch: its key's column.
        let positives = local_rows(global_batch(n));
        let tau = self.temperature;
        let loss = moco_v3_loss(q1, k2, &positives, tau) + moco_v3_loss(q2, k1, &positives, tau);
        StepOutput::new(loss, vec![("z_std", embedding_std(z1))])
    }

    /// The momentum encoder follows: θk ← m·θk + (1 − m)·θq, m on its cosine schedule.
    fn after_step(mut self, _kept: Option<Tensor<2>>, progress: &Progress) -> Self {
        let m = cosine_ramp(
            progress.step,
            progress.total_steps,
            self.momentum,
            self.final_momentum,
        );
        self.momentum_backbone = ema_update(self.momentum_backbone, &self.backbone, m);
        self.momentum_projector = ema_update(self.momentum_projector, &self.projector, m);
        self
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn teacher(&self) -> Option<&Backbone> {
        Some(&self.momentum_backbone)
    }

    fn start_from(self, weights: Backbone) -> Self {
        MocoV3 {
            momentum_backbone: momentum_copy(self.momentum_backbone, &weights),
            backbone: weights,
            ..self
        }
    }
}

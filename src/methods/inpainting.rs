//! Context encoders (Pathak et al. 2016): hide a region M of the image and have a generator
//! F = decoder ∘ encoder paint it back from the rest; the encoder is the backbone learned.
//!
//!   L_rec = ||M ⊙ (x − F((1−M) ⊙ x))||²   (mean over the hidden pixels),
//!   L_adv = −log D(x̂),  x̂ = M ⊙ F((1−M) ⊙ x) + (1−M) ⊙ x,
//!   L_G   = λ_rec·L_rec + λ_adv·L_adv      (0.999 and 0.001),
//!
//! and the discriminator D, updated in alternation with its own optimiser, minimises
//! −log D(x) − log(1 − D(x̂)). The adversarial term sharpens what L2 alone paints as a blur.

use std::sync::Arc;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::softplus;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::augment::ops::MaskKind;
use crate::augment::pretext::MaskedViews;
use crate::augment::{Augment, Pipeline};
use crate::methods::Feed;
use crate::models::{
    Backbone, BackboneConfig, ContextDecoder, ContextDecoderConfig, Discriminator,
    DiscriminatorConfig,
};
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InpaintingConfig {
    pub mask: MaskKind,
    /// Fraction of the image hidden (the paper's central square: a quarter).
    pub area: f32,
    pub lambda_rec: f64,
    pub lambda_adv: f64,
    /// Channels of the decoder's and discriminator's first (last) layer.
    pub width: usize,
}

impl Default for InpaintingConfig {
    fn default() -> Self {
        InpaintingConfig {
            mask: MaskKind::Central,
            area: 0.25,
            lambda_rec: 0.999,
            lambda_adv: 0.001,
            width: 64,
        }
    }
}

impl InpaintingConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        if !(self.area > 0.0 && self.area < 1.0) {
            anyhow::bail!("method.area = {}: must lie in (0, 1)", self.area);
        }
        if self.lambda_rec < 0.0 || self.lambda_adv < 0.0 {
            anyhow::bail!("method.lambda_rec and lambda_adv cannot be negative");
        }
        feed.views(
            "inpainting",
            1,
            "it hides a region of one view of each image",
        )?;
        let view_size = feed.view_sizes[0];
        if view_size != feed.size {
            anyhow::bail!(
                "augment.views[0].size = {view_size}: inpainting paints views of augment.size = {}",
                feed.size
            );
        }
        if view_size % 8 != 0 || view_size < 8 {
            anyhow::bail!("augment.size = {view_size}: inpainting needs a multiple of 8");
        }
        Ok(())
    }

    pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        Arc::new(MaskedViews {
            base: Arc::new(base),
            kind: self.mask,
            area: self.area,
        })
    }

    pub fn init(&self, model: &BackboneConfig, size: usize, device: &Device) -> Inpainting {
        Inpainting {
            backbone: model.init(device),
            decoder: ContextDecoderConfig {
                input: model.feature_dim(),
                width: self.width,
                size,
            }
            .init(device),
            discriminator: DiscriminatorConfig {
                width: self.width,
                size,
            }
            .init(device),
            lambda_rec: self.lambda_rec,
            lambda_adv: self.lambda_adv,
            size,
        }
    }
}

#[derive(Module, Debug)]
pub struct Inpainting {
    backbone: Backbone,
    decoder: ContextDecoder,
    discriminator: Discriminator,
    lambda_rec: f64,
    lambda_adv: f64,
    size: usize,
}

impl Inpainting {
    /// F((1−M) ⊙ x): the generator's painting of the whole image from its visible part.
    pub fn paint(&self, x: Tensor<4>, mask: Tensor<4>) -> Tensor<4> {
        let visible = x * mask.neg().add_scalar(1.0);
        self.decoder.forward(self.backbone.forward(visible))
    }

    /// x̂ = M ⊙ F((1−M) ⊙ x) + (1−M) ⊙ x: the image with the hidden region painted in.
    pub fn complete(&self, x: Tensor<4>, mask: Tensor<4>) -> Tensor<4> {
        let painted = self.paint(x.clone(), mask.clone());
        painted * mask.clone() + x * mask.neg().add_scalar(1.0)
    }

    pub fn discriminator(&self) -> &Discriminator {
        &self.discriminator
    }
}

/// Mean of M ⊙ (x − y)² over the hidden entries.
pub fn masked_mse(x: Tensor<4>, y: Tensor<4>, mask: Tensor<4>) -> Tensor<1> {
    let hidden = mask.clone().sum().clamp_min(1.0);
    ((x - y).square() * mask).sum() / hidden
}

impl Method for Inpainting {
    /// `views[0]` the images, `views[1]` their masks M.
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (x, mask) = (views[0].clone(), views[1].clone());
        let painted = self.paint(x.clone(), mask.clone());
        let rec = masked_mse(x.clone(), painted.clone(), mask.clone());
        let completed = painted * mask.clone() + x.clone() * mask.neg().add_scalar(1.0);
        // −log σ(D(x̂)) = softplus(−D(x̂)), with D's weights held: G's gradient only.
        let adv = softplus(
            self.discriminator.forward_frozen(completed.clone()).neg(),
            1.0,
        )
        .mean();
        let loss =
            rec.clone().mul_scalar(self.lambda_rec) + adv.clone().mul_scalar(self.lambda_adv);
        let n = x.dims()[0];
        let keep = Tensor::cat(
            vec![
                x.reshape([n as i32, -1]),
                completed.detach().reshape([n as i32, -1]),
            ],
            1,
        );
        StepOutput {
            loss,
            scalars: vec![
                ("rec_loss", rec.into_scalar()),
                ("adv_loss", adv.into_scalar()),
            ],
            keep: Some(keep),
        }
    }

    /// D's step on the step's real images and (detached) completions: −log D(x) − log(1 − D(x̂)).
    fn auxiliary_step(
        self,
        kept: Option<&Tensor<2>>,
        lr: f64,
        optim: &mut ModuleOptimizer,
    ) -> Self {
        let Some(kept) = kept else { return self };
        let [n, both] = kept.dims();
        let s = self.size;
        let real = kept.clone().narrow(1, 0, both / 2).reshape([n, 3, s, s]);
        let fake = kept
            .clone()
            .narrow(1, both / 2, both / 2)
            .reshape([n, 3, s, s]);
        let d = &self.discriminator;
        let loss =
            softplus(d.forward(real).neg(), 1.0).mean() + softplus(d.forward(fake), 1.0).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &self);
        optim.step(lr, self, grads)
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Inpainting {
            backbone: weights,
            ..self
        }
    }
}

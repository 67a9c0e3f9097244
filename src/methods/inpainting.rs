//! Context encoders (Pathak et al. 2016): hide a region M of the image and have a generator
//! F = decoder ∘ encoder paint it back from the rest; the encoder is the backbone learned.
//!
//!   L_rec = Σ W ⊙ (x − F((1−M) ⊙ x))² / #{W > 0},
//!   L_adv = −log D(x̃),   x̃ = R ⊙ F((1−M) ⊙ x) + (1−R) ⊙ x,   R = [W > 0],
//!   L_G   = λ_rec·L_rec + λ_adv·L_adv      (0.999 and 0.001),
//!
//! and the discriminator D, updated in alternation with its own optimiser, minimises
//! −log D(x) − log(1 − D(x̃)). The adversarial term sharpens what L2 alone paints as
//! a blur (the paper's feature-learning runs used L_rec alone: `lambda_adv = 0`).
//!
//! The released code (`pathak22/context-encoder`) sets the defaults, from `train.lua` (the
//! central square): W is 1 on the hidden pixels and `overlap_weight` (10) on an `overlap`-px band
//! (4) of visible pixels around them, which F paints too; D judges F's raw output where W > 0
//! (`adversary = "output"`, the paper's Eq. 3; real pixels beyond the band, which `train.lua`
//! crops away; `"completed"` shows D x̂ = M ⊙ F + (1−M) ⊙ x instead); D learns at a tenth of G's
//! rate (`discriminator_lr`); the decoder starts from a 4000-d bottleneck over the encoder's
//! whole feature map (`bottleneck_layer`, [`Bottleneck`]). `train_random.lua` (random regions)
//! takes L_rec over the whole image (`overlap` ≥ the image side, `overlap_weight` 1), so D judges
//! F's whole raw output there.

use std::sync::Arc;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::softplus;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::augment::ops::MaskKind;
use crate::augment::pretext::MaskedViews;
use crate::augment::{Augment, Pipeline};
use crate::config::{at_least_one, not_negative, positive};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{
    Backbone, BackboneConfig, Bottleneck, ContextDecoder, ContextDecoderConfig, Discriminator,
    DiscriminatorConfig,
};
use crate::train::{Method, Progress, StepOutput};

/// What the discriminator is shown as a painting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Adversary {
    /// F((1−M) ⊙ x), the generator's raw output (the paper's Eq. 3 and the released code).
    #[default]
    Output,
    /// x̂ = M ⊙ F((1−M) ⊙ x) + (1−M) ⊙ x: the visible pixels are the real ones.
    Completed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InpaintingConfig {
    pub mask: MaskKind,
    /// Fraction of the image hidden (the paper's central square: a quarter).
    pub area: f32,
    pub lambda_rec: f64,
    pub lambda_adv: f64,
    /// Channels of the decoder's last and the discriminator's first layer.
    pub width: usize,
    pub bottleneck_layer: Bottleneck,
    /// Width of the `conv` bottleneck (the released code's `nBottleneck`: 4000).
    pub bottleneck_dim: usize,
    /// Band of visible pixels around the hidden region that F paints too, in px (`train.lua`: 4,
    /// at 128 px; the image side or more: the whole image, as `train_random.lua`).
    pub overlap: usize,
    /// Weight of the band's pixels in L_rec, the hidden ones weighing 1 (the released code: 10).
    pub overlap_weight: f64,
    pub adversary: Adversary,
    /// D's learning rate as a fraction of the schedule's (G's): the released code trains G at
    /// 10× D's rate.
    pub discriminator_lr: f64,
}

impl Default for InpaintingConfig {
    fn default() -> Self {
        InpaintingConfig {
            mask: MaskKind::Central,
            area: 0.25,
            lambda_rec: 0.999,
            lambda_adv: 0.001,
            width: 64,
            bottleneck_layer: Bottleneck::Conv,
            bottleneck_dim: 4000,
            overlap: 4,
            overlap_weight: 10.0,
            adversary: Adversary::Output,
            discriminator_lr: 0.1,
        }
    }
}

impl InpaintingConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        if !(self.area > 0.0 && self.area < 1.0) {
            anyhow::bail!("method.area = {}: must lie in (0, 1)", self.area);
        }
        for (name, value) in [
            ("lambda_rec", self.lambda_rec),
            ("lambda_adv", self.lambda_adv),
            ("overlap_weight", self.overlap_weight),
        ] {
            not_negative(&format!("method.{name}"), value)?;
        }
        if self.lambda_rec == 0.0 && self.lambda_adv == 0.0 {
            anyhow::bail!("method.lambda_rec = 0 and method.lambda_adv = 0: the loss would be 0");
        }
        positive("method.discriminator_lr", self.discriminator_lr)?;
        at_least_one("method.width", self.width)?;
        at_least_one("method.bottleneck_dim", self.bottleneck_dim)?;
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
        self.decoder(feed.model, view_size as usize).check()
    }

    pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        Arc::new(MaskedViews {
            base: Arc::new(base),
            kind: self.mask,
            area: self.area,
        })
    }

    fn decoder(&self, model: &BackboneConfig, size: usize) -> ContextDecoderConfig {
        ContextDecoderConfig {
            bottleneck: self.bottleneck_layer,
            channels: model.feature_dim(),
            grid: model.feature_grid(size),
            bottleneck_dim: self.bottleneck_dim,
            width: self.width,
            size,
        }
    }

    pub fn init(&self, model: &BackboneConfig, size: usize, device: &Device) -> Inpainting {
        Inpainting {
            backbone: model.init(device),
            decoder: self.decoder(model, size).init(device),
            discriminator: DiscriminatorConfig {
                width: self.width,
                size,
            }
            .init(device),
            lambda_rec: self.lambda_rec,
            lambda_adv: self.lambda_adv,
            overlap: self.overlap,
            overlap_weight: self.overlap_weight,
            judge_output: self.adversary == Adversary::Output,
            discriminator_lr: self.discriminator_lr,
            size,
        }
    }
}

impl MethodSpec for InpaintingConfig {
    type Method = Inpainting;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("inpainting_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        InpaintingConfig::check(self, feed)
    }

    fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        InpaintingConfig::augment(self, base)
    }

    fn init(&self, ctx: &InitContext) -> Inpainting {
        InpaintingConfig::init(self, ctx.model, ctx.size, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Inpainting {
    backbone: Backbone,
    decoder: ContextDecoder,
    discriminator: Discriminator,
    lambda_rec: f64,
    lambda_adv: f64,
    overlap: usize,
    overlap_weight: f64,
    /// D judges F's raw output (else the completion x̂).
    judge_output: bool,
    discriminator_lr: f64,
    size: usize,
}

impl Inpainting {
    /// F((1−M) ⊙ x): the generator's painting of the whole image from its visible part.
    pub fn paint(&self, x: Tensor<4>, mask: Tensor<4>) -> Tensor<4> {
        let visible = x * mask.neg().add_scalar(1.0);
        self.decoder.forward(self.backbone.feature_map(visible))
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

/// Σ W ⊙ (x − y)² / #{W > 0}: with W = M, the mean squared error over the hidden entries.
/// Over several ranks the count is the global batch's over the rank count, so that the mean of
/// the ranks' losses is the global batch's (holes differ in size from image to image).
pub fn masked_mse(x: Tensor<4>, y: Tensor<4>, weight: Tensor<4>) -> Tensor<1> {
    let count = weight.clone().greater_elem(0.0).float().sum();
    let count = crate::dist::all_reduce(count)
        .div_scalar(crate::dist::world().size() as f64)
        .clamp_min(1.0);
    ((x - y).square() * weight).sum() / count
}

/// L_rec's weights W for a mask M (`[n, c, h, w]`, 1 where hidden): 1 on the hidden pixels,
/// `band_weight` on the visible ones within `overlap` px of them (Chebyshev distance: a square
/// band around a square hole, as `train.lua`'s), 0 elsewhere. An `overlap` of the image side or
/// more reaches every visible pixel of an image with a hole (`train_random.lua`).
pub fn overlap_weights(mask: Tensor<4>, overlap: usize, band_weight: f64) -> Tensor<4> {
    let [_, _, h, w] = mask.dims();
    if overlap == 0 {
        return mask;
    }
    let grown = if overlap >= h.max(w) {
        // Every pixel lies within the image side of any hidden one.
        let [n, c, _, _] = mask.dims();
        let any = mask.clone().reshape([n, c * h * w]).max_dim(1);
        any.reshape([n, 1, 1, 1]).expand([n, c, h, w])
    } else {
        // A square dilation: a row max-pool, then a column one.
        let k = 2 * overlap + 1;
        let pool = |x: Tensor<4>, kernel: [usize; 2], padding: [(usize, usize); 2]| {
            max_pool2d(
                x,
                MaxPoolOptions {
                    kernel_size: kernel,
                    stride: [1, 1],
                    padding,
                    dilation: [1, 1],
                    ceil_mode: false,
                },
            )
        };
        let rows = pool(mask.clone(), [1, k], [(0, 0), (overlap, overlap)]);
        pool(rows, [k, 1], [(overlap, overlap), (0, 0)])
    };
    let band = grown - mask.clone();
    mask + band.mul_scalar(band_weight)
}

impl Method for Inpainting {
    /// `views[0]` the images, `views[1]` their masks M.
    fn loss(&self, views: &[Tensor<4>], _progress: &Progress) -> StepOutput {
        let (x, mask) = (views[0].clone(), views[1].clone());
        let painted = self.paint(x.clone(), mask.clone());
        let weights = overlap_weights(mask.clone(), self.overlap, self.overlap_weight);
        // D sees what G was asked to paint (W > 0) and the real image elsewhere: with L_rec
        // over the whole image, G's raw output; or the completion x̂ (real pixels around M).
        let painted_region = match self.judge_output {
            true => weights.clone().greater_elem(0.0).float(),
            false => mask,
        };
        let rec = masked_mse(x.clone(), painted.clone(), weights);
        let judged =
            painted * painted_region.clone() + x.clone() * painted_region.neg().add_scalar(1.0);
        // −log σ(D(·)) = softplus(−D(·)), with D's weights held: G's gradient only.
        let adv = softplus(self.discriminator.forward_frozen(judged.clone()).neg(), 1.0).mean();
        let loss =
            rec.clone().mul_scalar(self.lambda_rec) + adv.clone().mul_scalar(self.lambda_adv);
        let n = x.dims()[0];
        let keep = Tensor::cat(
            vec![
                x.reshape([n as i32, -1]),
                judged.detach().reshape([n as i32, -1]),
            ],
            1,
        );
        StepOutput {
            loss,
            scalars: vec![("rec_loss", rec.detach()), ("adv_loss", adv.detach())],
            keep: Some(keep),
        }
    }

    /// D's step on the step's real images and (detached) paintings, at `discriminator_lr` times
    /// the schedule's rate: −log D(x) − log(1 − D(painting)).
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
        let grads = crate::dist::average_gradients(grads, &self);
        optim.step(lr * self.discriminator_lr, self, grads)
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

//! MAE (He et al. 2022): mask a random 75% of the patches, encode only the visible ones with the
//! ViT being learned, and let a light decoder (used only in training) predict the pixels of
//! every patch from the encoded tokens and a shared mask token:
//!
//!   L = Σ_i m_i · ||pred_i − target_i||² / (P²·3) / Σ_i m_i,   m_i = 1 for masked patches,
//!
//! with `target` the patch's pixels, normalised per patch when `norm_pix_loss`. The encoder's
//! cost falls with the mask ratio: it sees a quarter of the tokens.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};

use crate::dist::{global_batch, local_share};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::kernels::layer_norm;
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{Backbone, BackboneConfig, Vit, VitBlock, LAYER_NORM_EPS};
use crate::precision;
use crate::train::{Method, Progress, StepOutput};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaeConfig {
    pub mask_ratio: f64,
    pub decoder_dim: usize,
    pub decoder_depth: usize,
    pub decoder_heads: usize,
    /// Targets normalised per patch (better representations, per the paper).
    pub norm_pix_loss: bool,
}

impl Default for MaeConfig {
    fn default() -> Self {
        MaeConfig {
            mask_ratio: 0.75,
            decoder_dim: 512,
            decoder_depth: 8,
            decoder_heads: 16,
            norm_pix_loss: true,
        }
    }
}

impl MaeConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        crate::config::fraction("method.mask_ratio", self.mask_ratio)?;
        if self.decoder_dim == 0 || self.decoder_dim % 4 != 0 {
            anyhow::bail!(
                "method.decoder_dim = {}: must be a positive multiple of 4 (its sin-cos positions give a quarter to the sine and the cosine of the row and of the column)",
                self.decoder_dim
            );
        }
        if self.decoder_heads == 0 || self.decoder_dim % self.decoder_heads != 0 {
            anyhow::bail!(
                "method.decoder_heads = {}: must divide method.decoder_dim = {}",
                self.decoder_heads,
                self.decoder_dim
            );
        }
        let BackboneConfig::Vit(vit) = feed.model else {
            anyhow::bail!("method mae needs model.arch = \"vit\"");
        };
        feed.views("mae", 1, "it masks one view of each image")?;
        if vit.registers > 0 {
            anyhow::bail!(
                "model.registers = {}: MAE's decoder takes the class token and the patches, no registers",
                vit.registers
            );
        }
        // The decoder's positions are fixed for the model's image size; the training view and
        // the reconstructions (at augment.size) go through it.
        for (key, size) in [
            ("augment.size", feed.size),
            ("augment.views[0].size", feed.view_sizes[0]),
        ] {
            if size as usize != vit.image_size {
                anyhow::bail!(
                    "model.image_size = {}: method mae's decoder has positions for {}-px images only, and {key} is {size} px",
                    vit.image_size,
                    vit.image_size
                );
            }
        }
        let patches = vit.num_patches();
        let visible = kept(self.mask_ratio, patches);
        if visible == 0 || visible == patches {
            anyhow::bail!(
                "method.mask_ratio = {}: leaves {visible} of the {patches} patches visible; MAE needs some visible and some to predict",
                self.mask_ratio
            );
        }
        Ok(())
    }

    pub fn init(&self, model: &BackboneConfig, device: &Device) -> Mae {
        let BackboneConfig::Vit(vit) = model else {
            panic!("MAE needs a ViT (checked by MaeConfig::check)")
        };
        let p = vit.patch_size;
        let d = self.decoder_dim;
        let grid = vit.image_size / p;
        let pos = sincos_2d(d, grid);
        let Backbone::Vit(encoder) = model.init(device) else {
            unreachable!("a ViT config makes a ViT")
        };
        let xavier = crate::models::xavier_linear;
        Mae {
            backbone: Backbone::Vit(encoder.mae_init(device)),
            decoder_embed: xavier(vit.dim, d, device),
            mask_token: Param::from_tensor(Tensor::random(
                [1, 1, d],
                burn::tensor::Distribution::Normal(0.0, 0.02),
                device,
            )),
            decoder_pos: Param::from_tensor(Tensor::from_data(
                TensorData::new(pos, [1, 1 + grid * grid, d]),
                device,
            ))
            .set_require_grad(false),
            decoder_blocks: (0..self.decoder_depth)
                .map(|_| crate::models::vit_block(d, self.decoder_heads, 4.0, xavier, device))
                .collect(),
            decoder_norm: LayerNormConfig::new(d)
                .with_epsilon(LAYER_NORM_EPS)
                .init(device),
            decoder_pred: xavier(d, p * p * 3, device),
            patch: p,
            mask_ratio: self.mask_ratio,
            norm_pix_loss: self.norm_pix_loss,
        }
    }
}

impl MethodSpec for MaeConfig {
    type Method = Mae;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("mae_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        MaeConfig::check(self, feed)
    }

    fn init(&self, ctx: &InitContext) -> Mae {
        MaeConfig::init(self, ctx.model, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Mae {
    backbone: Backbone,
    decoder_embed: Linear,
    mask_token: Param<Tensor<3>>,
    /// Fixed 2-D sin-cos positional embeddings `[1, 1 + L, decoder_dim]` (no gradient).
    decoder_pos: Param<Tensor<3>>,
    decoder_blocks: Vec<VitBlock>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    patch: usize,
    mask_ratio: f64,
    norm_pix_loss: bool,
}

/// Which patches each sample keeps, and how to put the sequence back in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Masking {
    /// `[n][kept]`: indices of the visible patches (the first of a random shuffle).
    pub keep: Vec<Vec<usize>>,
    /// `[n][L]`: position of each patch in the shuffled sequence (argsort of the shuffle).
    pub restore: Vec<Vec<usize>>,
    /// `[n][L]`: 1 for a masked patch, 0 for a visible one.
    pub mask: Vec<Vec<f32>>,
}

/// How many of `l` patches stay visible under a mask `ratio`: round((1 − ratio)·l).
pub fn kept(ratio: f64, l: usize) -> usize {
    ((1.0 - ratio) * l as f64).round() as usize
}

/// Per sample, argsort of uniform noise shuffles the `l` patches; the first
/// round((1 − ratio)·l) are kept.
pub fn random_masking(n: usize, l: usize, ratio: f64, rng: &mut impl Rng) -> Masking {
    let kept = kept(ratio, l);
    let (mut keep, mut restore, mut mask) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let noise: Vec<f32> = (0..l).map(|_| rng.random()).collect();
        let mut shuffle: Vec<usize> = (0..l).collect();
        shuffle.sort_by(|&a, &b| noise[a].total_cmp(&noise[b]));
        let mut back = vec![0; l];
        for (pos, &patch) in shuffle.iter().enumerate() {
            back[patch] = pos;
        }
        mask.push(back.iter().map(|&pos| (pos >= kept) as u8 as f32).collect());
        keep.push(shuffle[..kept].to_vec());
        restore.push(back);
    }
    Masking {
        keep,
        restore,
        mask,
    }
}

/// `[n, 3, H, W]` → `[n, L, p·p·3]`, patches in row-major order, pixels (row, column, channel).
pub fn patchify(x: Tensor<4>, p: usize) -> Tensor<3> {
    let [n, c, h, w] = x.dims();
    let (gh, gw) = (h / p, w / p);
    x.reshape([n, c, gh, p, gw, p])
        .permute([0, 2, 4, 3, 5, 1])
        .reshape([n, gh * gw, p * p * c])
}

/// The inverse of [`patchify`] for square images.
pub fn unpatchify(x: Tensor<3>, p: usize) -> Tensor<4> {
    let [n, l, _] = x.dims();
    let g = (l as f64).sqrt().round() as usize;
    x.reshape([n, g, g, p, p, 3])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([n, 3, g * p, g * p])
}

/// Mean squared error per patch, averaged over the masked patches only.
pub fn masked_patch_loss(pred: Tensor<3>, target: Tensor<3>, mask: Tensor<2>) -> Tensor<1> {
    let per_patch = (pred - target).square().mean_dim(2).squeeze_dim::<2>(2);
    (per_patch * mask.clone()).sum() / mask.sum().clamp_min(1.0)
}

/// Per-patch normalisation of targets: (t − mean) / √(var + 1e-6).
pub fn normalize_patches(t: Tensor<3>) -> Tensor<3> {
    let mean = t.clone().mean_dim(2);
    let var = t.clone().var(2);
    (t - mean) / (var + 1e-6).sqrt()
}

/// MAE's fixed 2-D sin-cos embeddings for a `grid`×`grid` of patches plus a zero row for the
/// class token, row-major `[1 + grid², dim]`: half the dimensions encode the column, half the row.
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let one_d = |pos: usize| -> Vec<f32> {
        let angles: Vec<f64> = (0..quarter)
            .map(|i| pos as f64 / 10000f64.powf(i as f64 / quarter as f64))
            .collect();
        let mut v: Vec<f32> = angles.iter().map(|a| a.sin() as f32).collect();
        v.extend(angles.iter().map(|a| a.cos() as f32));
        v
    };
    let mut out = vec![0.0; dim];
    for row in 0..grid {
        for col in 0..grid {
            let mut e = one_d(col);
            e.extend(one_d(row));
            e.resize(dim, 0.0);
            out.extend(e);
        }
    }
    out
}

/// Each image's tokens `rows[b]`, in that order: `[n, L, d]` → `[n, k, d]` (the official code's
/// `torch.gather` along the token axis). One row selection over the flattened batch, whose
/// backward adds whole rows back, where a gather with an index expanded over `d` would scatter
/// element by element.
fn gather_tokens(tokens: Tensor<3>, rows: &[Vec<usize>]) -> Tensor<3> {
    let [n, l, d] = tokens.dims();
    debug_assert_eq!(rows.len(), n, "one row list an image");
    let k = rows[0].len();
    let flat: Vec<i64> = (0..n)
        .flat_map(|b| rows[b].iter().map(move |&i| (b * l + i) as i64))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(flat, [n * k]), &tokens.device());
    tokens
        .reshape([n * l, d])
        .select(0, index)
        .reshape([n, k, d])
}

impl Mae {
    fn vit(&self) -> &Vit {
        match &self.backbone {
            Backbone::Vit(v) => v,
            Backbone::ResNet(_) => unreachable!("MaeConfig::check requires a ViT"),
        }
    }

    /// The encoder on the visible patches: `[n, 1 + kept, dim]` with the class token first.
    pub fn encode(&self, x: Tensor<4>, masking: &Masking) -> Tensor<3> {
        let tokens = self.vit().patch_tokens(x);
        let visible = gather_tokens(tokens, &masking.keep);
        self.vit().encode_tokens(visible).0
    }

    /// Predicted pixels of every patch `[n, L, p·p·3]` (in the target's space).
    pub fn decode(&self, encoded: Tensor<3>, masking: &Masking) -> Tensor<3> {
        let x = precision::linear(&self.decoder_embed, encoded);
        let [n, t, d] = x.dims();
        let l = masking.restore[0].len();
        let mut shuffled = vec![x.clone().narrow(1, 1, t - 1)];
        if l + 1 > t {
            shuffled.push(self.mask_token.val().expand([n, l + 1 - t, d]));
        }
        let shuffled = Tensor::cat(shuffled, 1);
        let ordered = gather_tokens(shuffled, &masking.restore);
        let mut x = Tensor::cat(vec![x.narrow(1, 0, 1), ordered], 1) + self.decoder_pos.val();
        for block in &self.decoder_blocks {
            x = block.forward(x).0;
        }
        let x = layer_norm(&self.decoder_norm, x, LAYER_NORM_EPS);
        let x = precision::linear(&self.decoder_pred, x);
        x.narrow(1, 1, l)
    }

    /// Predictions and the loss's targets (normalised per patch if `norm_pix_loss`).
    pub fn predict(&self, x: Tensor<4>, masking: &Masking) -> (Tensor<3>, Tensor<3>) {
        let target = patchify(x.clone(), self.patch);
        let target = if self.norm_pix_loss {
            normalize_patches(target)
        } else {
            target
        };
        (self.decode(self.encode(x, masking), masking), target)
    }

    pub fn patch(&self) -> usize {
        self.patch
    }

    pub fn mask_ratio(&self) -> f64 {
        self.mask_ratio
    }

    pub fn norm_pix_loss(&self) -> bool {
        self.norm_pix_loss
    }

    fn device(&self) -> Device {
        self.mask_token.val().device()
    }
}

/// The masks of step `step` for a global batch of `n` local rows on each rank: a function of
/// the step, so a resumed run draws the same, whatever the world size.
pub fn step_masking(n: usize, l: usize, ratio: f64, step: usize) -> Masking {
    random_masking(
        global_batch(n),
        l,
        ratio,
        &mut ChaCha8Rng::seed_from_u64(0x6d6165 ^ step as u64),
    )
}

impl Method for Mae {
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let x = views[0].clone();
        let [n, _, h, w] = x.dims();
        let l = (h / self.patch) * (w / self.patch);
        let masking = step_masking(n, l, self.mask_ratio, progress.step);
        // Drawn for the global batch: this rank's rows of it (crate::dist).
        let masking = Masking {
            keep: local_share(&masking.keep),
            restore: local_share(&masking.restore),
            mask: local_share(&masking.mask),
        };
        let (pred, target) = self.predict(x, &masking);
        let flat: Vec<f32> = masking.mask.concat();
        let mask = Tensor::<2>::from_data(TensorData::new(flat, [n, l]), &self.device());
        StepOutput::new(masked_patch_loss(pred, target, mask), vec![])
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Mae {
            backbone: weights,
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gather_tokens;
    use burn::tensor::{Device, Tensor, TensorData};

    /// `gather_tokens` gives what the official code's `torch.gather(x, 1, index)` gives, and its
    /// gradient is gather's: each picked token's output gradient added back to its own row, the
    /// rows not picked left at zero.
    #[test]
    fn gather_tokens_picks_each_images_rows_and_adds_their_gradients_back() {
        let device = Device::flex().autodiff();
        let (n, l, d, k) = (2, 4, 3, 3);
        let value = |b: usize, i: usize, c: usize| (100 * b + 10 * i + c) as f32;
        let x: Vec<f32> = (0..n * l * d)
            .map(|j| value(j / (l * d), j / d % l, j % d))
            .collect();
        let x = Tensor::<3>::from_data(TensorData::new(x, [n, l, d]), &device).require_grad();
        let rows = vec![vec![2, 0, 3], vec![1, 3, 2]];
        let picked = gather_tokens(x.clone(), &rows);
        let expected: Vec<f32> = (0..n)
            .flat_map(|b| {
                rows[b]
                    .iter()
                    .flat_map(move |&i| (0..d).map(move |c| value(b, i, c)))
            })
            .collect();
        let values = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(values(picked.clone()), expected);
        let w: Vec<f32> = (0..n * k * d).map(|j| j as f32 + 1.0).collect();
        let weights = Tensor::<3>::from_data(TensorData::new(w.clone(), [n, k, d]), &device);
        let grads = (picked * weights).sum().backward();
        let mut expected = vec![0.0; n * l * d];
        for (b, picks) in rows.iter().enumerate() {
            for (j, &i) in picks.iter().enumerate() {
                for c in 0..d {
                    expected[(b * l + i) * d + c] += w[(b * k + j) * d + c];
                }
            }
        }
        assert_eq!(values(x.grad(&grads).unwrap()), expected);
    }
}

//! Vision Transformer (Dosovitskiy et al. 2021) with timm's parameter names (`cls_token`,
//! `pos_embed`, `patch_embed.proj`, `blocks.0.attn.qkv`, `blocks.0.mlp.fc1`, `norm`), pre-norm
//! blocks, a class token, learned positional embeddings, and attention weights on request
//! (DINO's attention maps need the last block's). The layouts of today's released weights
//! too, as timm has them: LayerScale (`blocks.0.ls1.gamma`; CaiT, DeiT-III, DINOv2), register
//! tokens after the class token (`reg_token`; Darcet et al. 2024, DINOv2 with registers), and
//! position embeddings without a class slot (`no_embed_class`; DeiT-III, timm's DINOv2 with
//! registers).

use crate::kernels::{attention, conv2d, gelu, layer_norm};
use crate::precision;
use burn::module::{Module, Param, ParamGroup};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// ε of every layer norm in the ViT and MAE's decoder (timm's and the official MAE/DINO's).
pub const LAYER_NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    #[serde(default = "four")]
    pub mlp_ratio: f32,
    /// The features `forward` returns: the class token, or the mean of the patch tokens.
    #[serde(default)]
    pub pool: Pool,
    /// Register tokens after the class token (DINOv2 with registers: 4), learned, without
    /// position embedding, dropped from every output.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub registers: usize,
    /// LayerScale (Touvron et al. 2021, CaiT): each residual branch scaled by a learned γ per
    /// channel, starting at this value (DINOv2 1e-5, DeiT-III 1e-6); unset: no LayerScale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_scale: Option<f64>,
    /// Position embeddings for the patches only (timm's `no_embed_class`: DeiT-III, timm's
    /// DINOv2 with registers); otherwise `pos_embed` has a first row for the class token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_embed_class: bool,
    /// Start from these weights instead of a random init: a run folder or a PyTorch file
    /// (see [`BackboneConfig::weights`](crate::models::BackboneConfig::weights)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<std::path::PathBuf>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// The features a ViT returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pool {
    /// The class token after the final norm (DINO, MAE's linear probe).
    #[default]
    Cls,
    /// The mean of the normalised patch tokens (timm's `global_pool='avg'`; MAE's fine-tuning
    /// normalises the mean with a fresh `fc_norm` instead, see [`Vit::mean_patch_token`]).
    Mean,
}

fn four() -> f32 {
    4.0
}

impl VitConfig {
    /// timm's presets (dim, depth, heads): tiny 192/12/3, small 384/12/6, base 768/12/12.
    pub fn preset(name: &str, image_size: usize, patch_size: usize) -> anyhow::Result<VitConfig> {
        let (dim, depth, heads) = match name {
            "tiny" => (192, 12, 3),
            "small" => (384, 12, 6),
            "base" => (768, 12, 12),
            other => anyhow::bail!("unknown ViT preset '{other}' (known: tiny, small, base)"),
        };
        Ok(VitConfig {
            image_size,
            patch_size,
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            pool: Pool::Cls,
            registers: 0,
            layer_scale: None,
            no_embed_class: false,
            init: None,
        })
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if self.patch_size == 0 || self.image_size % self.patch_size != 0 {
            anyhow::bail!(
                "model.patch_size = {}: must divide model.image_size = {}",
                self.patch_size,
                self.image_size
            );
        }
        if self.image_size < self.patch_size {
            anyhow::bail!(
                "model.image_size = {}: smaller than one {}-px patch (model.patch_size)",
                self.image_size,
                self.patch_size
            );
        }
        for (key, value) in [("depth", self.depth), ("dim", self.dim)] {
            if value == 0 {
                anyhow::bail!("model.{key} = 0: a ViT needs at least 1");
            }
        }
        crate::config::positive("model.mlp_ratio", self.mlp_ratio)?;
        if let Some(gamma) = self.layer_scale {
            crate::config::positive("model.layer_scale", gamma)?;
        }
        if self.dim as f32 * self.mlp_ratio < 1.0 {
            anyhow::bail!(
                "model.mlp_ratio = {}: leaves the blocks' MLP of model.dim = {} no unit",
                self.mlp_ratio,
                self.dim
            );
        }
        if self.heads == 0 || self.dim % self.heads != 0 {
            anyhow::bail!(
                "model.heads = {}: must divide model.dim = {}",
                self.heads,
                self.dim
            );
        }
        Ok(())
    }

    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }

    /// Rows of `pos_embed`: one a patch, and the class token's unless `no_embed_class`.
    pub fn positions(&self) -> usize {
        self.num_patches() + usize::from(!self.no_embed_class)
    }

    pub fn init(&self, device: &Device) -> Vit {
        let blocks = (0..self.depth)
            .map(|_| {
                block(self.dim, self.heads, self.mlp_ratio, linear, device)
                    .with_layer_scale(self.layer_scale, device)
            })
            .collect();
        let norm = LayerNormConfig::new(self.dim)
            .with_epsilon(LAYER_NORM_EPS)
            .init(device);
        let p = self.patch_size;
        let trunc = Distribution::Normal(0.0, 0.02);
        Vit {
            patch_embed: PatchEmbed {
                proj: Conv2dConfig::new([3, self.dim], [p, p])
                    .with_stride([p, p])
                    .init(device),
            },
            cls_token: Param::from_tensor(Tensor::random([1, 1, self.dim], trunc, device)),
            // timm: normal_(reg_token, std=1e-6).
            reg_token: (self.registers > 0).then(|| {
                Param::from_tensor(Tensor::random(
                    [1, self.registers, self.dim],
                    Distribution::Normal(0.0, 1e-6),
                    device,
                ))
            }),
            pos_embed: Param::from_tensor(Tensor::random(
                [1, self.positions(), self.dim],
                trunc,
                device,
            )),
            blocks,
            norm,
            pool: self.pool,
            no_embed_class: self.no_embed_class,
        }
    }
}

/// Linear layers as timm and DINO initialise them: N(0, 0.02) weights (their `trunc_normal_`
/// cuts at ±2, a hundred standard deviations), zero biases.
pub(crate) fn linear(input: usize, output: usize, device: &Device) -> Linear {
    let normal = Initializer::Normal {
        mean: 0.0,
        std: 0.02,
    };
    zero_bias_linear(input, output, normal, device)
}

/// Linear layers as MAE initialises them: xavier-uniform weights, zero biases.
pub(crate) fn xavier_linear(input: usize, output: usize, device: &Device) -> Linear {
    zero_bias_linear(
        input,
        output,
        Initializer::XavierUniform { gain: 1.0 },
        device,
    )
}

/// A linear layer with `weights` drawn by the initializer and a zero, trainable bias.
pub(crate) fn zero_bias_linear(
    input: usize,
    output: usize,
    weights: Initializer,
    device: &Device,
) -> Linear {
    let mut layer = LinearConfig::new(input, output)
        .with_initializer(weights)
        .init(device);
    layer.bias = Some(Param::from_tensor(Tensor::zeros([output], device)));
    layer
}

/// One pre-norm transformer block (MAE's decoder is made of the same), its linear layers made by
/// `linear` ([`linear`] for timm's and DINO's init, [`xavier_linear`] for MAE's).
pub(crate) fn block(
    dim: usize,
    heads: usize,
    mlp_ratio: f32,
    linear: fn(usize, usize, &Device) -> Linear,
    device: &Device,
) -> VitBlock {
    let norm = || {
        LayerNormConfig::new(dim)
            .with_epsilon(LAYER_NORM_EPS)
            .init(device)
    };
    let hidden = (dim as f32 * mlp_ratio) as usize;
    VitBlock {
        norm1: norm(),
        attn: Attention {
            qkv: linear(dim, 3 * dim, device),
            proj: linear(dim, dim, device),
            heads,
        },
        norm2: norm(),
        mlp: Mlp {
            fc1: linear(dim, hidden, device),
            fc2: linear(hidden, dim, device),
        },
        ls1: None,
        ls2: None,
    }
}

/// LayerScale: a residual branch times a learned γ per channel (timm's `LayerScale`).
#[derive(Module, Debug)]
pub struct LayerScale {
    /// γ `[dim]`.
    gamma: Param<Tensor<1>>,
}

impl LayerScale {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let d = self.gamma.dims()[0];
        x * self.gamma.val().reshape([1, 1, d])
    }
}

#[derive(Module, Debug)]
pub struct PatchEmbed {
    proj: Conv2d,
}

#[derive(Module, Debug)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// Multi-head self-attention; also returns the attention weights `[n, heads, t, t]`
    /// (without a gradient on `flex` in f32: [`attention`]).
    fn forward(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (out, weights) = attention(precision::linear(&self.qkv, x), self.heads);
        (precision::linear(&self.proj, out), weights)
    }
}

#[derive(Module, Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

#[derive(Module, Debug)]
pub struct VitBlock {
    norm1: LayerNorm,
    attn: Attention,
    /// LayerScale of the attention branch (none in the original ViT).
    ls1: Option<LayerScale>,
    norm2: LayerNorm,
    mlp: Mlp,
    /// LayerScale of the MLP branch.
    ls2: Option<LayerScale>,
}

impl VitBlock {
    /// The block with LayerScale on both branches, γ starting at `init` (`None`: as it is).
    fn with_layer_scale(mut self, init: Option<f64>, device: &Device) -> Self {
        if let Some(value) = init {
            let dim = self.norm1.gamma.dims()[0];
            let scale = || LayerScale {
                gamma: Param::from_tensor(Tensor::full([dim], value, device)),
            };
            (self.ls1, self.ls2) = (Some(scale()), Some(scale()));
        }
        self
    }

    pub(crate) fn forward(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        self.forward_masked(x, None)
    }

    /// The block with each residual branch multiplied by its `[n, 1, 1]` drop-path mask.
    fn forward_masked(
        &self,
        x: Tensor<3>,
        keep: Option<&[Tensor<3>; 2]>,
    ) -> (Tensor<3>, Tensor<4>) {
        let scales = [&self.ls1, &self.ls2];
        let branch = |y: Tensor<3>, i: usize| {
            let y = match scales[i] {
                Some(ls) => ls.forward(y),
                None => y,
            };
            match keep {
                Some(masks) => y * masks[i].clone(),
                None => y,
            }
        };
        let (a, attn) = self
            .attn
            .forward(layer_norm(&self.norm1, x.clone(), LAYER_NORM_EPS));
        let x = x + branch(a, 0);
        let m = layer_norm(&self.norm2, x.clone(), LAYER_NORM_EPS);
        let m = precision::linear(&self.mlp.fc2, gelu(precision::linear(&self.mlp.fc1, m)));
        (x + branch(m, 1), attn)
    }
}

/// Stochastic depth (Huang et al. 2016) as timm's `DropPath`, for one forward pass of `n`
/// images through `depth` blocks: block i drops each image's attention and MLP branches with
/// probability p_i, rising linearly from 0 to `rate` over the blocks (DINO's and MAE's
/// `drop_path_rate`), and scales the kept ones by 1 / (1 − p_i). The masks come from `rng`, a
/// generator of the caller's (seeded by the training step, so that a resumed run draws the same).
pub fn drop_path_masks(
    n: usize,
    depth: usize,
    rate: f64,
    rng: &mut impl rand::Rng,
    device: &Device,
) -> Vec<[Tensor<3>; 2]> {
    (0..depth)
        .map(|i| {
            let p = if depth > 1 {
                rate * i as f64 / (depth - 1) as f64
            } else {
                0.0
            };
            std::array::from_fn(|_| {
                // Drawn for the global batch: this rank's rows of it (crate::dist).
                let keep: Vec<f32> = (0..crate::dist::global_batch(n))
                    .map(|_| match rng.random::<f64>() < p {
                        true => 0.0,
                        false => (1.0 / (1.0 - p)) as f32,
                    })
                    .collect();
                let keep = crate::dist::local_share(&keep);
                Tensor::<1>::from_floats(keep.as_slice(), device).reshape([n, 1, 1])
            })
        })
        .collect()
}

/// Resizes a `side × side` grid of position embeddings, `[side², d]` in row-major order, to
/// `[gh·gw, d]` as PyTorch's `F.interpolate(..., size=(gh, gw), mode="bicubic",
/// align_corners=False)` (DINO's and timm's `interpolate_pos_encoding`): one matrix product by
/// the Kronecker product of the two axes' bicubic weights, so its gradient is a matrix product
/// too on every backend (burn's CUDA backend has no bicubic `interpolate` backward).
pub fn resize_positions(pos: Tensor<2>, side: usize, [gh, gw]: [usize; 2]) -> Tensor<2> {
    let (rows, cols) = (bicubic_weights(side, gh), bicubic_weights(side, gw));
    let mut kron = vec![0.0f32; gh * gw * side * side];
    for i in 0..gh {
        for j in 0..gw {
            let row = &mut kron[(i * gw + j) * side * side..][..side * side];
            for a in 0..side {
                for b in 0..side {
                    row[a * side + b] = rows[i * side + a] * cols[j * side + b];
                }
            }
        }
    }
    let kron = Tensor::<2>::from_data(TensorData::new(kron, [gh * gw, side * side]), &pos.device());
    kron.matmul(pos)
}

/// PyTorch's bicubic resampling weights `[output, input]` along one axis: Keys' cubic
/// convolution with a = −0.75 on the four samples around (i + 0.5)·input/output − 0.5, indices
/// clamped to the edges (`upsample_bicubic2d`, align_corners = false).
fn bicubic_weights(input: usize, output: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    let scale = input as f32 / output as f32;
    let mut weights = vec![0.0; output * input];
    for i in 0..output {
        let source = (i as f32 + 0.5) * scale - 0.5;
        let x0 = source.floor();
        let t = source - x0;
        for (k, w) in [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
            .into_iter()
            .enumerate()
        {
            let j = (x0 as i64 - 1 + k as i64).clamp(0, input as i64 - 1) as usize;
            weights[i * input + j] += w;
        }
    }
    weights
}

#[derive(Module, Debug)]
pub struct Vit {
    patch_embed: PatchEmbed,
    cls_token: Param<Tensor<3>>,
    /// Register tokens `[1, registers, dim]`, if any.
    reg_token: Option<Param<Tensor<3>>>,
    /// `[1, (1 +) patches, dim]`: a class row first unless `no_embed_class`.
    pos_embed: Param<Tensor<3>>,
    blocks: Vec<VitBlock>,
    norm: LayerNorm,
    #[module(skip)]
    pool: Pool,
    #[module(skip)]
    no_embed_class: bool,
}

impl Vit {
    /// Patch tokens with their positional embeddings, `[n, patches, dim]` (no class token):
    /// MAE keeps a subset of these before the blocks. Images of another size than the model's
    /// (DINO's local crops) get the embeddings resized bicubically to their grid, as in DINO.
    pub fn patch_tokens(&self, x: Tensor<4>) -> Tensor<3> {
        let grid = conv2d(&self.patch_embed.proj, x);
        let [_, d, gh, gw] = grid.dims();
        let tokens = grid.flatten::<3>(2, 3).swap_dims(1, 2);
        let pos = self.patch_positions();
        let n = pos.dims()[1];
        let side = (n as f64).sqrt().round() as usize;
        let pos = if (gh, gw) == (side, side) {
            pos
        } else {
            resize_positions(pos.reshape([n, d]), side, [gh, gw]).reshape([1, gh * gw, d])
        };
        tokens + pos
    }

    /// The patches' rows of `pos_embed`, `[1, patches, dim]`.
    fn patch_positions(&self) -> Tensor<3> {
        let pos = self.pos_embed.val();
        let class = usize::from(!self.no_embed_class);
        let n = pos.dims()[1] - class;
        pos.narrow(1, class, n)
    }

    /// The tokens before the patches: the class token and the registers (timm's
    /// `num_prefix_tokens`).
    pub fn prefix_tokens(&self) -> usize {
        1 + self.reg_token.as_ref().map_or(0, |r| r.dims()[1])
    }

    /// Prepends the class token (and registers) and runs the blocks and final norm:
    /// `[n, prefix + l, dim]`, and the last block's attention weights
    /// `[n, heads, prefix + l, prefix + l]` ([`Self::prefix_tokens`]).
    pub fn encode_tokens(&self, tokens: Tensor<3>) -> (Tensor<3>, Tensor<4>) {
        let (x, attn) = self.run_blocks(tokens, None);
        (layer_norm(&self.norm, x, LAYER_NORM_EPS), attn)
    }

    /// Prepends the class token and runs the blocks, with stochastic depth when `keep` holds a
    /// pair of [`drop_path_masks`] per block: the tokens before the final norm, and the last
    /// block's attention weights.
    fn run_blocks(
        &self,
        tokens: Tensor<3>,
        keep: Option<&[[Tensor<3>; 2]]>,
    ) -> (Tensor<3>, Tensor<4>) {
        let mut x = self.with_cls(tokens);
        let mut last = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let (y, attn) = block.forward_masked(x, keep.map(|k| &k[i]));
            x = y;
            last = Some(attn);
        }
        (x, last.expect("a ViT has at least one block"))
    }

    /// The class token (with its position, unless `no_embed_class`) and the registers (no
    /// position) prepended to `tokens`: `[n, prefix + l, dim]`, as timm's `_pos_embed`.
    fn with_cls(&self, tokens: Tensor<3>) -> Tensor<3> {
        let [n, _, d] = tokens.dims();
        let cls = match self.no_embed_class {
            true => self.cls_token.val(),
            false => self.cls_token.val() + self.pos_embed.val().narrow(1, 0, 1),
        };
        let mut prefix = vec![cls.expand([n, 1, d])];
        if let Some(registers) = &self.reg_token {
            let r = registers.dims()[1];
            prefix.push(registers.val().expand([n, r, d]));
        }
        Tensor::cat(prefix.into_iter().chain([tokens]).collect(), 1)
    }

    /// DINO's linear-evaluation features (`eval_linear.py`, `get_intermediate_layers`): the
    /// class token of each of the last `blocks` blocks, each through the final norm,
    /// concatenated: `[n, blocks·dim]`. `blocks` = 1 is the class token `forward` pools.
    pub fn last_blocks_cls(&self, x: Tensor<4>, blocks: usize) -> Tensor<2> {
        let mut x = self.with_cls(self.patch_tokens(x));
        let first = self.blocks.len().saturating_sub(blocks);
        let mut classes = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x).0;
            if i >= first {
                let [n, _, d] = x.dims();
                let normed = layer_norm(&self.norm, x.clone().narrow(1, 0, 1), LAYER_NORM_EPS);
                classes.push(normed.reshape([n, d]));
            }
        }
        Tensor::cat(classes, 1)
    }

    /// Features `[n, dim]` (`pool`): the class token, or the mean patch token (see [`Pool`]).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.pool(self.run_blocks(self.patch_tokens(x), None).0)
    }

    /// The normalised patch tokens on their grid, `[n, dim, h/p, w/p]`.
    pub fn feature_map(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let p = self.patch_size();
        let tokens = self.encode_tokens(self.patch_tokens(x)).0;
        let [n, t, d] = tokens.dims();
        let prefix = self.prefix_tokens();
        tokens
            .narrow(1, prefix, t - prefix)
            .swap_dims(1, 2)
            .reshape([n, d, h / p, w / p])
    }

    /// [`forward`](Self::forward) in training with stochastic depth at `rate` (see
    /// [`drop_path_masks`]); `rate` 0 is `forward`.
    pub fn forward_drop_path(
        &self,
        x: Tensor<4>,
        rate: f64,
        rng: &mut impl rand::Rng,
    ) -> Tensor<2> {
        self.pool(self.blocks_dropping_paths(x, rate, rng))
    }

    /// The blocks' output tokens (before the final norm) for images `x`, with stochastic depth
    /// at `rate` (none at 0).
    fn blocks_dropping_paths(
        &self,
        x: Tensor<4>,
        rate: f64,
        rng: &mut impl rand::Rng,
    ) -> Tensor<3> {
        let n = x.dims()[0];
        let keep =
            (rate > 0.0).then(|| drop_path_masks(n, self.blocks.len(), rate, rng, &x.device()));
        self.run_blocks(self.patch_tokens(x), keep.as_deref()).0
    }

    /// The features of the blocks' output `tokens` (before the final norm): the normalised
    /// class token, or the mean of the normalised patch tokens (timm's `global_pool='avg'`
    /// without `fc_norm`; registers left out).
    fn pool(&self, tokens: Tensor<3>) -> Tensor<2> {
        let [n, t, d] = tokens.dims();
        let tokens = layer_norm(&self.norm, tokens, LAYER_NORM_EPS);
        let prefix = self.prefix_tokens();
        match self.pool {
            Pool::Cls => tokens.narrow(1, 0, 1).reshape([n, d]),
            Pool::Mean => tokens
                .narrow(1, prefix, t - prefix)
                .mean_dim(1)
                .reshape([n, d]),
        }
    }

    /// MAE's fine-tuning input to its fresh `fc_norm` (`models_vit.py`, `global_pool=True`):
    /// the mean of the patch tokens the blocks return, without the final norm, `[n, dim]`;
    /// with stochastic depth at `rate`.
    pub fn mean_patch_token(&self, x: Tensor<4>, rate: f64, rng: &mut impl rand::Rng) -> Tensor<2> {
        let tokens = self.blocks_dropping_paths(x, rate, rng);
        let [n, t, d] = tokens.dims();
        let prefix = self.prefix_tokens();
        tokens
            .narrow(1, prefix, t - prefix)
            .mean_dim(1)
            .reshape([n, d])
    }

    pub fn pool_kind(&self) -> Pool {
        self.pool
    }

    /// The patch projection frozen (no gradient): MoCo v3's `--stop-grad-conv1`, which keeps
    /// the random projection for the stability of ViT training.
    pub fn freeze_patch_embed(mut self) -> Vit {
        self.patch_embed = self.patch_embed.no_grad();
        self
    }

    /// The encoder as official MAE initialises it: positional embeddings fixed to the 2-D
    /// sin-cos table (no gradient; the class token's row zero), the patch projection xavier-uniform
    /// on its flattened `[dim, 3·p·p]` weight, every linear layer xavier-uniform with zero
    /// biases (`models_mae.py`, `initialize_weights`).
    pub fn mae_init(self, device: &Device) -> Vit {
        let [d, c, p, _] = self.patch_embed.proj.weight.dims();
        let rows = self.pos_embed.dims()[1];
        let n = self.patch_positions().dims()[1];
        let grid = (n as f64).sqrt().round() as usize;
        let bound = (6.0 / (c * p * p + d) as f64).sqrt();
        let pos = crate::methods::mae::sincos_2d(d, grid);
        let pos = &pos[(1 + n - rows) * d..];
        let mut proj = self.patch_embed.proj;
        proj.weight = Param::from_tensor(Tensor::random(
            [d, c, p, p],
            Distribution::Uniform(-bound, bound),
            device,
        ));
        let hidden = self.blocks[0].mlp.fc1.weight.dims()[1];
        let heads = self.blocks[0].attn.heads;
        Vit {
            patch_embed: PatchEmbed { proj },
            pos_embed: Param::from_tensor(
                Tensor::<1>::from_floats(pos, device).reshape([1, rows, d]),
            )
            .set_require_grad(false),
            // Fresh xavier linear layers; norms and LayerScale as they were.
            blocks: self
                .blocks
                .into_iter()
                .map(|b| VitBlock {
                    ls1: b.ls1,
                    ls2: b.ls2,
                    ..block(d, heads, hidden as f32 / d as f32, xavier_linear, device)
                })
                .collect(),
            ..self
        }
    }

    /// The same network returning other features (a linear probe on mean-pooled tokens).
    pub fn with_pool(mut self, pool: Pool) -> Self {
        self.pool = pool;
        self
    }

    pub fn patch_size(&self) -> usize {
        self.patch_embed.proj.kernel_size[0]
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// Parameter groups from shallow to deep, for layer-wise learning rates: the embeddings
    /// (patches, class token, positions), each block, the final norm.
    pub fn layer_groups(&self) -> Vec<ParamGroup> {
        let mut ids = vec![self.cls_token.id, self.pos_embed.id];
        ids.extend(self.reg_token.as_ref().map(|r| r.id));
        let embeddings =
            ParamGroup::ids_from_module(self.patch_embed.clone()).fuse(&ParamGroup::from_ids(ids));
        std::iter::once(embeddings)
            .chain(
                self.blocks
                    .iter()
                    .map(|b| ParamGroup::ids_from_module(b.clone())),
            )
            .chain(std::iter::once(ParamGroup::ids_from_module(
                self.norm.clone(),
            )))
            .collect()
    }

    /// The last block's attention weights for `x`: `[n, heads, t, t]` over the
    /// [`Self::prefix_tokens`] and then the patches.
    pub fn last_attention(&self, x: Tensor<4>) -> Tensor<4> {
        self.encode_tokens(self.patch_tokens(x)).1
    }
}

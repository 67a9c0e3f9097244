//! The context encoder's other parts: a DCGAN-style decoder that paints an image from the
//! encoder's feature map through a bottleneck, and a DCGAN-style discriminator (Pathak et al.
//! 2016; Radford et al. 2016).

use crate::kernels::{batch_norm, batch_norm_relu, conv2d};
use crate::precision;
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::leaky_relu;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

/// DCGAN's `weights_init` as the released `train.lua` applies it to G and D: convolution
/// weights N(0, 0.02) and no bias (`train.lua` zeroes every convolution's bias before each step).
const DCGAN: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// Batch norm as DCGAN's `weights_init` starts it: γ ~ N(1, 0.02), β = 0.
fn dcgan_batch_norm(channels: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(channels).init(device);
    bn.gamma = Param::from_tensor(Tensor::random(
        [channels],
        Distribution::Normal(1.0, 0.02),
        device,
    ));
    bn
}

/// A bias-free linear layer (a convolution over a whole map, as `train.lua`'s), DCGAN's init.
fn dcgan_linear(input: usize, output: usize, device: &Device) -> Linear {
    LinearConfig::new(input, output)
        .with_bias(false)
        .with_initializer(DCGAN)
        .init(device)
}

/// How the decoder starts from the encoder's feature map `[n, C, g, g]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    /// The released code (`train.lua`): a convolution over the whole map (a fully connected
    /// layer on it) to `bottleneck_dim` channels at 1×1, batch norm, LeakyReLU(0.2); then a
    /// 1×1 → `size/8` up-convolution (a fully connected layer again), batch norm, ReLU.
    #[default]
    Conv,
    /// The paper (§3.1): a channel-wise fully connected layer (each channel's g×g map to a
    /// g×g map, no mixing across channels: layout is kept, parameters stay C·g⁴), then a 1×1
    /// convolution across channels, batch norm, ReLU; up-convolutions from g on.
    ChannelWise,
    /// The map's global mean (all layout averaged away), a fully connected layer to a
    /// `size/8` square, batch norm, ReLU: a cheap variant.
    Pooled,
}

/// The context encoder's decoder: a start from the encoder's feature map ([`Bottleneck`]), then
/// ×2 up-convolutions (4×4, stride 2; batch norm and ReLU between them) to a `size`-px image;
/// DCGAN's init and no convolution biases, as `train.lua`. No final Tanh (a departure kept on
/// purpose): the painting lives in the recipe's normalised space, not in [−1, 1].
#[derive(Debug, Clone)]
pub struct ContextDecoderConfig {
    pub bottleneck: Bottleneck,
    /// Channels C and side g of the encoder's feature map.
    pub channels: usize,
    pub grid: usize,
    /// Width of the `Conv` bottleneck (the released code: 4000).
    pub bottleneck_dim: usize,
    /// Channels of the last up-convolution (doubling towards the start).
    pub width: usize,
    pub size: usize,
}

impl ContextDecoderConfig {
    /// Side of the square the up-convolutions start from: the map's for `ChannelWise`, else
    /// `size/8`.
    fn start(&self) -> usize {
        match self.bottleneck {
            Bottleneck::ChannelWise => self.grid,
            _ => self.size / 8,
        }
    }

    /// Refuses sizes the up-convolutions cannot reach: `size` must be the start side times a
    /// power of two (at least 2).
    pub fn check(&self) -> anyhow::Result<()> {
        let start = self.start();
        let ratio = (start > 0 && self.size % start == 0).then(|| self.size / start);
        match ratio {
            Some(r) if r >= 2 && r.is_power_of_two() => Ok(()),
            _ => anyhow::bail!(
                "method.bottleneck_layer: the decoder doubles a {start}-px start (the encoder's map for channel_wise, augment.size/8 otherwise) up to {} px, which needs {} = {start}·2^k",
                self.size,
                self.size
            ),
        }
    }

    /// The decoder; call [`check`](Self::check) first.
    pub fn init(&self, device: &Device) -> ContextDecoder {
        let (start, c) = (self.start(), self.width);
        let ups = (self.size / start).trailing_zeros() as usize;
        // Channels along the way: c·2^(ups−1) at the start, halving, 3 at the end.
        let widths: Vec<usize> = (0..ups).rev().map(|k| c << k).chain([3]).collect();
        let up = |i: usize, o: usize| {
            ConvTranspose2dConfig::new([i, o], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .with_bias(false)
                .with_initializer(DCGAN)
                .init(device)
        };
        let bn = |c: usize| dcgan_batch_norm(c, device);
        let (map, g) = (self.channels * self.grid * self.grid, self.grid);
        let square = widths[0] * start * start;
        let start_layer = match self.bottleneck {
            Bottleneck::Conv => Start::Conv(ConvBottleneck {
                bottleneck: dcgan_linear(map, self.bottleneck_dim, device),
                bn: bn(self.bottleneck_dim),
                fc: dcgan_linear(self.bottleneck_dim, square, device),
            }),
            Bottleneck::ChannelWise => {
                let bound = (1.0 / (g * g) as f64).sqrt();
                Start::ChannelWise(ChannelWiseFc {
                    weight: Param::from_tensor(Tensor::random(
                        [self.channels, g * g, g * g],
                        Distribution::Uniform(-bound, bound),
                        device,
                    )),
                    bias: Param::from_tensor(Tensor::zeros([self.channels, 1, g * g], device)),
                    mix: Conv2dConfig::new([self.channels, widths[0]], [1, 1]).init(device),
                })
            }
            Bottleneck::Pooled => Start::Pooled(dcgan_linear(self.channels, square, device)),
        };
        ContextDecoder {
            start_layer,
            start_bn: bn(widths[0]),
            up: widths.windows(2).map(|w| up(w[0], w[1])).collect(),
            bns: widths[1..ups].iter().map(|&c| bn(c)).collect(),
            start: [widths[0], start],
        }
    }
}

/// The layers from the feature map to the first up-convolution's input ([`Bottleneck`]).
#[derive(Module, Debug)]
enum Start {
    Conv(ConvBottleneck),
    ChannelWise(ChannelWiseFc),
    Pooled(Linear),
}

#[derive(Module, Debug)]
struct ConvBottleneck {
    bottleneck: Linear,
    bn: BatchNorm,
    fc: Linear,
}

/// One fully connected layer per channel: channel c's flattened map times `weight[c]`
/// (`[C, g², g²]`) plus `bias[c]` (`[C, 1, g²]`), then the 1×1 convolution `mix`.
#[derive(Module, Debug)]
struct ChannelWiseFc {
    weight: Param<Tensor<3>>,
    bias: Param<Tensor<3>>,
    mix: Conv2d,
}

#[derive(Module, Debug)]
pub struct ContextDecoder {
    start_layer: Start,
    start_bn: BatchNorm,
    up: Vec<ConvTranspose2d>,
    bns: Vec<BatchNorm>,
    /// Channels and side of the square the up-convolutions start from.
    start: [usize; 2],
}

impl ContextDecoder {
    /// The encoder's feature map `[n, C, g, g]` to an image `[n, 3, size, size]` (in the
    /// normalised space).
    pub fn forward(&self, map: Tensor<4>) -> Tensor<4> {
        let [n, c, g, _] = map.dims();
        let [width, side] = self.start;
        let x = match &self.start_layer {
            Start::Conv(s) => {
                let code = precision::linear(&s.bottleneck, map.reshape([n, c * g * g]));
                let code = leaky_relu(batch_norm(&s.bn, code), 0.2);
                precision::linear(&s.fc, code).reshape([n, width, side, side])
            }
            Start::ChannelWise(s) => {
                // [C, n, g²] · [C, g², g²]: one fully connected layer per channel.
                let per_channel = map.reshape([n, c, g * g]).swap_dims(0, 1);
                let mapped = precision::matmul(per_channel, s.weight.val()) + s.bias.val();
                conv2d(&s.mix, mapped.swap_dims(0, 1).reshape([n, c, g, g]))
            }
            Start::Pooled(fc) => {
                let pooled = map.mean_dims(&[2, 3]).reshape([n, c]);
                precision::linear(fc, pooled).reshape([n, width, side, side])
            }
        };
        let mut x = batch_norm_relu(&self.start_bn, x);
        for (i, up) in self.up.iter().enumerate() {
            x = precision::conv_transpose2d(up, x);
            if let Some(bn) = self.bns.get(i) {
                x = batch_norm_relu(bn, x);
            }
        }
        x
    }
}

/// Three stride-2 convolutions with leaky ReLU, then one logit (real vs painted); DCGAN's init,
/// no biases, as `train.lua`. Without its batch norm (a departure kept on purpose), so that each
/// image is judged on its own rather than against its batch.
#[derive(Debug, Clone)]
pub struct DiscriminatorConfig {
    pub width: usize,
    pub size: usize,
}

impl DiscriminatorConfig {
    pub fn init(&self, device: &Device) -> Discriminator {
        let c = self.width;
        let down = |i: usize, o: usize| {
            Conv2dConfig::new([i, o], [4, 4])
                .with_stride([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .with_bias(false)
                .with_initializer(DCGAN)
                .init(device)
        };
        let base = self.size / 8;
        Discriminator {
            convs: vec![down(3, c), down(c, 2 * c), down(2 * c, 4 * c)],
            fc: dcgan_linear(4 * c * base * base, 1, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct Discriminator {
    convs: Vec<Conv2d>,
    fc: Linear,
}

impl Discriminator {
    /// Logits `[n, 1]`: positive for "real".
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.run(x, false)
    }

    /// The same function with the weights held constant: gradients reach the input (the
    /// generator) but not the discriminator.
    pub fn forward_frozen(&self, x: Tensor<4>) -> Tensor<2> {
        self.run(x, true)
    }

    fn run(&self, mut x: Tensor<4>, frozen: bool) -> Tensor<2> {
        let hold = |t: Tensor<4>| if frozen { t.detach() } else { t };
        for conv in &self.convs {
            let options = ConvOptions::new(conv.stride, [1, 1], conv.dilation, conv.groups);
            let bias = conv.bias.as_ref().map(|b| {
                let b = b.val();
                if frozen {
                    b.detach()
                } else {
                    b
                }
            });
            let weight = hold(conv.weight.val());
            x = leaky_relu(precision::conv2d(x, weight, bias, options), 0.2);
        }
        let [n, c, h, w] = x.dims();
        let (weight, bias) = (self.fc.weight.val(), self.fc.bias.as_ref().map(|b| b.val()));
        let (weight, bias) = if frozen {
            (weight.detach(), bias.map(|b| b.detach()))
        } else {
            (weight, bias)
        };
        precision::linear_with(x.reshape([n, c * h * w]), weight, bias)
    }
}

//! The context encoder's other parts: a DCGAN-style decoder that paints an image from the
//! encoder's features, and a DCGAN-style discriminator (Pathak et al. 2016; Radford et al. 2016).

use crate::kernels::batch_norm;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{leaky_relu, relu};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Tensor};

/// Three ×2 up-convolutions from a `size/8` square: the image side must be a multiple of 8.
#[derive(Debug, Clone)]
pub struct ContextDecoderConfig {
    pub input: usize,
    /// Channels of the last up-convolution (×2, ×4 before it).
    pub width: usize,
    pub size: usize,
}

impl ContextDecoderConfig {
    pub fn init(&self, device: &Device) -> ContextDecoder {
        let c = self.width;
        let base = self.size / 8;
        let up = |i: usize, o: usize| {
            ConvTranspose2dConfig::new([i, o], [4, 4])
                .with_stride([2, 2])
                .with_padding([1, 1])
                .init(device)
        };
        ContextDecoder {
            fc: LinearConfig::new(self.input, 4 * c * base * base).init(device),
            fc_bn: BatchNormConfig::new(4 * c).init(device),
            up: vec![up(4 * c, 2 * c), up(2 * c, c), up(c, 3)],
            bns: vec![
                BatchNormConfig::new(2 * c).init(device),
                BatchNormConfig::new(c).init(device),
            ],
            width: c,
            base,
        }
    }
}

#[derive(Module, Debug)]
pub struct ContextDecoder {
    fc: Linear,
    fc_bn: BatchNorm,
    up: Vec<ConvTranspose2d>,
    bns: Vec<BatchNorm>,
    width: usize,
    base: usize,
}

impl ContextDecoder {
    /// Features `[n, input]` to an image `[n, 3, size, size]` (in the normalised space).
    pub fn forward(&self, features: Tensor<2>) -> Tensor<4> {
        let [n, _] = features.dims();
        let mut x = relu(batch_norm(
            &self.fc_bn,
            self.fc
                .forward(features)
                .reshape([n, 4 * self.width, self.base, self.base]),
        ));
        for (i, up) in self.up.iter().enumerate() {
            x = up.forward(x);
            if let Some(bn) = self.bns.get(i) {
                x = relu(batch_norm(bn, x));
            }
        }
        x
    }
}

/// Three stride-2 convolutions with leaky ReLU, then one logit (real vs painted). Without batch
/// norm, so that real and painted batches are judged independently.
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
                .init(device)
        };
        let base = self.size / 8;
        Discriminator {
            convs: vec![down(3, c), down(c, 2 * c), down(2 * c, 4 * c)],
            fc: LinearConfig::new(4 * c * base * base, 1).init(device),
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
            x = leaky_relu(
                burn::tensor::module::conv2d(x, hold(conv.weight.val()), bias, options),
                0.2,
            );
        }
        let [n, c, h, w] = x.dims();
        let (weight, bias) = (self.fc.weight.val(), self.fc.bias.as_ref().map(|b| b.val()));
        let (weight, bias) = if frozen {
            (weight.detach(), bias.map(|b| b.detach()))
        } else {
            (weight, bias)
        };
        burn::tensor::module::linear(x.reshape([n, c * h * w]), weight, bias)
    }
}

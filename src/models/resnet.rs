//! ResNet-18/34/50 (He et al. 2016) with torchvision's parameter names (`conv1`, `bn1`,
//! `layer1.0.conv1`, ...), a CIFAR stem (3×3 stride-1 conv, no max-pool)
//! or the ImageNet stem (7×7 stride-2 conv + 3×3 max-pool), and a width multiplier.

use crate::kernels::{add_relu, conv2d, split_batch_norm, split_batch_norm_relu};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stem {
    /// 3×3 stride-1 conv, no max-pool: for 32 px images.
    Cifar,
    /// 7×7 stride-2 conv + max-pool: for 224 px images.
    Imagenet,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// 18, 34 or 50.
    pub depth: usize,
    pub stem: Stem,
    /// Multiplies every channel count (64, 128, 256, 512): 0.25 gives a small CPU model.
    #[serde(default = "one")]
    pub width: f32,
    /// Start from these weights instead of a random init: a run folder or a PyTorch file
    /// (see [`BackboneConfig::weights`](crate::models::BackboneConfig::weights)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<std::path::PathBuf>,
    /// How the convolutions' weights are drawn when not loaded from `init`.
    #[serde(default, skip_serializing_if = "ConvInit::is_torchvision")]
    pub conv_init: ConvInit,
}

/// The random init of a ResNet's convolutions (batch norms start at γ = 1, β = 0 either way).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvInit {
    /// torchvision's ResNet init, which the official MoCo, BYOL, SimSiam, DINO and solo-learn
    /// code use: Kaiming normal, fan-out, gain √2 (std √(2 / (C_out·k²))).
    #[default]
    Torchvision,
    /// PyTorch's default for a bare `nn.Conv2d`: `kaiming_uniform_(a = √5)`, that is
    /// U(±1/√(C_in·k²)): a standard deviation √(6·C_in/C_out) times smaller than torchvision's
    /// (2.4× in a ResNet's blocks, 1.7× where the width doubles; the stem's is larger).
    Pytorch,
}

impl ConvInit {
    fn is_torchvision(&self) -> bool {
        *self == ConvInit::Torchvision
    }

    /// burn's initializer for it.
    fn initializer(self) -> Initializer {
        match self {
            ConvInit::Torchvision => Initializer::KaimingNormal {
                gain: 2f64.sqrt(),
                fan_out_only: true,
            },
            // burn's bound is √3 · gain / √fan_in; PyTorch's a = √5 gives gain √(2 / 6).
            ConvInit::Pytorch => Initializer::KaimingUniform {
                gain: (1.0f64 / 3.0).sqrt(),
                fan_out_only: false,
            },
        }
    }
}

fn one() -> f32 {
    1.0
}

impl ResNetConfig {
    fn blocks(&self) -> anyhow::Result<([usize; 4], bool)> {
        match self.depth {
            18 => Ok(([2, 2, 2, 2], false)),
            34 => Ok(([3, 4, 6, 3], false)),
            50 => Ok(([3, 4, 6, 3], true)),
            d => anyhow::bail!("model.depth = {d}: a ResNet has depth 18, 34 or 50"),
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        self.blocks()?;
        if !(self.width > 0.0 && self.width <= 4.0) {
            anyhow::bail!(
                "model.width = {}: the width multiplier must lie in (0, 4]",
                self.width
            );
        }
        Ok(())
    }

    /// Channels after global pooling.
    pub fn feature_dim(&self) -> usize {
        let bottleneck = self.depth == 50;
        self.channels(512) * if bottleneck { 4 } else { 1 }
    }

    fn channels(&self, base: usize) -> usize {
        ((base as f32 * self.width).round() as usize).max(1)
    }

    pub fn init(&self, device: &Device) -> ResNet {
        let (counts, bottleneck) = self.blocks().expect("checked config");
        let expansion = if bottleneck { 4 } else { 1 };
        let c0 = self.channels(64);
        let conv = |cin, cout, k, stride| conv(cin, cout, k, stride, self.conv_init, device);
        let (conv1, maxpool) = match self.stem {
            Stem::Cifar => (conv(3, c0, 3, 1), None),
            Stem::Imagenet => (
                conv(3, c0, 7, 2),
                Some(
                    MaxPool2dConfig::new([3, 3])
                        .with_strides([2, 2])
                        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                        .init(),
                ),
            ),
        };
        let mut in_ch = c0;
        let mut layer = |base: usize, count: usize, stride: usize| -> Vec<Block> {
            let width = self.channels(base);
            (0..count)
                .map(|i| {
                    let s = if i == 0 { stride } else { 1 };
                    let block = Block::new(in_ch, width, expansion, s, bottleneck, &conv, device);
                    in_ch = width * expansion;
                    block
                })
                .collect()
        };
        let layer1 = layer(64, counts[0], 1);
        let layer2 = layer(128, counts[1], 2);
        let layer3 = layer(256, counts[2], 2);
        let layer4 = layer(512, counts[3], 2);
        ResNet {
            conv1,
            bn1: BatchNormConfig::new(c0).init(device),
            maxpool,
            layer1,
            layer2,
            layer3,
            layer4,
        }
    }
}

/// A bias-free k×k convolution with padding k / 2, its weights drawn by `init`.
fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    init: ConvInit,
    device: &Device,
) -> Conv2d {
    let p = k / 2;
    Conv2dConfig::new([cin, cout], [k, k])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_bias(false)
        .with_initializer(init.initializer())
        .init(device)
}

/// The shortcut's 1×1 conv and batch norm (torchvision's `downsample.0` and `downsample.1`:
/// export renames them).
#[derive(Module, Debug)]
pub struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

/// A basic block (two 3×3 convs) or, with `conv3`, a bottleneck (1×1, 3×3 with the stride, 1×1).
#[derive(Module, Debug)]
pub struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    conv3: Option<Conv2d>,
    bn3: Option<BatchNorm>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        cin: usize,
        width: usize,
        expansion: usize,
        stride: usize,
        bottleneck: bool,
        conv: &impl Fn(usize, usize, usize, usize) -> Conv2d,
        device: &Device,
    ) -> Block {
        let cout = width * expansion;
        let bn = |c| BatchNormConfig::new(c).init(device);
        let downsample = (stride != 1 || cin != cout).then(|| Downsample {
            conv: conv(cin, cout, 1, stride),
            bn: bn(cout),
        });
        if bottleneck {
            Block {
                conv1: conv(cin, width, 1, 1),
                bn1: bn(width),
                conv2: conv(width, width, 3, stride),
                bn2: bn(width),
                conv3: Some(conv(width, cout, 1, 1)),
                bn3: Some(bn(cout)),
                downsample,
            }
        } else {
            Block {
                conv1: conv(cin, width, 3, stride),
                bn1: bn(width),
                conv2: conv(width, width, 3, 1),
                bn2: bn(width),
                conv3: None,
                bn3: None,
                downsample,
            }
        }
    }

    /// The block on `x`, batch statistics per group of `bn_splits` ([`split_batch_norm`]).
    fn forward(&self, x: Tensor<4>, bn_splits: usize) -> Tensor<4> {
        let bn = |bn: &BatchNorm, x| split_batch_norm(bn, x, bn_splits);
        let bn_relu = |bn: &BatchNorm, x| split_batch_norm_relu(bn, x, bn_splits);
        let identity = match &self.downsample {
            Some(d) => bn(&d.bn, conv2d(&d.conv, x.clone())),
            None => x.clone(),
        };
        let out = bn_relu(&self.bn1, conv2d(&self.conv1, x));
        let out = match (&self.conv3, &self.bn3) {
            (Some(conv3), Some(bn3)) => {
                let out = bn_relu(&self.bn2, conv2d(&self.conv2, out));
                bn(bn3, conv2d(conv3, out))
            }
            _ => bn(&self.bn2, conv2d(&self.conv2, out)),
        };
        add_relu(out, identity)
    }
}

#[derive(Module, Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: Option<MaxPool2d>,
    layer1: Vec<Block>,
    layer2: Vec<Block>,
    layer3: Vec<Block>,
    layer4: Vec<Block>,
}

impl ResNet {
    /// Globally pooled features, `[n, feature_dim]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.forward_split_bn(x, 1)
    }

    /// [`forward`](Self::forward) with training-mode batch statistics per group of images
    /// `i ≡ g (mod bn_splits)` (MoCo's `SplitBatchNorm`, [`split_batch_norm`]).
    pub fn forward_split_bn(&self, x: Tensor<4>, bn_splits: usize) -> Tensor<2> {
        global_pool(self.feature_map(x, bn_splits))
    }

    /// The last stage's output `[n, feature_dim, h, w]`, before the global pooling.
    pub fn feature_map(&self, x: Tensor<4>, bn_splits: usize) -> Tensor<4> {
        self.stage_output(x, 4, bn_splits)
    }

    /// The output of stage `stage` (1-4; `layer{stage}`), before pooling.
    fn stage_output(&self, x: Tensor<4>, stage: usize, bn_splits: usize) -> Tensor<4> {
        let mut x = split_batch_norm_relu(&self.bn1, conv2d(&self.conv1, x), bn_splits);
        if let Some(pool) = &self.maxpool {
            x = pool.forward(x);
        }
        let stages = [&self.layer1, &self.layer2, &self.layer3, &self.layer4];
        for block in stages.iter().take(stage.clamp(1, 4)).flat_map(|s| s.iter()) {
            x = block.forward(x, bn_splits);
        }
        x
    }

    /// The globally pooled output of stage `stage` (1-4): an intermediate stage's features, as
    /// RotNet evaluates its earlier blocks (`[n, channels of that stage]`).
    pub fn stage_features(&self, x: Tensor<4>, stage: usize) -> Tensor<2> {
        global_pool(self.stage_output(x, stage, 1))
    }
}

/// The spatial mean of `[n, c, h, w]`: `[n, c]`.
fn global_pool(x: Tensor<4>) -> Tensor<2> {
    let [n, c, _, _] = x.dims();
    x.mean_dims(&[2, 3]).reshape([n, c])
}

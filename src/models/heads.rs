//! Heads put on a backbone during pre-training.

use crate::kernels::{batch_norm, batch_norm_relu, relu};
use burn::module::{Module, Param};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};

/// An MLP projection head g(·) (or a predictor q(·)): `layers` linear layers, each but the last
/// followed by batch norm and ReLU (MoCo v2's is the same without batch norm). With
/// `batch_norm`, linear layers followed by batch norm have no bias (batch norm removes it); with
/// an `output_norm` the last one too, and its output is batch-normalised: SimCLR's head
/// (`tf2/model.py`, `LinearLayer(use_bias=False, use_bn=True)` last), SimSiam's projector.
#[derive(Debug, Clone)]
pub struct ProjectionHeadConfig {
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
    pub layers: usize,
    /// Batch norm after each hidden layer.
    pub batch_norm: bool,
    /// Batch norm on the output, and which of its affine parameters learn.
    pub output_norm: OutputNorm,
}

/// Batch norm on a head's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputNorm {
    /// None: the last linear layer's output, with its bias.
    Off,
    /// None, and no bias on the last linear layer either (MoCo v3's ResNet predictor: its
    /// `_build_mlp` makes every linear layer with `bias=False`).
    OffUnbiased,
    /// A learned scale γ, no shift (β fixed at 0): SimCLR's head.
    NoShift,
    /// Neither γ nor β (`BatchNorm1d(dim, affine=False)`): SimSiam's projector.
    Plain,
}

impl ProjectionHeadConfig {
    /// One linear layer (a classifier, MoCo v1's projection).
    pub fn linear(input: usize, output: usize) -> Self {
        ProjectionHeadConfig {
            input,
            hidden: 0,
            output,
            layers: 1,
            batch_norm: false,
            output_norm: OutputNorm::Off,
        }
    }

    /// `layers` linear layers with batch norm and ReLU between them, then `output_norm`: the
    /// projectors and predictors of BYOL, SimSiam, Barlow Twins, VICReg and MoCo v3.
    pub fn mlp(
        input: usize,
        hidden: usize,
        output: usize,
        layers: usize,
        output_norm: OutputNorm,
    ) -> Self {
        ProjectionHeadConfig {
            input,
            hidden,
            output,
            layers,
            batch_norm: true,
            output_norm,
        }
    }

    pub fn init(&self, device: &Device) -> ProjectionHead {
        let dims: Vec<usize> = std::iter::once(self.input)
            .chain(std::iter::repeat_n(
                self.hidden,
                self.layers.saturating_sub(1),
            ))
            .chain(std::iter::once(self.output))
            .collect();
        let last = dims.len() - 2;
        ProjectionHead {
            layers: dims
                .windows(2)
                .enumerate()
                .map(|(i, d)| {
                    let unbiased = if i == last {
                        self.output_norm != OutputNorm::Off
                    } else {
                        self.batch_norm
                    };
                    LinearConfig::new(d[0], d[1])
                        .with_bias(!unbiased)
                        .init(device)
                })
                .collect(),
            norms: if self.batch_norm {
                dims[1..dims.len() - 1]
                    .iter()
                    .map(|&d| BatchNormConfig::new(d).init(device))
                    .collect()
            } else {
                vec![]
            },
            output_norm: match self.output_norm {
                OutputNorm::Off | OutputNorm::OffUnbiased => None,
                OutputNorm::NoShift => {
                    let mut bn = BatchNormConfig::new(self.output).init(device);
                    bn.beta = frozen(Tensor::zeros([self.output], device));
                    Some(bn)
                }
                OutputNorm::Plain => Some(plain_batch_norm(self.output, device)),
            },
        }
    }
}

/// Batch norm of `dim` channels without affine parameters (γ = 1 and β = 0, not learned):
/// PyTorch's `BatchNorm1d(dim, affine=False)`.
pub fn plain_batch_norm(dim: usize, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(dim).init(device);
    bn.gamma = frozen(Tensor::ones([dim], device));
    bn.beta = frozen(Tensor::zeros([dim], device));
    bn
}

fn frozen(x: Tensor<1>) -> Param<Tensor<1>> {
    Param::from_tensor(x).set_require_grad(false)
}

#[derive(Module, Debug)]
pub struct ProjectionHead {
    layers: Vec<Linear>,
    norms: Vec<BatchNorm>,
    /// Batch norm of the output (SimCLR's without β, SimSiam's without γ and β).
    output_norm: Option<BatchNorm>,
}

impl ProjectionHead {
    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = crate::precision::linear(layer, x);
            if i < last {
                x = match self.norms.get(i) {
                    Some(bn) => batch_norm_relu(bn, x),
                    None => relu(x),
                };
            }
        }
        match &self.output_norm {
            Some(bn) => batch_norm(bn, x),
            None => x,
        }
    }
}

/// DINO's head: a 3-layer MLP with GELU (in → hidden → hidden → bottleneck), l2-normalisation,
/// then a weight-normalised linear layer to K outputs, W = g · v/‖v‖ per output; with
/// `norm_last_layer` the scale g is fixed to 1 (the official default, for stability).
#[derive(Debug, Clone)]
pub struct DinoHeadConfig {
    pub input: usize,
    pub hidden: usize,
    pub bottleneck: usize,
    pub out_dim: usize,
    pub norm_last_layer: bool,
    /// Batch norm after each hidden layer (the official `use_bn_in_head`): it spreads a ResNet's
    /// similar, all-positive features apart; without it our short ResNet runs drifted to a
    /// uniform teacher.
    pub batch_norm: bool,
}

impl DinoHeadConfig {
    pub fn init(&self, device: &Device) -> DinoHead {
        let linear = |i: usize, o: usize| crate::models::vit_linear(i, o, device);
        // The official head initialises its MLP (N(0, 0.02), zero biases) before making the last
        // layer, which keeps PyTorch's default Linear init, U(±1/√bottleneck).
        let bound = 1.0 / (self.bottleneck as f64).sqrt();
        let v = burn::module::Param::from_tensor(Tensor::random(
            [self.bottleneck, self.out_dim],
            burn::tensor::Distribution::Uniform(-bound, bound),
            device,
        ));
        DinoHead {
            mlp: vec![
                linear(self.input, self.hidden),
                linear(self.hidden, self.hidden),
                linear(self.hidden, self.bottleneck),
            ],
            norms: if self.batch_norm {
                (0..2)
                    .map(|_| BatchNormConfig::new(self.hidden).init(device))
                    .collect()
            } else {
                Vec::new()
            },
            last_v: v,
            last_g: (!self.norm_last_layer)
                .then(|| burn::module::Param::from_tensor(Tensor::ones([self.out_dim], device))),
        }
    }
}

#[derive(Module, Debug)]
pub struct DinoHead {
    mlp: Vec<Linear>,
    norms: Vec<BatchNorm>,
    /// `[bottleneck, K]`: the direction of each output's weight vector.
    last_v: burn::module::Param<Tensor<2>>,
    last_g: Option<burn::module::Param<Tensor<1>>>,
}

impl DinoHead {
    /// Logits `[n, K]`. With `freeze_last`, the last layer's weights are held constant (DINO
    /// freezes them during the first epoch).
    pub fn forward(&self, x: Tensor<2>, freeze_last: bool) -> Tensor<2> {
        let last = self.mlp.len() - 1;
        let mut x = x;
        for (i, layer) in self.mlp.iter().enumerate() {
            x = crate::precision::linear(layer, x);
            if i < last {
                if let Some(bn) = self.norms.get(i) {
                    x = batch_norm(bn, x);
                }
                x = crate::kernels::gelu(x);
            }
        }
        let x = crate::losses::l2_normalize(x);
        let v = self.last_v.val();
        let v = v.clone() / v.square().sum_dim(0).sqrt().clamp_min(1e-12);
        let mut w = match &self.last_g {
            Some(g) => v * g.val().unsqueeze::<2>(),
            None => v,
        };
        if freeze_last {
            w = w.detach();
        }
        crate::precision::linear_with(x, w, None)
    }
}

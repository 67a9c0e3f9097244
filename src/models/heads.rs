//! Heads put on a backbone during pre-training.

use burn::module::Module;
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

/// An MLP projection head g(·): `layers` linear layers, each but the last followed by batch
/// norm and ReLU (SimCLR's head; MoCo v2's is the same without batch norm).
#[derive(Debug, Clone)]
pub struct ProjectionHeadConfig {
    pub input: usize,
    pub hidden: usize,
    pub output: usize,
    pub layers: usize,
    pub batch_norm: bool,
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
                    LinearConfig::new(d[0], d[1])
                        .with_bias(i == last || !self.batch_norm)
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
        }
    }
}

#[derive(Module, Debug)]
pub struct ProjectionHead {
    layers: Vec<Linear>,
    norms: Vec<BatchNorm>,
}

impl ProjectionHead {
    pub fn forward(&self, mut x: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if i < last {
                if let Some(bn) = self.norms.get(i) {
                    x = bn.forward(x);
                }
                x = relu(x);
            }
        }
        x
    }
}

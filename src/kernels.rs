//! Fused CPU kernels for the ops that dominate a training step on the `flex` backend, plugged in
//! through burn's own backend extension (`#[backend_extension]`), not a fork of burn.
//!
//! burn 0.22 runs training-mode batch norm on `flex` as its generic composition: the activation
//! is transposed and copied to put channels first, and the mean, the variance, the normalisation
//! and, backwards, eight more whole-tensor ops each read and write it again. [`batch_norm`] reads
//! the activation once for the statistics and once for the output (twice backwards), in parallel
//! over the batch. Every other backend, and every dtype but f32, takes burn's own op; the
//! results are the same within float rounding (`tests/kernels.rs` pins values and gradients to
//! burn's op within 1e-5).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    backend_extension, Autodiff, AutodiffBackend, Backend, DType, Dispatch, DispatchDevice, Flex,
    TensorMetadata,
};
use burn::nn::BatchNorm;
use burn::tensor::{Bytes, Shape, Tensor};
use rayon::prelude::*;

/// The fused ops, implemented for `flex` and, with their backward passes, for autodiff over it.
#[backend_extension(Flex, Autodiff)]
pub trait CpuKernels: Backend {
    /// Training-mode batch norm over dim 1 of `x` (`[N, C, ...]`): (output, batch mean `[C]`,
    /// biased batch variance `[C]`), as burn's `ModuleOps::batch_norm_train`.
    fn batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients (x, gamma, beta) of [`CpuKernels::batch_norm_train`] given its output's, as
    /// burn's `ModuleOps::batch_norm_train_backward`.
    fn batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// Whether `device` computes on `flex` (with or without autodiff), where the fused kernels run.
fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// `bn.forward(x)` with the fused kernels on `flex`: in training (an autodiff device and a
/// trainable layer) the batch statistics normalise `x` and update the running ones with the
/// layer's momentum, exactly as burn's `BatchNorm::forward_train`; otherwise burn's own forward.
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let device = x.device();
    if !(device.is_autodiff() && bn.training.is_enabled() && on_flex(&device)) {
        return bn.forward(x);
    }
    let (output, mean, variance) = <Dispatch as CpuKernels>::batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    let momentum = bn.momentum;
    let update = |running: Tensor<1>, batch: Tensor<1>| {
        running
            .to_device(&device)
            .mul_scalar(1.0 - momentum)
            .add(batch.detach().mul_scalar(momentum))
            .detach()
    };
    bn.running_mean.update(update(
        bn.running_mean.value_sync(),
        Tensor::from_dispatch(mean),
    ));
    bn.running_var.update(update(
        bn.running_var.value_sync(),
        Tensor::from_dispatch(variance),
    ));
    Tensor::from_dispatch(output)
}

/// An f32 tensor of `shape` holding `values`.
fn flex_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// The f32 values of a flex tensor, in row-major order.
fn values(x: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match x.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(x.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

/// (N, C, spatial size) of a `[N, C, ...]` activation.
fn batch_channels(x: &FlexTensor) -> (usize, usize, usize) {
    let shape = x.shape();
    let (n, c) = (shape[0], shape[1]);
    (n, c, shape.num_elements() / (n * c).max(1))
}

/// Per-channel sums (Σa, Σa·b) over N and the spatial positions of two `[N, C, S]` arrays, in
/// f64, summed in parallel over the batch.
fn channel_sums(a: &[f32], b: &[f32], c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let zeros = || (vec![0f64; c], vec![0f64; c]);
    a.par_chunks(c * s)
        .zip(b.par_chunks(c * s))
        .fold(zeros, |(mut sa, mut sab), (a, b)| {
            for ch in 0..c {
                let (a, b) = (&a[ch * s..(ch + 1) * s], &b[ch * s..(ch + 1) * s]);
                let (mut x, mut xy) = (0f32, 0f32);
                for (a, b) in a.iter().zip(b) {
                    x += a;
                    xy += a * b;
                }
                sa[ch] += x as f64;
                sab[ch] += xy as f64;
            }
            (sa, sab)
        })
        .reduce(zeros, |(mut sa, mut sab), (ta, tab)| {
            for ch in 0..c {
                sa[ch] += ta[ch];
                sab[ch] += tab[ch];
            }
            (sa, sab)
        })
}

/// `out = a·x + b·y + d` per channel over `[N, C, S]` arrays (`y` may be omitted), in parallel
/// over the batch.
fn channel_affine(x: &[f32], y: Option<&[f32]>, coef: &[[f32; 3]], c: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(c * s).enumerate().for_each(|(n, out)| {
        for ch in 0..c {
            let [a, b, d] = coef[ch];
            let range = n * c * s + ch * s..n * c * s + (ch + 1) * s;
            let out = &mut out[ch * s..(ch + 1) * s];
            match y {
                Some(y) => {
                    for ((o, x), y) in out.iter_mut().zip(&x[range.clone()]).zip(&y[range]) {
                        *o = a * x + b * y + d;
                    }
                }
                None => {
                    for (o, x) in out.iter_mut().zip(&x[range]) {
                        *o = a * x + d;
                    }
                }
            }
        }
    });
    out
}

impl CpuKernels for Flex {
    fn batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        if x.dtype() != DType::F32 || x.shape().num_dims() < 2 || x.shape().num_elements() == 0 {
            let r = <Flex as ModuleOps<Flex>>::batch_norm_train(x, gamma, beta, epsilon);
            return (r.output, r.mean, r.variance);
        }
        let (n, c, s) = batch_channels(&x);
        let shape = x.shape();
        let xs = values(&x);
        let (gamma, beta) = (values(&gamma), values(&beta));
        let (sum, sum_sq) = channel_sums(&xs, &xs, c, s);
        let count = (n * s) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let variance: Vec<f64> = sum_sq
            .iter()
            .zip(&mean)
            .map(|(sq, m)| (sq / count - m * m).max(0.0))
            .collect();
        let coef: Vec<[f32; 3]> = (0..c)
            .map(|ch| {
                let scale = gamma[ch] as f64 / (variance[ch] + epsilon).sqrt();
                [
                    scale as f32,
                    0.0,
                    (beta[ch] as f64 - mean[ch] * scale) as f32,
                ]
            })
            .collect();
        let output = channel_affine(&xs, None, &coef, c, s);
        let per_channel =
            |v: Vec<f64>| flex_tensor(v.into_iter().map(|v| v as f32).collect(), Shape::new([c]));
        (
            flex_tensor(output, shape),
            per_channel(mean),
            per_channel(variance),
        )
    }

    fn batch_norm_train_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        if x.dtype() != DType::F32 || x.shape().num_dims() < 2 || x.shape().num_elements() == 0 {
            let r = <Flex as ModuleOps<Flex>>::batch_norm_train_backward(
                x,
                gamma,
                mean,
                variance,
                epsilon,
                output_grad,
            );
            return (r.x_grad, r.gamma_grad, r.beta_grad);
        }
        let (n, c, s) = batch_channels(&x);
        let shape = x.shape();
        let (xs, dy) = (values(&x), values(&output_grad));
        let (gamma, mean, variance) = (values(&gamma), values(&mean), values(&variance));
        // Σdy and Σdy·x per channel give β's and γ's gradients (Σdy·x̂ = (Σdy·x − μΣdy)/σ).
        let (sum_dy, sum_dy_x) = channel_sums(&dy, &xs, c, s);
        let count = (n * s) as f64;
        let mut gamma_grad = vec![0f32; c];
        let coef: Vec<[f32; 3]> = (0..c)
            .map(|ch| {
                let (mu, inv_std) = (
                    mean[ch] as f64,
                    1.0 / (variance[ch] as f64 + epsilon).sqrt(),
                );
                let dy_xhat = (sum_dy_x[ch] - mu * sum_dy[ch]) * inv_std;
                gamma_grad[ch] = dy_xhat as f32;
                // dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂)) = a·dy + b·x + d.
                let a = gamma[ch] as f64 * inv_std;
                let b = -a * inv_std * dy_xhat / count;
                let d = -a * sum_dy[ch] / count - b * mu;
                [a as f32, b as f32, d as f32]
            })
            .collect();
        let x_grad = channel_affine(&dy, Some(&xs), &coef, c, s);
        let beta_grad = sum_dy.iter().map(|&v| v as f32).collect();
        (
            flex_tensor(x_grad, shape),
            flex_tensor(gamma_grad, Shape::new([c])),
            flex_tensor(beta_grad, Shape::new([c])),
        )
    }
}

impl<B: Backend + CpuKernels, C: CheckpointStrategy> CpuKernels for Autodiff<B, C> {
    fn batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        /// The backward step: burn's own for batch norm, with the fused kernel.
        #[derive(Debug)]
        struct BatchNormBackward;

        impl<B: Backend + CpuKernels> Backward<B, 3> for BatchNormBackward {
            /// (x, γ) as checkpointed nodes, the batch mean and variance, ε.
            type State = (NodeId, NodeId, FloatTensor<B>, FloatTensor<B>, f64);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, gamma, mean, variance, epsilon) = ops.state;
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x);
                let gamma = checkpointer.retrieve_node_output::<FloatTensor<B>>(gamma);
                let (x_grad, gamma_grad, beta_grad) = <B as CpuKernels>::batch_norm_train_backward(
                    x, gamma, mean, variance, epsilon, grad,
                );
                for (node, grad) in [
                    (node_x, x_grad),
                    (node_gamma, gamma_grad),
                    (node_beta, beta_grad),
                ] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        let statistic = <Self as AutodiffBackend>::from_inner;
        match BatchNormBackward
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let (output, mean, variance) = <B as CpuKernels>::batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let state = (
                    x_state,
                    gamma_state,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                (
                    prep.finish(state, output),
                    statistic(mean),
                    statistic(variance),
                )
            }
            OpsKind::UnTracked(prep) => {
                let (output, mean, variance) = <B as CpuKernels>::batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (prep.finish(output), statistic(mean), statistic(variance))
            }
        }
    }

    fn batch_norm_train_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        panic!("batch norm's backward pass has no gradient of its own (as in burn)")
    }
}

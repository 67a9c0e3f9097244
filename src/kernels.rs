//! Fused CPU kernels for the ops that dominate a training step on the `flex` backend, plugged in
//! through burn's own backend extension (`#[backend_extension]`), not a fork of burn.
//!
//! - [`conv2d`]: burn 0.22's `flex` convolution copies every input to channels-last on one thread
//!   before its parallel im2col + gemm, and takes its gradients through generic fallbacks (the
//!   weight gradient a convolution of transposed copies, the input gradient a transposed
//!   convolution): in a ResNet step, the copies and the idle second core cost more than the
//!   arithmetic. Here forward and both gradients are gemms on the NCHW layout, in parallel over
//!   the batch, with no copies to channels-last: at stride 1 one gemm a kernel tap reading the
//!   zero-padded image in place (on narrow layers sums held in registers instead, [`direct`]),
//!   else Caffe's im2col + gemm, with several images' columns side by side in one product
//!   where the output grid is small (a ResNet's 4-8 px stages), and the weight gradient as one
//!   product over the batch where the weights outweigh the columns. On AVX-512, layers of 32 to
//!   128 channels on grids of up to 16×16 (outputs in whole vectors of 16, kernels other than
//!   1×1) run channels-last instead, summed in registers with the output channels along the
//!   lanes ([`blocked`]); their gradients too where the stride and dilation are 1.
//! - [`batch_norm`] (and MoCo's [`split_batch_norm`]): burn runs training-mode batch norm as its generic composition (the
//!   activation transposed and copied to put channels first, then mean, variance and the
//!   normalisation, and backwards eight more whole-tensor ops, each reading and writing it). Here
//!   one pass gives the statistics and one the output (two backwards), in parallel over the batch.
//!   [`batch_norm_relu`] fuses the ReLU after it into those passes (a ResNet's `relu(bn(x))`).
//! - [`layer_norm`] and [`gelu`], the element-wise work of a ViT block: burn's autodiff runs
//!   layer norm as a composition of a dozen whole-tensor ops, and `flex` runs GELU with a
//!   scalar `erf` per element, both on one thread below 256K elements (a ViT-Tiny block at
//!   batch 64). Here each is one parallel pass forward and one backward, GELU's `erf` by
//!   Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7).
//! - [`attention`]: burn runs a ViT's attention as copies of the qkv projection (reshape,
//!   permute, narrow), two batched matmuls, a softmax and a copy back, each a whole-tensor pass
//!   with its own backward. Here one pass over each image's heads, reading q, k and v in place
//!   with strided products, and one pass back from the kept softmax weights.
//! - [`linear`]: burn-flex allocates every matmul's output zero-filled and then copies it
//!   (its `Bytes` takes a `Vec<u8>` and re-aligns it), adds the bias in another pass and sums
//!   the bias gradient on one thread. Here gemm writes onto the bias rows of the output, and
//!   the gradients are two gemms into fresh buffers and a threaded column sum.
//! - [`relu`] and [`add_relu`] (a ResNet block's `relu(out + identity)`): burn-flex runs ReLU,
//!   its backward and the residual add on the calling thread at any size, the other core idle.
//!   Here one parallel pass each way, burn's bits.
//! - [`log_softmax`] (every cross-entropy: MoCo's `[n, 1 + K]` logits against its queue,
//!   NT-Xent, DINO's head): burn composes it of five whole-tensor ops and its backward of about
//!   four, whose `exp` ran on the calling thread in a profile of MoCo. Here one parallel pass
//!   over the rows each way, the backward from the kept output.
//!
//! - [`adamw_step`]: burn's AdamW updates each parameter with thirteen whole-tensor ops, each
//!   on one thread below 256K values (every tensor of a ViT-Tiny). Here one parallel pass
//!   updates the parameter and its moments in place, with the same f32 arithmetic; [`ema`]
//!   does the same for a momentum teacher's update.
//!
//! Inside a bf16 autocast on a CPU with a bf16 engine (Intel AMX, or AVX-512 BF16 as on AMD Zen
//! 4), [`conv2d`], [`linear`] and [`attention`] keep these kernels and compute their products in
//! bf16 summed in f32, forward and backward
//! ([`Products`], [`crate::bf16`]); inside any other autocast they take burn's ops in its dtype.
//!
//! Every other backend, and every dtype but f32, takes burn's own op (for AdamW, [`crate::train::optim::FusedAdamW`]
//! takes burn's `AdamW`); the results are the same
//! within float rounding (`tests/kernels.rs` pins values and gradients to burn's ops within 1e-5).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::{ActivationOps, ConvOptions, FloatTensorOps, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    backend_extension, Autodiff, AutodiffBackend, Backend, DType, Dispatch, DispatchDevice, Flex,
    TensorMetadata,
};
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, LayerNorm, PaddingConfig2d};
use burn::tensor::{Bytes, Shape, Tensor};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

mod blocked;
mod direct;

/// The fused ops, implemented for `flex` and, with their backward passes, for autodiff over it.
/// The `*_backward` ops are the inner backend's: autodiff calls them from its backward steps
/// and never differentiates them (their default body, which autodiff keeps, is unreachable).
#[backend_extension(Flex, Autodiff)]
pub trait CpuKernels: Backend {
    /// 2-D convolution without bias, one group: `x` `[N, C, H, W]`, `weight` `[Co, C, kh, kw]`,
    /// `geometry` its stride, padding and dilation; output `[N, Co, OH, OW]`.
    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self>;

    /// Gradients (x, weight) of [`CpuKernels::conv2d`] given its output's.
    fn conv2d_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
        _geometry: ConvGeometry,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// GELU, x·Φ(x) with the exact Gaussian CDF (PyTorch's default, not the tanh form).
    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient of [`CpuKernels::gelu`] at `x` given its output's.
    fn gelu_backward(_x: FloatTensor<Self>, _output_grad: FloatTensor<Self>) -> FloatTensor<Self> {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// ReLU, max(x, 0) with NaN kept (burn-flex's and PyTorch's `relu`).
    fn relu(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `relu(x + y)` for `x` and `y` of one shape: the end of a ResNet block, in one pass.
    fn add_relu(x: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient through a ReLU given its `output` and the output's gradient: the gradient
    /// where the output is positive or NaN, 0 elsewhere (burn-flex's `relu_backward`).
    fn relu_backward(
        _output: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// Log softmax over the last dim of an f32 tensor `[..., c]`: each row's
    /// x − max − ln Σ exp(x − max), the sum in f64.
    fn log_softmax(x: FloatTensor<Self>) -> FloatTensor<Self>;

    /// The gradient through [`CpuKernels::log_softmax`] given its `output` y and the output's
    /// gradient g: g − exp(y)·Σ g, row by row.
    fn log_softmax_backward(
        _output: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// `x · weight + bias` over the last dim of `x` (`[..., k]`), `weight` `[k, n]`, `bias`
    /// `[n]`: output `[..., n]`, as burn's `linear`.
    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        products: Products,
    ) -> FloatTensor<Self>;

    /// Gradients (x, weight, bias) of [`CpuKernels::linear`] given its output's.
    fn linear_backward(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
        _products: Products,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// One AdamW update of a parameter `w` from its gradient `g` and moments `moment_1`,
    /// `moment_2` (all of one shape): the new (w, moment_1, moment_2). Not differentiable.
    fn adamw_step(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// `teacher·m + student·(1 − m)` element-wise (both of one shape). Not differentiable.
    fn ema(teacher: FloatTensor<Self>, student: FloatTensor<Self>, m: f64) -> FloatTensor<Self>;

    /// Layer norm over the last dim of `x` (`[..., D]`): (output, mean, variance), the last two
    /// per row `[rows]`.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients (x, gamma, beta) of [`CpuKernels::layer_norm`] given its output's.
    fn layer_norm_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

    /// Multi-head self-attention from the qkv projection `[n, t, 3·d]` (timm's layout: q, then
    /// k, then v, each `heads` × d/heads): (softmax(q kᵀ · `scale`) v with the heads side by
    /// side `[n, t, d]`, the softmax weights `[n, heads, t, t]`). Only the first output carries
    /// a gradient.
    fn attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        products: Products,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// The gradient of the qkv projection of [`CpuKernels::attention`], given its weights and
    /// its first output's gradient.
    fn attention_backward(
        _qkv: FloatTensor<Self>,
        _weights: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
        _heads: usize,
        _scale: f64,
        _products: Products,
    ) -> FloatTensor<Self> {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }

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
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }
    /// [`CpuKernels::batch_norm_train`] with a ReLU on its output in the same pass (a ResNet's
    /// `relu(bn(x))`): (output, batch mean, biased batch variance), the statistics in f64 where
    /// x is f32. Its backward pass recomputes the ReLU's mask from x and these statistics, so
    /// that no pass of its own reads or writes the activation.
    fn batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// Gradients (x, gamma, beta) of [`CpuKernels::batch_norm_relu_train`] given its output's.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_train_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        unreachable!("autodiff computes a backward pass on its inner backend, never on itself")
    }
}

/// Whether `device` computes on `flex` (with or without autodiff), where the fused kernels run.
pub fn on_flex(device: &burn::tensor::Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        DispatchDevice::Flex(_)
    )
}

/// How the fused kernels' matrix products compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Products {
    /// f32 operands and sums (`gemm`).
    #[default]
    F32,
    /// bf16 operands summed in f32 by AMX or AVX-512 BF16 ([`crate::bf16`]), an autocast to bf16
    /// on a CPU that has either; a product too small to gain ([`bf16_pays`]) stays f32.
    Bf16,
}

impl Products {
    /// The products for an op on `device` under this thread's autocast: f32 outside one, bf16
    /// inside a bf16 one where a bf16 engine is available; `None` where the fused kernels do not run
    /// (another backend, or an autocast they cannot follow: then burn's ops in its dtype).
    pub fn for_device(device: &burn::tensor::Device) -> Option<Products> {
        use crate::precision::Precision;
        if !on_flex(device) {
            return None;
        }
        match crate::precision::current() {
            Precision::F32 => Some(Products::F32),
            Precision::Bf16 if crate::bf16::available() => Some(Products::Bf16),
            _ => None,
        }
    }
}

/// Stride, padding and dilation of a 2-D convolution, in pixels: `padding` is
/// (top, left, bottom, right), as burn's `PaddingConfig2d::Explicit`; and its products.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvGeometry {
    pub stride: [usize; 2],
    pub padding: [usize; 4],
    pub dilation: [usize; 2],
    pub products: Products,
}

impl ConvGeometry {
    /// Output (height, width) for an input of (h, w) and a kernel of (kh, kw); `None` when the
    /// kernel does not fit.
    fn output_size(&self, [h, w]: [usize; 2], [kh, kw]: [usize; 2]) -> Option<[usize; 2]> {
        let [top, left, bottom, right] = self.padding;
        let size = |len: usize, pad: usize, k: usize, stride: usize, dilation: usize| {
            let span = dilation * (k - 1) + 1;
            (len + pad >= span).then(|| (len + pad - span) / stride + 1)
        };
        Some([
            size(h, top + bottom, kh, self.stride[0], self.dilation[0])?,
            size(w, left + right, kw, self.stride[1], self.dilation[1])?,
        ])
    }

    /// burn's options for the same convolution (for the fallback).
    fn options(&self) -> ConvOptions<2> {
        let [top, left, bottom, right] = self.padding;
        ConvOptions::new_with_padding(
            self.stride,
            [(top, bottom), (left, right)],
            self.dilation,
            1,
        )
    }
}

/// `conv.forward(x)` (`x` `[N, C, H, W]`) with the fused kernels on `flex`, for one-group
/// convolutions with explicit or no padding ([`Products`]); burn's own forward otherwise, in the
/// autocast's dtype inside one ([`crate::precision`]).
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Same => return conv.forward(x),
    };
    let products = Products::for_device(&x.device());
    let geometry = ConvGeometry {
        stride: conv.stride,
        padding,
        dilation: conv.dilation,
        products: products.unwrap_or_default(),
    };
    if products.is_none() || conv.groups != 1 || x.dtype() != burn::tensor::DType::F32 {
        let mut options = geometry.options();
        options.groups = conv.groups;
        let bias = conv.bias.as_ref().map(|b| b.val());
        return crate::precision::conv2d(x, conv.weight.val(), bias, options);
    }
    let output = Tensor::<4>::from_dispatch(<Dispatch as CpuKernels>::conv2d(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        geometry,
    ));
    match &conv.bias {
        Some(bias) => output + bias.val().reshape([1, -1, 1, 1]),
        None => output,
    }
}

/// `bn.forward(x)` with the fused kernels on `flex`: in training (an autodiff device and a
/// trainable layer) the batch statistics normalise `x` and update the running ones with the
/// layer's momentum, exactly as burn's `BatchNorm::forward_train`; otherwise burn's own forward.
pub fn batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    split_batch_norm(bn, x, 1)
}

/// [`batch_norm`] with statistics per group in training, as the MoCo CIFAR demo's
/// `SplitBatchNorm`: image `i` of `x` (`[N, C, ...]`) is normalised with the images `j ≡ i (mod
/// groups)`, in one pass (`x` viewed as `[N/groups, groups·C, ...]`, γ and β shared by the
/// groups), and the running statistics follow the groups' mean statistics. Outside training
/// it is plain batch norm with the running statistics. `N` must be a multiple of `groups`
/// (recipes check it); otherwise the whole batch is one group.
pub fn split_batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>, groups: usize) -> Tensor<D> {
    normalise(bn, x, groups, false)
}

/// `relu(batch_norm(bn, x))` (a ResNet's and a projection head's activation), in training on
/// `flex` one fused op ([`CpuKernels::batch_norm_relu_train`]): the ReLU in batch norm's output
/// pass, and backwards its mask recomputed inside batch norm's passes, where `relu` after
/// `batch_norm` reads and writes the whole activation once more each way.
pub fn batch_norm_relu<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    split_batch_norm_relu(bn, x, 1)
}

/// [`batch_norm_relu`] with [`split_batch_norm`]'s groups.
pub fn split_batch_norm_relu<const D: usize>(
    bn: &BatchNorm,
    x: Tensor<D>,
    groups: usize,
) -> Tensor<D> {
    normalise(bn, x, groups, true)
}

/// [`split_batch_norm`], with `relu` a ReLU after it ([`split_batch_norm_relu`]).
fn normalise<const D: usize>(bn: &BatchNorm, x: Tensor<D>, groups: usize, relu: bool) -> Tensor<D> {
    let activation = |x: Tensor<D>| match relu {
        true => self::relu(x),
        false => x,
    };
    let device = x.device();
    if !(device.is_autodiff() && bn.training.is_enabled()) {
        return activation(bn.forward(x));
    }
    let dims = x.dims();
    let world = crate::dist::world().size();
    if world > 1 && groups <= 1 && crate::dist::pieces().sync_batch_norm {
        return activation(sync_batch_norm(bn, x));
    }
    // Across W ranks, each holding rows r, r+W, ... of the global batch, the global groups
    // (i mod groups) are the local groups (k mod groups/W) when W divides `groups` (recipes
    // check it): no communication but the running statistics'.
    let groups = match groups > 1 && groups.is_multiple_of(world) {
        true => groups / world,
        false => groups,
    };
    let groups = match groups > 1 && dims[0] % groups == 0 {
        true => groups,
        false => 1,
    };
    let mut grouped = dims;
    grouped[0] /= groups;
    grouped[1] *= groups;
    let (x, gamma, beta) = (
        x.reshape(grouped),
        bn.gamma.val().repeat_dim(0, groups),
        bn.beta.val().repeat_dim(0, groups),
    );
    let (output, mean, variance) = match on_flex(&device) {
        true => {
            let op = match relu {
                true => <Dispatch as CpuKernels>::batch_norm_relu_train,
                false => <Dispatch as CpuKernels>::batch_norm_train,
            };
            let (output, mean, variance) = op(
                x.into_dispatch(),
                gamma.into_dispatch(),
                beta.into_dispatch(),
                bn.epsilon,
            );
            // The fused batch norm + ReLU returns its statistics in f64.
            let statistic = |t| Tensor::<1>::from_dispatch(t).cast(burn::tensor::FloatDType::F32);
            (
                Tensor::<D>::from_dispatch(output),
                statistic(mean),
                statistic(variance),
            )
        }
        false => {
            let r = burn::tensor::module::batch_norm_train(x, gamma, beta, bn.epsilon);
            (activation(r.output), r.mean, r.variance)
        }
    };
    let (momentum, c) = (bn.momentum, dims[1]);
    let update = |running: Tensor<1>, batch: Tensor<1>| {
        let batch = batch.detach().reshape([groups, c]).mean_dim(0).reshape([c]);
        // The mean over every rank's groups: the same running statistics on every rank.
        let batch = crate::dist::all_reduce(batch).div_scalar(world as f64);
        running
            .to_device(&device)
            .mul_scalar(1.0 - momentum)
            .add(batch.mul_scalar(momentum))
            .detach()
    };
    bn.running_mean
        .update(update(bn.running_mean.value_sync(), mean));
    bn.running_var
        .update(update(bn.running_var.value_sync(), variance));
    output.reshape(dims)
}

/// Batch norm over the global batch of every rank (synchronised BN, SimCLR's `global_bn`):
/// statistics and backward sums over every rank's rows, in f64 ([`crate::dist::sync_batch_norm`]),
/// so that the forward and backward passes equal one process's over the global batch; the
/// running statistics follow the global ones on every rank.
fn sync_batch_norm<const D: usize>(bn: &BatchNorm, x: Tensor<D>) -> Tensor<D> {
    let (output, mean, variance) =
        crate::dist::sync_batch_norm(x, bn.gamma.val(), bn.beta.val(), bn.epsilon);
    let device = output.device();
    let update = |running: Tensor<1>, batch: Tensor<1>| {
        running
            .to_device(&device)
            .mul_scalar(1.0 - bn.momentum)
            .add(batch.detach().mul_scalar(bn.momentum))
            .detach()
    };
    bn.running_mean
        .update(update(bn.running_mean.value_sync(), mean));
    bn.running_var
        .update(update(bn.running_var.value_sync(), variance));
    output
}

/// `x · weight + bias` (`x` `[..., k]`, `weight` `[k, n]`, `bias` `[n]`): output `[..., n]`,
/// as `burn::tensor::module::linear`. On `flex` (in f32, or in a bf16 autocast with a bf16 engine:
/// [`Products`]) one threaded gemm writes the product
/// onto the bias rows of the output, and the backward pass is two gemms into fresh buffers and
/// a threaded column sum ([`CpuKernels::linear`]); burn's own path zero-fills each product's
/// buffer and copies it once more, then adds the bias and sums its gradient on one thread.
/// Elsewhere burn's `linear`, in the autocast's dtype inside one ([`crate::precision::cast_linear`]).
pub fn linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    let [k, n] = weight.dims();
    let f32s = [
        Some(x.dtype()),
        Some(weight.dtype()),
        bias.as_ref().map(|b| b.dtype()),
    ]
    .into_iter()
    .flatten()
    .all(|t| t == burn::tensor::DType::F32);
    let products = Products::for_device(&x.device());
    let fused =
        f32s && D >= 2 && x.dims()[D - 1] == k && bias.as_ref().is_none_or(|b| b.dims() == [n]);
    let Some(products) = products.filter(|_| fused) else {
        return crate::precision::cast_linear(x, weight, bias);
    };
    // Without a bias, a constant zero one: its gradient is computed but reaches no parameter.
    let bias = bias.unwrap_or_else(|| Tensor::zeros([n], &x.device()));
    Tensor::from_dispatch(<Dispatch as CpuKernels>::linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        products,
    ))
}

/// The scalars of one AdamW update (Loshchilov & Hutter; burn's `AdamW`, PyTorch's `AdamW`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// The learning rate.
    pub lr: f64,
    /// β1, the first moment's decay.
    pub beta_1: f32,
    /// β2, the second moment's decay.
    pub beta_2: f32,
    /// ε, added to the root of the corrected second moment.
    pub epsilon: f32,
    /// Decoupled weight decay: w ← w·(1 − lr·weight_decay) before the update.
    pub weight_decay: f32,
    /// The update's number, from 1 (the moments' bias correction; at 1 the moments passed in
    /// are not read).
    pub time: usize,
}

impl AdamWStep {
    /// burn's `AdamW` update of one value w with gradient g and moments (m, v), in its order
    /// of f32 operations, so the same bits:
    /// m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², w ← w·(1 − lr·λ) − lr·m̂/(√v̂ + ε) with
    /// m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ).
    fn update(&self) -> impl Fn(&mut f32, f32, &mut f32, &mut f32) + Sync {
        let (b1, b2, eps) = (self.beta_1, self.beta_2, self.epsilon);
        let (f1, f2) = (1.0 - b1, 1.0 - b2);
        let time = self.time as i32;
        let (c1, c2) = (1f32 - b1.powi(time), 1f32 - b2.powi(time));
        let decay = self.lr * self.weight_decay as f64;
        let keep = (decay != 0.0).then_some((1.0 - decay) as f32);
        let lr = self.lr as f32;
        let first = self.time == 1;
        move |w, g, m, v| {
            // The first step has no moments: burn's (1−β)·g, not β·0 + (1−β)·g, which would
            // turn a −0 into +0.
            (*m, *v) = match first {
                true => (g * f1, g * g * f2),
                false => (*m * b1 + g * f1, *v * b2 + g * g * f2),
            };
            let delta = (*m / c1) / ((*v / c2).sqrt() + eps);
            let decayed = keep.map_or(*w, |keep| *w * keep);
            *w = decayed - delta * lr;
        }
    }
}

/// One AdamW update of `w` (gradient `g`, moments `moment_1` and `moment_2`, all f32 of one
/// shape on `flex`, outside autodiff): the new (w, moment_1, moment_2), from one parallel pass
/// that updates them in place ([`AdamWStep::update`]: burn's `AdamW`, bit for bit). burn's own
/// update is thirteen whole-tensor ops, each on one thread below 256K values.
///
/// # Panics
/// If the four differ in shape or are not f32 tensors on `flex`.
pub fn adamw_step<const D: usize>(
    w: Tensor<D>,
    g: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let shape = w.dims();
    assert!(
        [&g, &moment_1, &moment_2].iter().all(|t| t.dims() == shape),
        "adamw_step: the parameter, its gradient and its moments differ in shape"
    );
    let (w, m, v) = <Dispatch as CpuKernels>::adamw_step(
        w.into_dispatch(),
        g.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(w),
        Tensor::from_dispatch(m),
        Tensor::from_dispatch(v),
    )
}

/// A momentum teacher's update θt·m + θs·(1 − m) (MoCo, BYOL, DINO), without gradient: on `flex`
/// in f32 one parallel pass in place, with burn's f32 arithmetic (the same bits); elsewhere
/// burn's two scaled tensors and their sum (three whole-tensor ops; burn-flex runs such ops on
/// one thread, which is why `flex` takes the kernel).
///
/// # Panics
/// If `teacher` and `student` differ in shape.
pub fn ema<const D: usize>(teacher: Tensor<D>, student: Tensor<D>, m: f64) -> Tensor<D> {
    assert_eq!(
        teacher.dims(),
        student.dims(),
        "ema: teacher and student differ in shape"
    );
    let fused = [teacher.dtype(), student.dtype()]
        .iter()
        .all(|t| *t == burn::tensor::DType::F32)
        && on_flex(&teacher.device());
    let (teacher, student) = (teacher.detach(), student.detach());
    match fused {
        true => Tensor::from_dispatch(<Dispatch as CpuKernels>::ema(
            teacher.into_dispatch(),
            student.into_dispatch(),
            m,
        )),
        false => teacher.mul_scalar(m) + student.mul_scalar(1.0 - m),
    }
}

/// GELU (exact), with the fused kernel on `flex`, burn's `gelu` elsewhere.
pub fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match on_flex(&x.device()) {
        true => Tensor::from_dispatch(<Dispatch as CpuKernels>::gelu(x.into_dispatch())),
        false => burn::tensor::activation::gelu(x),
    }
}

/// ReLU with the fused kernel on `flex` (one parallel pass each way: burn-flex runs its
/// element-wise ops on the calling thread, which left the other core idle through each ReLU of
/// a ResNet), burn's `relu` elsewhere.
pub fn relu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match on_flex(&x.device()) {
        true => Tensor::from_dispatch(<Dispatch as CpuKernels>::relu(x.into_dispatch())),
        false => burn::tensor::activation::relu(x),
    }
}

/// `relu(x + y)` (a ResNet block's residual sum and activation): one fused pass each way on
/// `flex` when `x` and `y` have one shape, burn's `relu(x + y)` otherwise.
pub fn add_relu<const D: usize>(x: Tensor<D>, y: Tensor<D>) -> Tensor<D> {
    match on_flex(&x.device()) && x.dims() == y.dims() {
        true => Tensor::from_dispatch(<Dispatch as CpuKernels>::add_relu(
            x.into_dispatch(),
            y.into_dispatch(),
        )),
        false => burn::tensor::activation::relu(x + y),
    }
}

/// Log softmax over the last dim, with the fused kernel on `flex` for f32 (the rows in parallel,
/// one pass each way), burn's `log_softmax` elsewhere. Same values as burn's within float
/// rounding (`tests/kernels.rs`), not the same bits.
pub fn log_softmax<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    match on_flex(&x.device()) && x.dtype() == DType::F32 && x.dims()[D - 1] > 0 {
        true => Tensor::from_dispatch(<Dispatch as CpuKernels>::log_softmax(x.into_dispatch())),
        false => burn::tensor::activation::log_softmax(x, D - 1),
    }
}

/// `ln.forward(x)` with the fused kernel on `flex`. burn keeps a `LayerNorm`'s ε private, so the
/// caller passes the ε it built the layer with.
pub fn layer_norm<const D: usize>(ln: &LayerNorm, x: Tensor<D>, epsilon: f64) -> Tensor<D> {
    let d = x.dims()[D - 1];
    let f32s = [x.dtype(), ln.gamma.val().dtype()]
        .iter()
        .all(|t| *t == burn::tensor::DType::F32);
    let fits = d > 0 && ln.gamma.dims() == [d] && f32s && on_flex(&x.device());
    let Some(beta) = ln.beta.as_ref().filter(|_| fits) else {
        return ln.forward(x);
    };
    let (output, _, _) = <Dispatch as CpuKernels>::layer_norm(
        x.into_dispatch(),
        ln.gamma.val().into_dispatch(),
        beta.val().into_dispatch(),
        epsilon,
    );
    Tensor::from_dispatch(output)
}

/// Multi-head self-attention of a ViT block from its qkv projection `[n, t, 3·d]` (timm's
/// `Attention`: q, k and v, each `heads` heads of d/heads, scale (d/heads)^−½): (the heads'
/// outputs side by side `[n, t, d]`, before the output projection; the softmax weights
/// `[n, heads, t, t]`). On `flex` in f32 ([`Products`]) one fused kernel each way
/// ([`CpuKernels::attention`]: no copies of q, k, v or the output, the weights kept for the
/// backward pass, no gradient through them); elsewhere burn's composition in the autocast's
/// precision.
pub fn attention(qkv: Tensor<3>, heads: usize) -> (Tensor<3>, Tensor<4>) {
    let [n, t, d3] = qkv.dims();
    let (d, dh) = (d3 / 3, d3 / (3 * heads).max(1));
    let scale = (dh as f64).powf(-0.5);
    let fused =
        qkv.dtype() == burn::tensor::DType::F32 && dh > 0 && d3 == 3 * heads * dh && n * t > 0;
    if let Some(products) = Products::for_device(&qkv.device()).filter(|_| fused) {
        let (out, weights) =
            <Dispatch as CpuKernels>::attention(qkv.into_dispatch(), heads, scale, products);
        return (Tensor::from_dispatch(out), Tensor::from_dispatch(weights));
    }
    let qkv = qkv.reshape([n, t, 3, heads, dh]).permute([2, 0, 3, 1, 4]);
    let q = qkv.clone().narrow(0, 0, 1).reshape([n, heads, t, dh]);
    let k = qkv.clone().narrow(0, 1, 1).reshape([n, heads, t, dh]);
    let v = qkv.narrow(0, 2, 1).reshape([n, heads, t, dh]);
    let scores = crate::precision::matmul(q, k.swap_dims(2, 3)).mul_scalar(scale);
    let weights = burn::tensor::activation::softmax(scores, 3);
    let out = crate::precision::matmul(weights.clone(), v)
        .swap_dims(1, 2)
        .reshape([n, t, d]);
    (out, weights)
}

/// Softmax of each row of `t` values, in place.
fn softmax_rows(x: &mut [f32], t: usize) {
    widest(
        #[inline(always)]
        || {
            for row in x.chunks_mut(t) {
                let (_, sum) = shifted_exps(row);
                let inverse = (1.0 / sum) as f32;
                row.iter_mut().for_each(|v| *v *= inverse);
            }
        },
    )
}

/// A row's values v replaced, in place, by exp(v − max): returns (max, Σ exp(v − max) in f64),
/// softmax's and log softmax's shared first steps.
#[inline(always)]
fn shifted_exps(row: &mut [f32]) -> (f32, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    (max, row.iter().map(|&v| v as f64).sum())
}

/// eˣ in f32 without branches or calls, so that loops over it vectorise: Cephes' `expf`
/// (eˣ = 2ⁿ·eʳ, n = round(x·log₂e), |r| ≤ ln2/2, a degree-6 polynomial; within 1 ulp of eˣ
/// on [−87.3, 88.3], where 2ⁿ is a normal f32). Below −87.3 it gives 0 (eˣ would be subnormal:
/// flushed, as with FTZ), above 88.3 +∞ (early: f32's range ends at 88.72); NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOW: f32 = -87.3;
    const HIGH: f32 = 88.3;
    // Adding 1.5·2²³ rounds to an integer held in the low bits of the sum (|n| < 2²²).
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(LOW, HIGH);
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // r = x − n·ln2 (x clamped) with ln2 in two parts (0.693359375 − 2.12194440e-4), exact first product.
    let r = clamped - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let e_r = p * (r * r) + r + 1.0;
    // n + 127 in the exponent field. n may be negative: wrapping operations, since the dev
    // profile's overflow checks would panic on the u32 difference and stop the loop vectorising.
    let two_n = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127)
        << 23;
    let y = e_r * f32::from_bits(two_n);
    // Selects, not branches.
    let y = if x < LOW { 0.0 } else { y };
    if x > HIGH {
        f32::INFINITY
    } else {
        y
    }
}

/// The widest vector instructions [`widest`] may use: 2 AVX-512, 1 AVX2, 0 the baseline.
static VECTOR_WIDTH_LIMIT: AtomicU8 = AtomicU8::new(2);

/// Caps the vector instructions of the element-wise kernels and the direct convolution for the
/// whole process (2 AVX-512, 1 AVX2, 0 the x86-64 baseline; the direct convolution needs AVX2
/// and takes it at 0 too), so that a test can check every path gives the same bits. Below 2 it
/// also turns off the channels-last convolution ([`blocked`], AVX-512 only), whose layers then
/// take the other paths: other bits, within float rounding.
#[doc(hidden)]
pub fn limit_vector_width(level: u8) {
    VECTOR_WIDTH_LIMIT.store(level, Ordering::Relaxed);
}

/// The cap [`limit_vector_width`] set (2 unless a test set it).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn vector_width_limit() -> u8 {
    VECTOR_WIDTH_LIMIT.load(Ordering::Relaxed)
}

/// Runs `f` compiled for the widest vector instructions this CPU has (AVX-512, else AVX2), so
/// the element-wise loops inlined into it run 16 or 8 lanes wide, not the x86-64 baseline's 4.
/// The operations and their order are the same on every path (Rust never fuses a·b + c on its
/// own), so the bits do not depend on the CPU.
#[inline(always)]
fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        let limit = vector_width_limit();
        if limit >= 2 && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { avx512(f) };
        }
        if limit >= 1 && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// erf(z) by Abramowitz & Stegun 7.1.26 (|error| ≤ 1.5e-7), with exp(−z²) passed in.
#[inline(always)]
fn erf(z: f32, exp_minus_z2: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_minus_z2).copysign(z)
}

/// Whether ReLU passes `x` (and its gradient) through: x > 0 or NaN, as burn-flex's and
/// PyTorch's ReLU, which keep NaN (`f32::max` would drop it).
#[inline(always)]
fn relu_passes(x: f32) -> bool {
    x.is_nan() || x > 0.0
}

/// ReLU of one value.
#[inline(always)]
fn relu_of(x: f32) -> f32 {
    if relu_passes(x) {
        x
    } else {
        0.0
    }
}

/// Values per parallel task of the element-wise kernels (64 KB of f32: a core's L2 holds a few).
const CHUNK: usize = 16 * 1024;

/// `len` zeros, written by parallel tasks of [`CHUNK`] values. The kernels' outputs are
/// activation-sized (MB); zeroing one with `vec!` (a memset unless the allocator hands out
/// fresh pages) ran on the calling thread while the other core waited for the parallel op that
/// followed: 3-4% of a ViT step's wall time (`perf record -a` of `train_throughput --case`,
/// the milliseconds where one core idled). The convolutions skip even this pass: see
/// [`zeroed`].
fn zeros(len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(CHUNK)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the tasks above initialised all `len` values.
    unsafe { out.set_len(len) };
    out
}

/// Zeroes `part` of an output's spare capacity and hands it back as values. A task zeroes
/// each image's part right before writing it, so the zeros stay in cache: a zeroing pass over
/// the whole output first ([`zeros`]) went out to memory and back, 7.7% of the CPU time of a
/// narrow ResNet's step (`perf record --call-graph dwarf` of `selfsup pretrain --recipe
/// recipes/simclr_cifar10_cpu.toml` on the Zen 4 host; its outputs are 4-17 MB a layer).
fn zeroed(part: &mut [std::mem::MaybeUninit<f32>]) -> &mut [f32] {
    part.fill(std::mem::MaybeUninit::new(0.0));
    // SAFETY: every value of `part` was just initialised; MaybeUninit<f32> has f32's layout.
    unsafe { &mut *(part as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) }
}

/// Element-wise `f` over f32 values in parallel chunks (sizes fit a core's L1/L2 cache).
///
/// # Panics
/// If `y` is not as long as `x`.
fn map_parallel(x: &[f32], y: Option<&[f32]>, f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    assert!(
        y.is_none_or(|y| y.len() == x.len()),
        "map_parallel: operands of different lengths"
    );
    let mut out = Vec::with_capacity(x.len());
    // Written once, never zeroed first.
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, out)| {
            let x = &x[i * CHUNK..i * CHUNK + out.len()];
            widest(
                #[inline(always)]
                || match y {
                    Some(y) => {
                        let y = &y[i * CHUNK..i * CHUNK + out.len()];
                        for ((o, x), y) in out.iter_mut().zip(x).zip(y) {
                            o.write(f(*x, *y));
                        }
                    }
                    None => {
                        for (o, x) in out.iter_mut().zip(x) {
                            o.write(f(*x, 0.0));
                        }
                    }
                },
            )
        });
    // SAFETY: the tasks above wrote all x.len() values.
    unsafe { out.set_len(x.len()) };
    out
}

/// `f` element-wise over `x` (and `y`, of `x`'s shape) into a new tensor of `x`'s shape, by
/// [`map_parallel`]; `None` unless both are f32 of one shape, where the caller takes burn-flex's
/// own op (which also broadcasts).
fn elementwise(
    x: &FlexTensor,
    y: Option<&FlexTensor>,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Option<FlexTensor> {
    let f32s = |t: &FlexTensor| t.dtype() == DType::F32;
    let fits = f32s(x) && y.is_none_or(|y| f32s(y) && y.shape() == x.shape());
    if !fits {
        return None;
    }
    let y = y.map(values);
    Some(flex_tensor(
        map_parallel(&values(x), y.as_deref(), f),
        x.shape(),
    ))
}

/// An f32 tensor of `shape` holding `values`.
fn flex_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// `x` with its values alone in one contiguous buffer from offset 0 (copied when not), so
/// that `storage_mut` updates exactly its values in row-major order (and in place when the
/// buffer is not shared).
fn owned(x: FlexTensor) -> FlexTensor {
    let n = x.shape().num_elements();
    let whole = x.layout().contiguous_offsets() == Some((0, n)) && x.storage::<f32>().len() == n;
    match whole {
        true => x,
        false => x.to_contiguous(),
    }
}

/// The f32 values of a flex tensor, in row-major order.
fn values(x: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match x.as_slice::<f32>() {
        Some(slice) => std::borrow::Cow::Borrowed(slice),
        None => std::borrow::Cow::Owned(x.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

/// Whether the fused batch norm takes `x` and its per-channel `params`: all f32, `x` of rank
/// ≥ 2 and not empty, each parameter of the channel count (dim 1).
fn fused_batch_norm<const P: usize>(x: &FlexTensor, params: [&FlexTensor; P]) -> bool {
    let shape = x.shape();
    shape.num_dims() >= 2
        && shape.num_elements() > 0
        && x.dtype() == DType::F32
        && params
            .iter()
            .all(|p| p.dtype() == DType::F32 && p.shape().num_elements() == shape[1])
}

/// (N, C, spatial size) of a `[N, C, ...]` activation.
fn batch_channels(x: &FlexTensor) -> (usize, usize, usize) {
    let shape = x.shape();
    let (n, c) = (shape[0], shape[1]);
    (n, c, shape.num_elements() / (n * c).max(1))
}

/// Per-channel sums (Σa, Σa·(b − shift_c)) over N and the spatial positions of two `[N, C, S]`
/// arrays, accumulated in f64: one partial sum per image in parallel, added in image order (the
/// same result on every run, whatever thread took which image), each compiled for the widest
/// vectors ([`widest`]: 8 f64 lanes on AVX-512, 2 on the x86-64 baseline). Subtracting the
/// known mean in the product keeps a variance exact when the mean is large against the spread.
/// With `relu` (the coefficients of a fused batch norm + ReLU's forward pass), `a` counts only
/// where that forward's output `relu(affine(b))` passed ([`bn_relu_passes`]): its backward.
fn channel_sums(
    a: &[f32],
    b: &[f32],
    shift: &[f64],
    relu: Option<&[[f64; 4]]>,
    c: usize,
    s: usize,
) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<Vec<[f64; 2]>> = a
        .par_chunks(c * s)
        .zip(b.par_chunks(c * s))
        .map(|(a, b)| {
            widest(
                #[inline(always)]
                || {
                    // A plain loop: an iterator's `fold` would be a function of its own,
                    // compiled without the caller's vector width.
                    let mut image = Vec::with_capacity(c);
                    for ch in 0..c {
                        let (a, b) = (&a[ch * s..(ch + 1) * s], &b[ch * s..(ch + 1) * s]);
                        image.push(match relu {
                            Some(coef) => {
                                sums_where(a, b, shift[ch], |b| bn_relu_passes(coef[ch], b))
                            }
                            None => sums(a, b, shift[ch]),
                        });
                    }
                    image
                },
            )
        })
        .collect();
    let (mut sa, mut sab) = (vec![0f64; c], vec![0f64; c]);
    for image in partials {
        for (ch, [x, xy]) in image.into_iter().enumerate() {
            sa[ch] += x;
            sab[ch] += xy;
        }
    }
    (sa, sab)
}

/// (Σ a, Σ a·(b − `shift`)) in f64, as 8 interleaved partial sums added in a fixed order: one
/// dependent chain of f64 additions waits on each one's latency (it took 7% of a narrow
/// ResNet's step).
#[inline(always)]
fn sums(a: &[f32], b: &[f32], shift: f64) -> [f64; 2] {
    sums_where(a, b, shift, |_| true)
}

/// [`sums`] over the positions where `keep(b)`.
#[inline(always)]
fn sums_where(a: &[f32], b: &[f32], shift: f64, keep: impl Fn(f32) -> bool) -> [f64; 2] {
    const LANES: usize = 8;
    let (mut x, mut xy) = ([0f64; LANES], [0f64; LANES]);
    let mut add = |l: usize, a: f32, b: f32| {
        let a = if keep(b) { a } else { 0.0 };
        x[l] += a as f64;
        xy[l] += a as f64 * (b as f64 - shift);
    };
    let (a_lanes, b_lanes) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a_lanes.remainder(), b_lanes.remainder());
    for (a, b) in a_lanes.zip(b_lanes) {
        for l in 0..LANES {
            add(l, a[l], b[l]);
        }
    }
    for (l, (&a, &b)) in a_rest.iter().zip(b_rest).enumerate() {
        add(l, a, b);
    }
    [x.iter().sum(), xy.iter().sum()]
}

/// Adds up per-task partial sums in task order, so that a parallel reduction gives the same
/// bits on every run; in parallel chunks of [`CHUNK`] (a ResNet-18's last weight gradient is
/// 2.4M values a task).
fn sum_in_order(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut total = vec![0f32; len];
    total
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, total)| {
            for partial in &partials {
                let partial = &partial[i * CHUNK..i * CHUNK + total.len()];
                total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
            }
        });
    total
}

/// The transpose `[cols, rows]` of the row-major `[rows, cols]` matrix `m`, in parallel tiles
/// of 16 output rows (each input read a cache line at a time).
fn transpose(m: &[f32], [rows, cols]: [usize; 2]) -> Vec<f32> {
    const TILE: usize = 16;
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile, out)| {
            let first = tile * TILE;
            let width = out.len() / rows.max(1);
            for (r, row) in m.chunks_exact(cols).enumerate() {
                for (j, &v) in row[first..first + width].iter().enumerate() {
                    out[j * rows + r] = v;
                }
            }
        });
    out
}

/// Per channel, in f64 and rounded to f32 once per element: `a·(x − m) + d` (batch norm's
/// output: the centring before the scale, so that a mean far larger than the spread costs no
/// precision), or with `y`, `a·x + b·(y − m) + d` (its input gradient). Coefficients rounded to
/// f32 would err alike at every position of a channel, an error that the sums of the next
/// layer's weight gradient add up instead of averaging out: it reached 1% of the largest
/// gradient of a ResNet's first convolution (measured against the f64 synchronised batch norm,
/// `selfsup dist-check`). `[a, b, m, d]` for each of the `c` channels of `s` positions; each
/// image in parallel, compiled for the widest vectors ([`widest`]). `relu` fuses a ReLU after
/// it ([`Relu`]).
fn channel_affine(
    x: &[f32],
    y: Option<&[f32]>,
    coef: &[[f64; 4]],
    relu: Relu,
    c: usize,
    s: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(c * s)
        .enumerate()
        .for_each(|(n, out)| {
            let image = n * c * s..(n + 1) * c * s;
            let (x, y) = (&x[image.clone()], y.map(|y| &y[image]));
            widest(
                #[inline(always)]
                || affine_image(out, x, y, coef, relu, s),
            )
        });
    // SAFETY: the tasks above wrote every channel of every image.
    unsafe { out.set_len(x.len()) };
    out
}

/// A ReLU fused into [`channel_affine`]: none, on its output (batch norm + ReLU forward), or
/// on its input `x` (the gradient), zeroed where the forward pass with these coefficients gave
/// zero from `y` ([`bn_relu_passes`]: the same arithmetic, so the same mask).
#[derive(Clone, Copy)]
enum Relu<'a> {
    Off,
    Output,
    Mask(&'a [[f64; 4]]),
}

/// Batch norm's output `a·(x − m) + d` of one value, for `[a, _, m, d]`, rounded to f32.
#[inline(always)]
fn bn_output([a, _, m, d]: [f64; 4], x: f32) -> f32 {
    (a * (x as f64 - m) + d) as f32
}

/// Whether a fused batch norm + ReLU with `coef` passed input `x` through ([`relu_passes`]).
#[inline(always)]
fn bn_relu_passes(coef: [f64; 4], x: f32) -> bool {
    relu_passes(bn_output(coef, x))
}

/// [`channel_affine`] of one image's `[C, S]` values (and `y`'s) into `out`.
#[inline(always)]
fn affine_image(
    out: &mut [std::mem::MaybeUninit<f32>],
    x: &[f32],
    y: Option<&[f32]>,
    coef: &[[f64; 4]],
    relu: Relu,
    s: usize,
) {
    for (ch, &[a, b, m, d]) in coef.iter().enumerate() {
        let range = ch * s..(ch + 1) * s;
        let (out, x) = (&mut out[range.clone()], &x[range.clone()]);
        match (y, relu) {
            (Some(y), Relu::Mask(forward)) => {
                for ((o, &x), &y) in out.iter_mut().zip(x).zip(&y[range]) {
                    let x = if bn_relu_passes(forward[ch], y) {
                        x
                    } else {
                        0.0
                    };
                    o.write((a * x as f64 + b * (y as f64 - m) + d) as f32);
                }
            }
            (Some(y), _) => {
                for ((o, &x), &y) in out.iter_mut().zip(x).zip(&y[range]) {
                    o.write((a * x as f64 + b * (y as f64 - m) + d) as f32);
                }
            }
            (None, Relu::Output) => {
                for (o, &x) in out.iter_mut().zip(x) {
                    o.write(relu_of(bn_output([a, b, m, d], x)));
                }
            }
            (None, _) => {
                for (o, &x) in out.iter_mut().zip(x) {
                    o.write(bn_output([a, b, m, d], x));
                }
            }
        }
    }
}

/// `c (+)= a · b` for an m×k `a` and a k×n `b` given as (values, row stride, column stride),
/// into the row-major m×n `c`, on the calling thread.
fn gemm(
    products: Products,
    dims: [usize; 3],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: &mut [f32],
    accumulate: bool,
) {
    let n = dims[2];
    gemm_into(products, dims, a, b, (c, n), accumulate, 1.0);
}

/// `c (+)= scale · a · b` as [`gemm`], into an m×n `c` given as (values, row stride).
fn gemm_into(
    products: Products,
    dims: [usize; 3],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: (&mut [f32], usize),
    accumulate: bool,
    scale: f32,
) {
    gemm_reusing(products, dims, (a, None), b, c, accumulate, scale);
}

/// [`gemm_into`] for an `a` used by many products (a convolution's weights, over its
/// images), with `a` rounded to bf16 and packed once where they run in bf16
/// ([`ConvShape::packed_weights`]).
fn gemm_reusing(
    products: Products,
    [m, k, n]: [usize; 3],
    a: ((&[f32], usize, usize), Option<&crate::bf16::PackedA>),
    b: (&[f32], usize, usize),
    (c, c_row): (&mut [f32], usize),
    accumulate: bool,
    scale: f32,
) {
    assert!(m == 0 || n == 0 || (c_row >= n && c.len() >= (m - 1) * c_row + n));
    // SAFETY: the assert keeps every element of c inside its slice.
    unsafe {
        gemm_raw(
            products,
            [m, k, n],
            a,
            b,
            (c.as_mut_ptr(), c_row),
            accumulate,
            scale,
            gemm::Parallelism::None,
        )
    }
}

/// `c (+)= scale · a · b` into an m×n `c` at a pointer with a row stride, the product split
/// over threads by `parallelism` (gemm splits the output, never the sum over k: the bits do not
/// depend on the thread count).
///
/// # Safety
/// `c` must be valid for writes of every element (m − 1)·row + n it spans, and for reads too
/// when `accumulate`. Without `accumulate` it may be uninitialised: gemm-common 0.19 then sets
/// its α to 0 and never reads the destination (every path branches on α = 0; k = 0 writes
/// zeros), as read in its source: recheck on a gemm upgrade.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    products: Products,
    [m, k, n]: [usize; 3],
    (a, packed): ((&[f32], usize, usize), Option<&crate::bf16::PackedA>),
    b: (&[f32], usize, usize),
    (c, c_row): (*mut f32, usize),
    accumulate: bool,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    assert!(m == 0 || k == 0 || a.0.len() > (m - 1) * a.1 + (k - 1) * a.2);
    assert!(k == 0 || n == 0 || b.0.len() > (k - 1) * b.1 + (n - 1) * b.2);
    if runs_in_bf16(products, [m, k, n]) {
        let parallel = matches!(parallelism, gemm::Parallelism::Rayon(_));
        // SAFETY: `Products::Bf16` is only chosen where an engine is available; c is the caller's.
        unsafe {
            match packed {
                Some(packed) => {
                    assert_eq!(
                        packed.dims(),
                        [m, k],
                        "gemm: a packed operand of another size"
                    );
                    crate::bf16::gemm_packed(packed, b, n, (c, c_row), accumulate, scale, parallel)
                }
                None => crate::bf16::gemm([m, k, n], a, b, (c, c_row), accumulate, scale, parallel),
            }
        };
        return;
    }
    // SAFETY: the asserts keep every index the strides reach inside a and b; c is the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            c_row as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `a · b` (m×k by k×n, each as (values, row stride, column stride)) into a new row-major
/// m×n buffer, never zero-filled: gemm without `accumulate` writes every element.
fn product(
    products: Products,
    dims: [usize; 3],
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
) -> Vec<f32> {
    let [m, k, n] = dims;
    let mut out = Vec::<f32>::with_capacity(m * n);
    if k == 0 {
        out.resize(m * n, 0.0);
        return out;
    }
    // SAFETY: `out` has room for m·n values, m rows of n; gemm writes all of them.
    unsafe {
        gemm_raw(
            products,
            dims,
            (a, None),
            b,
            (out.as_mut_ptr(), n),
            false,
            1.0,
            threads(dims),
        );
        out.set_len(m * n);
    }
    out
}

/// Whether an m×k×n product gains from bf16 products ([`crate::bf16`]): each operand value is converted and
/// packed once, so a product with under 16 multiply-adds per value, mn/(m + n) < 16 (a layer
/// of 16 output channels), or k under one tile, gains little or nothing and stays f32 (as exact
/// or more). 8 ran a few percent faster but moved the small SimCLR's bf16 losses 4% from f32's
/// (BENCHMARKS.md, issue 30's seventh round).
fn bf16_pays([m, k, n]: [usize; 3]) -> bool {
    m * n >= 16 * (m + n) && k >= 32
}

/// Whether an m×k×n product with `products` runs in bf16: [`Products::Bf16`], a product that
/// pays ([`bf16_pays`]) and a CPU with a bf16 engine.
fn runs_in_bf16(products: Products, dims: [usize; 3]) -> bool {
    products == Products::Bf16 && bf16_pays(dims) && crate::bf16::available()
}

/// gemm's threads for an m×k×n product: all of rayon's from 192³ multiply-adds (burn-flex's
/// matmul's threshold), none below, where waking them costs more than they save.
fn threads([m, k, n]: [usize; 3]) -> gemm::Parallelism {
    match m.saturating_mul(k).saturating_mul(n) >= 192 * 192 * 192 {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    }
}

/// (rows m, inputs k, outputs n) of a linear of `x` `[..., k]` by `weight` `[k, n]`.
///
/// # Panics
/// If `x`'s last dim is not the weight's first, or either is not of rank ≥ 2 / 2.
fn linear_dims(x: &FlexTensor, weight: &FlexTensor) -> (usize, usize, usize) {
    let (shape, w) = (x.shape(), weight.shape());
    let d = shape.num_dims();
    assert!(
        d >= 1 && w.num_dims() == 2 && shape[d - 1] == w[0],
        "linear: x {shape:?} by weight {w:?}"
    );
    let m = (0..d - 1).map(|i| shape[i]).product();
    (m, w[0], w[1])
}

/// `shape` with its last dim set to `n`.
fn with_last(shape: &Shape, n: usize) -> Shape {
    let mut dims: Vec<usize> = (0..shape.num_dims()).map(|i| shape[i]).collect();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    Shape::from(dims)
}

/// Copies `rows` rows of `len` values from `from` (row i at i·`from_row`) to `to` (at i·`to_row`).
fn copy_rows(
    from: &[f32],
    from_row: usize,
    to: &mut [f32],
    to_row: usize,
    rows: usize,
    len: usize,
) {
    for i in 0..rows {
        to[i * to_row..i * to_row + len].copy_from_slice(&from[i * from_row..i * from_row + len]);
    }
}

/// The shapes of one convolution: input `[C, H, W]` per image, kernel, output grid.
#[derive(Clone, Copy)]
struct ConvShape {
    channels: usize,
    input: [usize; 2],
    kernel: [usize; 2],
    output: [usize; 2],
    geometry: ConvGeometry,
    /// Whether the forward pass runs channels-last ([`blocked`], [`ConvShape::blocked_forward`]).
    blocked: bool,
}

impl ConvShape {
    /// Rows of the column matrix: C·kh·kw, in the order of the weight's `[C, kh, kw]`.
    fn rows(&self) -> usize {
        self.channels * self.kernel[0] * self.kernel[1]
    }

    /// Columns of the column matrix: the output positions.
    fn positions(&self) -> usize {
        self.output[0] * self.output[1]
    }

    /// A 1×1 kernel at stride 1 without padding reads the image itself as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.geometry.stride == [1, 1] && self.geometry.padding == [0; 4]
    }

    /// Stride 1 (but the pointwise case) on a wide enough output: the convolution runs tap by
    /// tap on a zero-padded copy of the image, with no column matrix. Tap (i, j) reads the
    /// padded image `[C, Hp, Wp]` from [`ConvShape::tap_offsets`] on as a `[C, OH·Wp]` matrix
    /// of row stride Hp·Wp: its product with that tap's weights `[Co, C]`, summed over the taps,
    /// is the output on a grid of OH rows of Wp columns, whose first OW columns are the output
    /// (the others read across the border and are dropped). gemm reads these matrices in place,
    /// where im2col copies the image kh·kw times, a copy as long as the product itself for a
    /// narrow layer. The wider grid costs (Wp − OW)/OW more multiply-adds: 6% for a 3×3 kernel
    /// at 32 px, 17% at 12, 50% at 4. This path takes up to 1/8 of them (a ResNet-18's 3×3
    /// layers at 32 and 16 px), and up to 1/3 on at most [`NARROW_TAPS`] input channels (at 24,
    /// 12 and 6 px as well), where the column path's products are too short to pay for its
    /// copies. Never where the forward pass runs channels-last ([`ConvShape::blocked`]).
    fn is_tap_by_tap(&self) -> bool {
        let extra = self.padded()[1] - self.output[1];
        let waste = match self.channels <= NARROW_TAPS {
            true => 3,
            false => 8,
        };
        !self.blocked
            && self.geometry.stride == [1, 1]
            && !self.is_pointwise()
            && extra * waste <= self.output[1]
    }

    /// The padded image's (Hp, Wp).
    fn padded(&self) -> [usize; 2] {
        let [top, left, bottom, right] = self.geometry.padding;
        [self.input[0] + top + bottom, self.input[1] + left + right]
    }

    /// A zeroed buffer for the padded image `[C, Hp, Wp]`, with the tail that the last tap's
    /// matrix reads past its end (empty unless the convolution runs tap by tap).
    fn padded_buffer(&self) -> Vec<f32> {
        if !self.is_tap_by_tap() {
            return Vec::new();
        }
        let [hp, wp] = self.padded();
        vec![0f32; self.channels * hp * wp + (self.kernel[1] - 1) * self.geometry.dilation[1]]
    }

    /// [Hp·Wp, kh·kw, OH·Wp]: the padded image's channel stride, the kernel taps, the
    /// positions of the wide grid.
    fn tap_dims(&self) -> [usize; 3] {
        let [hp, wp] = self.padded();
        [
            hp * wp,
            self.kernel[0] * self.kernel[1],
            self.output[0] * wp,
        ]
    }

    /// Where each kernel tap's matrix starts in the padded image, taps in the weight's order.
    fn tap_offsets(&self) -> impl Iterator<Item = (usize, usize)> {
        let [_, wp] = self.padded();
        let ([d0, d1], kw) = (self.geometry.dilation, self.kernel[1]);
        (0..self.kernel[0] * kw).map(move |t| (t, (t / kw) * d0 * wp + (t % kw) * d1))
    }

    /// Where each image row starts, in the padded image and in the image `[C, H, W]`: the
    /// interior that [`ConvShape::pad`] fills, rows of W values.
    fn interior_rows(&self) -> impl Iterator<Item = (usize, usize)> {
        let [h, w] = self.input;
        let [hp, wp] = self.padded();
        let [top, left, ..] = self.geometry.padding;
        (0..self.channels * h).map(move |r| (((r / h) * hp + top + r % h) * wp + left, r * w))
    }

    /// Copies `image` into the interior of `padded` (whose border stays as it is: zero).
    fn pad(&self, image: &[f32], padded: &mut [f32]) {
        let w = self.input[1];
        for (at, from) in self.interior_rows() {
            padded[at..at + w].copy_from_slice(&image[from..from + w]);
        }
    }

    /// Copies the interior of `padded` into `image` (the adjoint of [`ConvShape::pad`] where
    /// `padded` holds gradients: the border's are dropped).
    fn unpad(&self, padded: &[f32], image: &mut [f32]) {
        let w = self.input[1];
        for (at, to) in self.interior_rows() {
            image[to..to + w].copy_from_slice(&padded[at..at + w]);
        }
    }

    /// Calls `visit(input, column, count)` for every run of the column matrix that reads the
    /// image: `count` entries from `column` on (an index into `[C·kh·kw, OH·OW]`) read the
    /// image `[C, H, W]` from `input` on, every `stride[1]`-th entry. Entries not visited read
    /// padding.
    fn walk(&self, mut visit: impl FnMut(usize, usize, usize)) {
        let [h, w] = self.input;
        let [kh, kw] = self.kernel;
        let [oh, ow] = self.output;
        let g = self.geometry;
        let positions = oh * ow;
        // The output positions o with 0 <= o·stride + offset < len.
        let inside = |offset: isize, stride: usize, len: usize, count: usize| {
            let (stride, len) = (stride as isize, len as isize);
            let first = if offset >= 0 {
                0
            } else {
                (-offset + stride - 1) / stride
            };
            let end = if offset >= len {
                0
            } else {
                (len - offset + stride - 1) / stride
            };
            first.min(count as isize) as usize..end.clamp(0, count as isize) as usize
        };
        for i in 0..kh {
            let top = (i * g.dilation[0]) as isize - g.padding[0] as isize;
            let ys = inside(top, g.stride[0], h, oh);
            for j in 0..kw {
                let left = (j * g.dilation[1]) as isize - g.padding[1] as isize;
                let xs = inside(left, g.stride[1], w, ow);
                if xs.is_empty() {
                    continue;
                }
                let first_column = (xs.start as isize * g.stride[1] as isize + left) as usize;
                for c in 0..self.channels {
                    let row = (c * kh + i) * kw + j;
                    for y in ys.clone() {
                        let ih = (y as isize * g.stride[0] as isize + top) as usize;
                        visit(
                            (c * h + ih) * w + first_column,
                            row * positions + y * ow + xs.start,
                            xs.len(),
                        );
                    }
                }
            }
        }
    }

    /// Images whose column matrices one product takes side by side, `[C·kh·kw, G·OH·OW]`, when
    /// each task holds `per_task`: enough for about [`GROUP_COLUMNS`] columns. A product per
    /// image streamed the weights `[Co, C·kh·kw]` once per image, for OH·OW columns: 16 at a
    /// ResNet-18's 4 px, whose 512→512 weights (9.4 MB) outgrow a core's L2, and its weight
    /// gradient read and wrote a 9.4 MB sum per image; `conv_layers` at width 1 ran that layer at
    /// 186 / 94 GFLOP/s forward / backward where PyTorch ran 363 / 306 (BENCHMARKS.md, issue
    /// 30's eighteenth round). One where the image is its own column matrix or the convolution
    /// runs tap by tap.
    fn images_per_product(&self, per_task: usize) -> usize {
        match self.is_pointwise() || self.is_tap_by_tap() {
            true => 1,
            false => (GROUP_COLUMNS / self.positions()).clamp(1, per_task),
        }
    }

    /// Whether the weight gradient of `n` images and `co` output channels is one product over
    /// all the images' column matrices ([`ConvShape::weight_grad`]) rather than a sum per
    /// parallel task: where the [`TASKS`] sums `[C·kh·kw, Co]` outweigh the column matrices
    /// `[C·kh·kw, N·OH·OW]`. At a ResNet-18's 4 px at batch 128 each task zeroed a 9.4 MB sum,
    /// read and wrote it in its product and handed it to a serial addition. The column matrices
    /// take at most the memory those sums took. At equality (4 px at batch 256) it was no faster.
    fn weight_grad_at_once(&self, n: usize, co: usize) -> bool {
        !self.is_pointwise()
            && !self.is_tap_by_tap()
            && !self.is_blocked_backward()
            && TASKS * co > n * self.positions()
    }

    /// The weight gradient `[Co, C·kh·kw]` of the images `xs` `[N, C, H, W]` for the output
    /// gradient `dy` `[N, Co, OH·OW]` in one product, `dW[Co, K] = dy[Co, N·P] · cols[K, N·P]ᵀ`,
    /// split over the output by gemm's threads (whose bits do not depend on their number);
    /// `index` is the [`ConvShape::column_index`].
    fn weight_grad(&self, xs: &[f32], dy: &[f32], co: usize, index: &[u32]) -> Vec<f32> {
        let (image, positions) = (self.image_len(), self.positions());
        let np = xs.len() / image * positions;
        let mut grouped = zeros(co * np);
        group_blocks(dy, (co, positions), &mut grouped);
        let mut cols = zeros(self.rows() * np);
        cols.par_chunks_mut(np)
            .zip(index.par_chunks(positions))
            .for_each(|(row, index)| im2col(xs, (image, positions), index, row));
        let dims = [co, np, self.rows()];
        product(
            self.geometry.products,
            dims,
            (&grouped, np, 1),
            (&cols, 1, np),
        )
    }

    /// A buffer for `group` images' `[Co, G·P]` outputs or output gradients side by side
    /// ([`group_blocks`]; empty for one image).
    fn group_buffer(&self, co: usize, group: usize) -> Vec<f32> {
        let len = if group > 1 {
            co * group * self.positions()
        } else {
            0
        };
        vec![0f32; len]
    }

    /// A buffer for [`ConvShape::columns`] of `group` images (empty when the image is its own
    /// column matrix, when the convolution runs tap by tap, or when its backward pass runs
    /// channels-last: a forward pass that runs channels-last allocates it unused).
    fn column_buffer(&self, group: usize) -> Vec<f32> {
        match self.is_pointwise() || self.is_tap_by_tap() || self.is_blocked_backward() {
            true => Vec::new(),
            false => vec![0f32; self.rows() * self.positions() * group],
        }
    }

    /// A buffer for the tap-by-tap output `[Co, OH·Wp]` on the wide grid (empty unless the
    /// convolution runs tap by tap).
    fn wide_buffer(&self, co: usize) -> Vec<f32> {
        match self.is_tap_by_tap() {
            true => vec![0f32; co * self.output[0] * self.padded()[1]],
            false => Vec::new(),
        }
    }

    /// The weights `ws` `[Co, C, kh, kw]` tap by tap, `[kh·kw, Co, C]`: each tap's `[Co, C]`
    /// contiguous, so that its products read (and the bf16 packers convert) whole rows.
    fn tap_major(&self, ws: &[f32], co: usize) -> Vec<f32> {
        let (taps, c) = (self.tap_dims()[1], self.channels);
        (0..taps * co * c)
            .map(|i| ws[(i % (co * c)) * taps + i / (co * c)])
            .collect()
    }

    /// The weights `ws` `[Co, C, kh, kw]` as `[kh·kw, C, Co]`: each term's outputs contiguous,
    /// as the direct sums read them ([`direct`], [`blocked`]).
    fn tap_channel_major(&self, ws: &[f32], co: usize) -> Vec<f32> {
        let (taps, c) = (self.kernel[0] * self.kernel[1], self.channels);
        (0..taps * c * co)
            .map(|i| ws[((i % co) * c + (i / co) % c) * taps + i / (c * co)])
            .collect()
    }

    /// Whether the tap-by-tap forward pass sums its taps in registers ([`direct`]) rather than
    /// in one product per tap: f32 products over at most [`DIRECT_FORWARD`] input channels,
    /// where each tap's product (k = C) is too short for gemm's tiles.
    fn is_direct(&self) -> bool {
        self.is_tap_by_tap()
            && self.geometry.products == Products::F32
            && self.channels <= DIRECT_FORWARD
    }

    /// Whether the tap-by-tap input gradient of `co` output channels is a direct correlation
    /// (k = Co for each tap's product): at most [`DIRECT_BACKWARD`] of them.
    fn is_direct_backward(&self, co: usize) -> bool {
        self.is_tap_by_tap() && self.geometry.products == Products::F32 && co <= DIRECT_BACKWARD
    }

    /// Whether the tap-by-tap weight gradient of `co` output channels sums in registers
    /// ([`direct::weight_grad`]) rather than in one product per tap and image: f32 products on
    /// [`DIRECT_WEIGHT_GRAD`] output channels.
    fn is_direct_weight_grad(&self, co: usize) -> bool {
        self.is_tap_by_tap()
            && self.geometry.products == Products::F32
            && DIRECT_WEIGHT_GRAD.contains(&co)
    }

    /// What the direct forward pass reads, made once a convolution from the weights `ws`
    /// `[Co, C, kh, kw]` (`None` unless [`ConvShape::is_direct`]).
    fn direct_forward(&self, ws: &[f32], co: usize) -> Option<DirectForward> {
        if !self.is_direct() {
            return None;
        }
        let ([plane, ..], c) = (self.tap_dims(), self.channels);
        let offsets: Vec<usize> = self.tap_offsets().map(|(_, o)| o).collect();
        Some(DirectForward {
            weights: self.tap_channel_major(ws, co),
            terms: direct::terms(&offsets, c, plane),
        })
    }

    /// The weight matrices of this convolution's products rounded to bf16 and packed once for
    /// all its images, where the products run in bf16 ([`runs_in_bf16`]); none where they run
    /// in f32. One `[Co, K]` matrix of `ws` `[Co, C, kh, kw]` (for products of `group` images),
    /// or on the tap-by-tap path one
    /// `[Co, C]` a tap of `tap_major` ([`ConvShape::tap_major`]); `transposed` (`[K, Co]`) for
    /// the input gradient.
    fn packed_weights(
        &self,
        (ws, tap_major): (&[f32], &[f32]),
        (co, group): (usize, usize),
        transposed: bool,
    ) -> Vec<crate::bf16::PackedA> {
        let (k, n, mats) = match self.is_tap_by_tap() {
            true => {
                let ([_, taps, wide], c) = (self.tap_dims(), self.channels);
                let taps = (0..taps).map(|t| &tap_major[t * co * c..]).collect();
                (c, wide, taps)
            }
            false => (self.rows(), self.positions() * group, vec![ws]),
        };
        let (dims, strides) = match transposed {
            false => ([co, k, n], (k, 1)),
            true => ([k, co, n], (1, k)),
        };
        if !runs_in_bf16(self.geometry.products, dims) {
            return Vec::new();
        }
        mats.into_iter()
            .map(|a| crate::bf16::PackedA::new((a, strides.0, strides.1), [dims[0], dims[1]], true))
            .collect()
    }

    /// What the direct backward pass of `co` output channels reads, made once a convolution:
    /// the terms of the input gradient over the output gradient as
    /// [`ConvShape::grad_layout`] lays it out, the taps mirrored (where
    /// [`ConvShape::is_direct_backward`]), and those of the weight gradient over the padded
    /// image, in the weights' `[C, kh, kw]` order (where [`ConvShape::is_direct_weight_grad`]).
    fn direct_backward(&self, co: usize) -> DirectBackward {
        let input_terms = self.is_direct_backward(co).then(|| {
            let (front, grad_plane) = self.grad_layout(co);
            let mirrored: Vec<usize> = self.tap_offsets().map(|(_, o)| front - o).collect();
            direct::terms(&mirrored, co, grad_plane)
        });
        let weight_terms = self.is_direct_weight_grad(co).then(|| {
            let plane = self.tap_dims()[0];
            let taps: Vec<usize> = self.tap_offsets().map(|(_, o)| o).collect();
            (0..self.channels)
                .flat_map(|c| taps.iter().map(move |&o| c * plane + o))
                .collect()
        });
        DirectBackward {
            input_terms,
            weight_terms,
        }
    }

    /// Tap by tap ([`ConvShape::is_tap_by_tap`]): the output of the padded image `padded` for
    /// tap-major weights `wt` ([`ConvShape::tap_major`]), packed in bf16 as `packed` where
    /// they run so ([`ConvShape::packed_weights`]), or with `correlation`
    /// ([`ConvShape::direct_forward`]) directly, into `wide` `[Co, OH·Wp]` on the wide
    /// grid.
    fn forward_taps(
        &self,
        (wt, packed, correlation): (&[f32], &[crate::bf16::PackedA], Option<&DirectForward>),
        co: usize,
        padded: &[f32],
        wide: &mut [f32],
    ) {
        let ([plane, _, n], c) = (self.tap_dims(), self.channels);
        if let Some(d) = correlation {
            if direct::correlate(&d.weights, co, &d.terms, padded, n, wide, n) {
                return;
            }
        }
        let products = self.geometry.products;
        for (t, offset) in self.tap_offsets() {
            // wide[Co, OH·Wp] (+)= W_t[Co, C] · padded_t[C, OH·Wp]
            gemm_reusing(
                products,
                [co, c, n],
                ((&wt[t * co * c..], c, 1), packed.get(t)),
                (&padded[offset..], plane, 1),
                (wide, n),
                t > 0,
                1.0,
            );
        }
    }

    /// How the tap-by-tap backward pass lays out the output gradient: (front, plane). Channel
    /// co's gradient on the wide grid `[OH·Wp]` starts at co·plane + front; the rest is zero.
    /// The products read it as `[Co, OH·Wp]` (front 0, plane OH·Wp); the direct correlation
    /// reads it shifted back by each tap's offset, so it gets zeros in front (as far as the
    /// farthest tap) and behind (to the padded image's Hp·Wp).
    fn grad_layout(&self, co: usize) -> (usize, usize) {
        let [hp, wp] = self.padded();
        match self.is_direct_backward(co) {
            true => {
                let front = self.tap_offsets().map(|(_, o)| o).max().unwrap_or(0);
                (front, front + hp * wp)
            }
            false => (0, self.output[0] * wp),
        }
    }

    /// A zeroed buffer for the output gradient in [`ConvShape::grad_layout`].
    fn grad_buffer(&self, co: usize) -> Vec<f32> {
        match self.is_tap_by_tap() {
            true => vec![0f32; co * self.grad_layout(co).1],
            false => Vec::new(),
        }
    }

    /// Copies the output gradient `dy` `[Co, OH, OW]` into `grad` ([`ConvShape::grad_layout`]).
    fn spread_grad(&self, dy: &[f32], co: usize, grad: &mut [f32]) {
        let ([oh, ow], wp, (front, plane)) = (self.output, self.padded()[1], self.grad_layout(co));
        for (dy, grad) in dy.chunks(oh * ow).zip(grad.chunks_mut(plane)).take(co) {
            copy_rows(dy, ow, &mut grad[front..], wp, oh, ow);
        }
    }

    /// Tap by tap, backwards, with tap-major weights `wt` ([`ConvShape::tap_major`]): from the
    /// image's output gradient `dy` `[Co, OH·OW]` and its copy `grad`
    /// ([`ConvShape::spread_grad`]), adds the weight gradient onto `weight_grad_t`
    /// (`[C·kh·kw, Co]`, transposed as in the column path) and writes the padded image's
    /// gradient into `padded_grad`. With `direct` ([`DirectBackward`]) the weight gradient sums
    /// in registers and the input gradient is the correlation of the gradient with the mirrored
    /// taps, each where its terms are given.
    fn backward_taps(
        &self,
        (wt, packed, co, direct): (&[f32], &[crate::bf16::PackedA], usize, &DirectBackward),
        padded: &[f32],
        (dy, grad): (&[f32], &[f32]),
        weight_grad_t: &mut [f32],
        padded_grad: &mut [f32],
    ) {
        let ([plane, taps, n], c) = (self.tap_dims(), self.channels);
        let (front, grad_plane) = self.grad_layout(co);
        let products = self.geometry.products;
        let summed = match &direct.weight_terms {
            Some(terms) => {
                let ([oh, ow], wp) = (self.output, self.padded()[1]);
                // The image's output gradient transposed, [OH·OW, Co].
                let dy_t: Vec<f32> = (0..dy.len())
                    .map(|i| dy[(i % co) * oh * ow + i / co])
                    .collect();
                direct::weight_grad(&dy_t, co, terms, padded, (oh, ow, wp), weight_grad_t)
            }
            None => false,
        };
        if !summed {
            for (t, offset) in self.tap_offsets() {
                // dW_tᵀ[C, Co] += padded_t[C, OH·Wp] · grad[Co, OH·Wp]ᵀ
                gemm_into(
                    products,
                    [c, n, co],
                    (&padded[offset..], plane, 1),
                    (&grad[front..], 1, grad_plane),
                    (&mut weight_grad_t[t * co..], taps * co),
                    true,
                    1.0,
                );
            }
        }
        if let Some(terms) = &direct.input_terms {
            if direct::correlate(wt, c, terms, grad, plane, padded_grad, plane) {
                return;
            }
        }
        padded_grad.fill(0.0);
        for (t, offset) in self.tap_offsets() {
            // padded_grad_t[C, OH·Wp] += W_t[Co, C]ᵀ · grad[Co, OH·Wp]
            gemm_reusing(
                products,
                [c, co, n],
                ((&wt[t * co * c..], 1, c), packed.get(t)),
                (&grad[front..], grad_plane, 1),
                (&mut padded_grad[offset..], plane),
                true,
                1.0,
            );
        }
    }

    /// The column matrix `[C·kh·kw, G·OH·OW]` of the G `images` `[G, C, H, W]`: the image
    /// itself for a pointwise convolution (G = 1), else their im2col in `buffer`
    /// ([`ConvShape::column_index`]'s `index`).
    fn columns<'a>(&self, images: &'a [f32], index: &[u32], buffer: &'a mut [f32]) -> &'a [f32] {
        if self.is_pointwise() {
            return images;
        }
        let (image, positions) = (self.image_len(), self.positions());
        let cols = &mut buffer[..images.len() / image * self.rows() * positions];
        im2col(images, (image, positions), index, cols);
        cols
    }

    /// Values of one input image, C·H·W.
    fn image_len(&self) -> usize {
        self.channels * self.input[0] * self.input[1]
    }

    /// For each entry of the column matrix `[C·kh·kw, OH·OW]`, the index of the value of the
    /// image `[C, H, W]` it reads, or `u32::MAX` where it reads padding. Made once a
    /// convolution for all its images, it makes [`im2col`] a gather and [`col2im`] a scatter;
    /// copying [`ConvShape::walk`]'s runs image by image took 20% of a narrow ResNet's step,
    /// most of it per run at 4-8 px, where a run is 2-8 values (`perf record` of
    /// `simclr_cifar10_cpu`). Empty where there is no column matrix (pointwise, tap by tap).
    fn column_index(&self) -> Vec<u32> {
        if self.is_pointwise() || self.is_tap_by_tap() {
            return Vec::new();
        }
        let [h, w] = self.input;
        assert!(
            self.channels * h * w < u32::MAX as usize,
            "an image of over 4G values"
        );
        let stride = self.geometry.stride[1];
        let mut index = vec![u32::MAX; self.rows() * self.positions()];
        self.walk(|input, column, count| {
            for (k, i) in index[column..column + count].iter_mut().enumerate() {
                *i = (input + k * stride) as u32;
            }
        });
        index
    }
}

/// im2col: the G `images` `[G, C, H, W]` (`image` values each) side by side into `cols`
/// `[C·kh·kw, G·P]` (P = OH·OW `positions`) by their [`ConvShape::column_index`] `index` (zero
/// where the kernel reads padding).
fn im2col(images: &[f32], (image, positions): (usize, usize), index: &[u32], cols: &mut [f32]) {
    let group = images.len() / image;
    widest(
        #[inline(always)]
        || {
            let rows = cols
                .chunks_exact_mut(group * positions)
                .zip(index.chunks_exact(positions));
            for (row, index) in rows {
                for (part, image) in row
                    .chunks_exact_mut(positions)
                    .zip(images.chunks_exact(image))
                {
                    for (c, &i) in part.iter_mut().zip(index) {
                        *c = image.get(i as usize).copied().unwrap_or(0.0);
                    }
                }
            }
        },
    )
}

/// col2im: adds `cols` `[C·kh·kw, G·P]` back onto the G `images` `[G, C, H, W]` (`image`
/// values each, P = OH·OW `positions`) by their [`ConvShape::column_index`] `index` (the
/// adjoint of [`im2col`]). Each image value sums its terms in the order of the kernel taps, as
/// Caffe's col2im.
fn col2im(cols: &[f32], index: &[u32], images: &mut [f32], (image, positions): (usize, usize)) {
    let group = images.len() / image;
    let rows = cols
        .chunks_exact(group * positions)
        .zip(index.chunks_exact(positions));
    for (row, index) in rows {
        for (part, image) in row
            .chunks_exact(positions)
            .zip(images.chunks_exact_mut(image))
        {
            for (&g, &i) in part.iter().zip(index) {
                if let Some(v) = image.get_mut(i as usize) {
                    *v += g;
                }
            }
        }
    }
}

/// Copies G images' `[Co, P]` blocks, `images` `[G, Co, P]`, side by side into `grouped`
/// `[Co, G·P]`.
fn group_blocks(images: &[f32], (co, positions): (usize, usize), grouped: &mut [f32]) {
    let n = grouped.len() / co;
    for (i, image) in images.chunks_exact(co * positions).enumerate() {
        copy_rows(
            image,
            positions,
            &mut grouped[i * positions..],
            n,
            co,
            positions,
        );
    }
}

/// The inverse of [`group_blocks`]: `grouped` `[Co, G·P]` into `images` `[G, Co, P]`.
fn ungroup_blocks(grouped: &[f32], (co, positions): (usize, usize), images: &mut [f32]) {
    let n = grouped.len() / co;
    for (i, image) in images.chunks_exact_mut(co * positions).enumerate() {
        copy_rows(
            &grouped[i * positions..],
            n,
            image,
            positions,
            co,
            positions,
        );
    }
}

/// The convolution's shapes when the fused kernel takes it: f32, `[N, C, H, W]` against
/// `[Co, C, kh, kw]`, a kernel that fits; `None` sends it to burn's op.
fn conv_shape(x: &FlexTensor, weight: &FlexTensor, geometry: ConvGeometry) -> Option<ConvShape> {
    let (xs, ws) = (x.shape(), weight.shape());
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    let empty = xs.num_elements() == 0 || ws.num_elements() == 0;
    if !f32s || xs.num_dims() != 4 || ws.num_dims() != 4 || xs[1] != ws[1] || empty {
        return None;
    }
    let (input, kernel) = ([xs[2], xs[3]], [ws[2], ws[3]]);
    let output = geometry.output_size(input, kernel)?;
    // A 1×1 downsample has C terms a tile, too few: 48→96 at 6 px ran 0.7 ms against 0.4-0.5.
    let blocked = kernel != [1, 1]
        && geometry.products == Products::F32
        && BLOCKED_CHANNELS.contains(&xs[1])
        && ws[0].is_multiple_of(16)
        && output[0] * output[1] <= BLOCKED_POSITIONS
        && blocked::available();
    Some(ConvShape {
        channels: xs[1],
        input,
        kernel,
        output,
        geometry,
        blocked,
    })
}

/// The channels-last forward pass of [`blocked`] for `group` images at a time.
struct BlockedForward {
    group: usize,
    channels: usize,
    /// The padded channels-last images' `[Hp, Wp]`.
    padded: [usize; 2],
    /// Each output position's first read in the padded images `[G, Hp, Wp, C]`, images outermost.
    rows: Vec<usize>,
    /// Each term's (read offset in the padded images, weight offset), terms `[kh·kw, C]`.
    terms: Vec<(usize, usize)>,
    /// The weights `[kh·kw, C, Co]`.
    weights: Vec<f32>,
}

impl ConvShape {
    /// The plan of the channels-last forward pass for `ws` `[Co, C, kh, kw]`, in groups of
    /// about [`BLOCKED_ROWS`] output positions (at most `per_task` images).
    fn blocked_forward(&self, ws: &[f32], co: usize, per_task: usize) -> BlockedForward {
        BlockedForward {
            weights: self.tap_channel_major(ws, co),
            ..self.blocked_layout(co, per_task)
        }
    }

    /// [`ConvShape::blocked_forward`]'s groups, rows and terms, without the weights.
    fn blocked_layout(&self, co: usize, per_task: usize) -> BlockedForward {
        let group = (BLOCKED_ROWS / self.positions()).clamp(1, per_task);
        let (c, [kh, kw], [oh, ow]) = (self.channels, self.kernel, self.output);
        let [hp, wp] = self.padded();
        let (s, d) = (self.geometry.stride, self.geometry.dilation);
        let rows = (0..group * oh * ow)
            .map(|r| {
                let (g, y, x) = (r / (oh * ow), r / ow % oh, r % ow);
                ((g * hp + y * s[0]) * wp + x * s[1]) * c
            })
            .collect();
        let terms = (0..kh * kw * c)
            .map(|k| {
                let (i, j, ci) = (k / (kw * c), k / c % kw, k % c);
                (((i * d[0]) * wp + j * d[1]) * c + ci, k * co)
            })
            .collect();
        BlockedForward {
            group,
            channels: c,
            padded: [hp, wp],
            rows,
            terms,
            weights: Vec::new(),
        }
    }

    /// Copies `images` `[G, C, H, W]` into the interior of `padded` `[G, Hp, Wp, C]` (whose
    /// border stays as it is: zero).
    fn pad_channels_last(&self, images: &[f32], padded: &mut [f32]) {
        let [top, left, ..] = self.geometry.padding;
        let planes = (self.channels, self.input);
        to_channels_last(images, planes, (self.padded(), [top, left]), padded);
    }
}

impl BlockedForward {
    /// A zeroed buffer for `group` padded channels-last images `[G, Hp, Wp, C]`.
    fn padded_buffer(&self) -> Vec<f32> {
        vec![0f32; self.group * self.padded[0] * self.padded[1] * self.channels]
    }

    /// The buffers of one task: the padded channels-last images and the output `[G·P, Co]`.
    fn buffers(&self, co: usize) -> (Vec<f32>, Vec<f32>) {
        (self.padded_buffer(), vec![0f32; self.rows.len() * co])
    }

    /// `out` `[G, Co, P]` for `images` `[G, C, H, W]`, G up to the plan's group.
    fn forward(
        &self,
        shape: &ConvShape,
        images: &[f32],
        co: usize,
        (padded, rows_out): &mut (Vec<f32>, Vec<f32>),
        out: &mut [f32],
    ) {
        shape.pad_channels_last(images, padded);
        let p = shape.positions();
        let rows = &self.rows[..images.len() / shape.image_len() * p];
        let (weights, terms) = (&self.weights[..], &self.terms[..]);
        blocked::broadcast_sums(padded, rows, weights, terms, co, rows_out, co, false);
        from_channels_last(rows_out, (co, p), out);
    }
}

/// The channels-last backward pass of [`blocked`] (stride 1, no dilation) for `group` images
/// at a time: the weight gradient a tap at a time over the positions, the input gradient as
/// the forward pass of the output gradient padded by `k − 1 − p`, with the taps mirrored.
struct BlockedBackward {
    /// The forward pass's groups, rows and terms (its weights unused).
    forward: BlockedForward,
    /// The padded channels-last output gradient's `[OHq, OWq]`.
    grad_padded: [usize; 2],
    /// Each input position's first read in the padded output gradient `[G, OHq, OWq, Co]`.
    input_rows: Vec<usize>,
    /// The input gradient's terms `[kh·kw, Co]`: (read offset, weight offset).
    input_terms: Vec<(usize, usize)>,
    /// The weights mirrored and transposed, `[kh·kw, Co, C]`.
    mirrored: Vec<f32>,
    /// Each output position's (read in the padded images, read in the padded output gradient).
    positions: Vec<(usize, usize)>,
    /// The weight gradient's rows `[kh·kw, C]`: where tap t of input channel ci starts reading
    /// the padded images.
    weight_rows: Vec<usize>,
}

impl ConvShape {
    /// Whether the backward pass runs channels-last too: where the forward pass does, at
    /// stride 1 without dilation, on whole vectors of input channels, padded by less than the
    /// kernel.
    fn is_blocked_backward(&self) -> bool {
        let g = self.geometry;
        let [top, left, bottom, right] = g.padding;
        let [kh, kw] = self.kernel;
        self.blocked
            && g.stride == [1, 1]
            && g.dilation == [1, 1]
            && self.channels.is_multiple_of(16)
            && top.max(bottom) < kh
            && left.max(right) < kw
    }

    /// The plan of the channels-last backward pass for `ws` `[Co, C, kh, kw]`.
    fn blocked_backward(&self, ws: &[f32], co: usize, per_task: usize) -> BlockedBackward {
        let forward = self.blocked_layout(co, per_task);
        let (group, c, [kh, kw], [h, w], [oh, ow]) = (
            forward.group,
            self.channels,
            self.kernel,
            self.input,
            self.output,
        );
        let [top, left, ..] = self.geometry.padding;
        let (qt, ql) = (kh - 1 - top, kw - 1 - left);
        let (ohq, owq) = (h + kh - 1, w + kw - 1);
        let input_rows = (0..group * h * w)
            .map(|r| {
                let (g, y, x) = (r / (h * w), r / w % h, r % w);
                ((g * ohq + y) * owq + x) * co
            })
            .collect();
        let input_terms = (0..kh * kw * co)
            .map(|k| {
                let (i, j, o) = (k / (kw * co), k / co % kw, k % co);
                ((i * owq + j) * co + o, k * c)
            })
            .collect();
        let taps = kh * kw;
        // mirrored[(t', o), ci] = w[o, ci, kh−1−i', kw−1−j'] for t' = (i', j').
        let mirrored = (0..taps * co * c)
            .map(|i| {
                let (t, o, ci) = (i / (co * c), i / c % co, i % c);
                ws[(o * c + ci) * taps + taps - 1 - t]
            })
            .collect();
        let positions = (0..group * oh * ow)
            .map(|r| {
                let (g, y, x) = (r / (oh * ow), r / ow % oh, r % ow);
                (forward.rows[r], ((g * ohq + y + qt) * owq + x + ql) * co)
            })
            .collect();
        let weight_rows = forward.terms.iter().map(|t| t.0).collect();
        BlockedBackward {
            weight_rows,
            forward,
            grad_padded: [ohq, owq],
            input_rows,
            input_terms,
            mirrored,
            positions,
        }
    }

    /// Copies `grads` `[G, Co, OH, OW]` into the interior of `padded` `[G, OHq, OWq, Co]`
    /// (border zero), `k − 1 − p` from its top left.
    fn pad_grad_channels_last(&self, grads: &[f32], co: usize, padded: &mut [f32]) {
        let [kh, kw] = self.kernel;
        let [top, left, ..] = self.geometry.padding;
        let border = [kh - 1 - top, kw - 1 - left];
        let grid = [self.input[0] + kh - 1, self.input[1] + kw - 1];
        to_channels_last(grads, (co, self.output), (grid, border), padded);
    }
}

/// A task's buffers for [`BlockedBackward::backward`]: the padded images, the padded output
/// gradient, the input gradient channels-last.
type BlockedBuffers = (Vec<f32>, Vec<f32>, Vec<f32>);

impl BlockedBackward {
    fn buffers(&self, co: usize) -> BlockedBuffers {
        let [ohq, owq] = self.grad_padded;
        let c = self.forward.channels;
        (
            self.forward.padded_buffer(),
            vec![0f32; self.forward.group * ohq * owq * co],
            vec![0f32; self.input_rows.len() * c],
        )
    }

    /// Adds the weight gradient of `count` images onto `weight_grad_t` `[C·kh·kw, Co]` and
    /// writes their input gradient into `dx` `[count, C, H, W]`, from the `images` and their
    /// output gradient `dy` `[count, Co, OH·OW]`.
    fn backward(
        &self,
        shape: &ConvShape,
        (images, dy): (&[f32], &[f32]),
        co: usize,
        (padded, grad, dx_cl): &mut BlockedBuffers,
        weight_grad_t: &mut [f32],
        dx: &mut [f32],
    ) {
        let (c, taps) = (shape.channels, shape.kernel[0] * shape.kernel[1]);
        let count = images.len() / shape.image_len();
        shape.pad_channels_last(images, padded);
        shape.pad_grad_channels_last(dy, co, grad);
        // dWᵀ[(ci, t), o] += Σ_p x[p + tap t, ci] · dy[p, o], a tap at a time.
        let positions = &self.positions[..count * shape.positions()];
        for (t, rows) in self.weight_rows.chunks_exact(c).enumerate() {
            let out = &mut weight_grad_t[t * co..];
            blocked::broadcast_sums(padded, rows, grad, positions, co, out, taps * co, true);
        }
        // dx[q, ci] = Σ_{t', o} dyq[q + t', o] · mirrored[t', o, ci]
        let [h, w] = shape.input;
        let rows = &self.input_rows[..count * h * w];
        blocked::broadcast_sums(
            grad,
            rows,
            &self.mirrored,
            &self.input_terms,
            c,
            dx_cl,
            c,
            false,
        );
        from_channels_last(dx_cl, (c, h * w), dx);
    }
}

/// Copies `planes` `[G, D, H, W]` into `padded` `[G, Hp, Wp, D]` at (`top`, `left`) of each
/// image's `[Hp, Wp]` grid, leaving the rest as it is.
fn to_channels_last(
    planes: &[f32],
    (d, [h, w]): (usize, [usize; 2]),
    ([hp, wp], [top, left]): ([usize; 2], [usize; 2]),
    padded: &mut [f32],
) {
    let pixels: Vec<usize> = (0..h * w)
        .map(|p| ((p / w + top) * wp + left + p % w) * d)
        .collect();
    for (g, image) in planes.chunks_exact(d * h * w).enumerate() {
        blocked::transpose(image, (d, h * w), &mut padded[g * hp * wp * d..], &pixels);
    }
}

/// `out` `[G, D, P]` from `cl` `[G·P, D]`.
fn from_channels_last(cl: &[f32], (d, p): (usize, usize), out: &mut [f32]) {
    let planes: Vec<usize> = (0..d).map(|o| o * p).collect();
    for (out, cl) in out.chunks_exact_mut(d * p).zip(cl.chunks_exact(p * d)) {
        blocked::transpose(cl, (p, d), out, &planes);
    }
}

/// Output positions a channels-last product aims at ([`ConvShape::blocked_forward`]).
const BLOCKED_ROWS: usize = 128;

/// Input channels for which a convolution runs channels-last ([`blocked`], [`ConvShape::blocked`]),
/// on at most [`BLOCKED_POSITIONS`] output positions. `conv_layers` on the Intel Xeon at 2.1 GHz
/// (BENCHMARKS.md, issue 30's twenty-fourth round), forward + backward ms before → after, two
/// sittings: 48→48 at 6 px 4.7 + 10.5, 5.4 + 8.1 → 2.6 + 5.4, 2.4 + 5.2; 64→64 at 8 px 11.0 +
/// 23.0, 10.1 + 21.3 → 7.9 + 17.4, 7.5 + 15.7; 128→128 at 16 px 31.2 + 68.6, 28.3 + 64.6 →
/// 26.0 + 53.9, 26.7 + 57.2. At 256 and 512 channels (8 and 4 px) the forward pass ran up to
/// 1.6× slower than the products, at 16 channels (32 px, before the terms ran in blocks)
/// 1.15-1.5× slower.
const BLOCKED_CHANNELS: std::ops::RangeInclusive<usize> = 32..=128;

/// Output positions (OH·OW) up to which a convolution runs channels-last: a 64-channel layer at
/// 32 px (1,024) was no faster than the tap-by-tap products (forward slower, backward faster).
const BLOCKED_POSITIONS: usize = 256;

/// The direct forward pass's weights `[kh·kw, C, Co]` and its terms ([`direct::terms`]) over
/// the padded image.
struct DirectForward {
    weights: Vec<f32>,
    terms: Vec<usize>,
}

/// The terms of a tap-by-tap backward pass's direct sums ([`ConvShape::direct_backward`]):
/// `None` where that part takes the products (as it also does where the CPU lacks AVX2 + FMA).
struct DirectBackward {
    input_terms: Option<Vec<usize>>,
    weight_terms: Option<Vec<usize>>,
}

/// Output channels for which the tap-by-tap weight gradient sums in registers
/// ([`ConvShape::is_direct_weight_grad`]) rather than in one product per tap and image: more than one
/// AVX-512 vector's 16, so that each broadcast input value feeds two vectors of sums.
/// `conv_layers` on the Intel Xeon at 2.1 GHz, backward passes against the products
/// (BENCHMARKS.md, issue 30's twenty-second round): 32→32 at 6 px 3.8-3.9 ms against 4.4-4.7,
/// at 16 px 10.0-10.1 against 12.2; 16 outputs ran level at 12 px and slower at 32 px (13.7-15.1
/// against 11.8-13.0), 8 slower at 24 px (6.4-6.7 against 5.0-5.2).
const DIRECT_WEIGHT_GRAD: std::ops::RangeInclusive<usize> = 17..=32;

/// Input channels up to which the tap-by-tap forward pass sums its taps in registers
/// ([`ConvShape::is_direct`]), and output channels up to which its input gradient does
/// ([`ConvShape::is_direct_backward`]). Measured on an AVX2 Zen 1 (`conv_layers`, one thread,
/// BENCHMARKS.md issue 30's tenth round): the forward pass of 3, 8 and 16 channels ran 1.3-2.3×
/// faster than gemm's tap products; the input gradient of 8 output channels faster, of 16 not.
const DIRECT_FORWARD: usize = 16;
const DIRECT_BACKWARD: usize = 8;

/// Input channels up to which a convolution runs tap by tap on a grid up to 1/3 wider than its
/// output ([`ConvShape::is_tap_by_tap`]). `conv_layers -- 0.125 512 24` on the Intel Xeon at
/// 2.1 GHz: the 16→16 layer at 12 px took 9-13 ms forward and backward against 16-23 by
/// columns, the 32→32 at 6 px 9-10 against 11-17 (BENCHMARKS.md, issue 30's twentieth round); at
/// 64 channels (8 px) it was no faster, at 256 1.2× slower.
const NARROW_TAPS: usize = 32;

/// Columns a product of the column path aims at ([`ConvShape::images_per_product`]): 256 ran
/// a ResNet-18's 4 px layer's backward pass 1.3× faster than 128 (`conv_layers -- 1.0 128`);
/// 512 was no faster at 8 px.
const GROUP_COLUMNS: usize = 256;

/// How many images each parallel task of a convolution takes: the batch in [`TASKS`] tasks
/// whatever the number of threads, so that the weight gradient's per-task sums (added in task
/// order) give the same bits on any number of cores (on CPUs with and without AVX-512 the
/// layers that [`blocked`] takes differ within float rounding).
fn images_per_task(batch: usize) -> usize {
    batch.div_ceil(TASKS).max(1)
}

/// A convolution's parallel tasks ([`images_per_task`]): 8 keeps 2-8 cores busy and the
/// per-task gradient sums few.
const TASKS: usize = 8;

/// Rows of `[rows, D]` per parallel task: about 16K values.
fn rows_per_task(d: usize) -> usize {
    (16 * 1024 / d.max(1)).max(1)
}

impl CpuKernels for Flex {
    fn attention(
        qkv: FlexTensor,
        heads: usize,
        scale: f64,
        products: Products,
    ) -> (FlexTensor, FlexTensor) {
        let shape = qkv.shape();
        let (n, t, d3) = (shape[0], shape[1], shape[2]);
        let (d, dh) = (d3 / 3, d3 / (3 * heads));
        let x = values(&qkv);
        let mut out = zeros(n * t * d);
        let mut weights = zeros(n * heads * t * t);
        // One image a task; its heads in turn, each three products reading q, k and v in place.
        out.par_chunks_mut(t * d)
            .zip(weights.par_chunks_mut(heads * t * t))
            .enumerate()
            .for_each(|(i, (out, weights))| {
                let x = &x[i * t * d3..(i + 1) * t * d3];
                for (h, p) in weights.chunks_mut(t * t).enumerate() {
                    let (q, k, v) = (&x[h * dh..], &x[d + h * dh..], &x[2 * d + h * dh..]);
                    // S = scale · q kᵀ, then P = softmax(S) row by row.
                    gemm_into(
                        products,
                        [t, dh, t],
                        (q, d3, 1),
                        (k, 1, d3),
                        (p, t),
                        false,
                        scale as f32,
                    );
                    softmax_rows(p, t);
                    // This head's output columns: P v.
                    let o = &mut out[h * dh..];
                    gemm_into(
                        products,
                        [t, t, dh],
                        (p, t, 1),
                        (v, d3, 1),
                        (o, d),
                        false,
                        1.0,
                    );
                }
            });
        (
            flex_tensor(out, Shape::new([n, t, d])),
            flex_tensor(weights, Shape::new([n, heads, t, t])),
        )
    }

    fn attention_backward(
        qkv: FlexTensor,
        weights: FlexTensor,
        output_grad: FlexTensor,
        heads: usize,
        scale: f64,
        products: Products,
    ) -> FlexTensor {
        let shape = qkv.shape();
        let (n, t, d3) = (shape[0], shape[1], shape[2]);
        let (d, dh) = (d3 / 3, d3 / (3 * heads));
        let (x, p_all, g_all) = (values(&qkv), values(&weights), values(&output_grad));
        let mut grad = zeros(n * t * d3);
        grad.par_chunks_mut(t * d3)
            .enumerate()
            .for_each(|(i, grad)| {
                let x = &x[i * t * d3..(i + 1) * t * d3];
                let g = &g_all[i * t * d..(i + 1) * t * d];
                let mut ds = vec![0f32; t * t];
                for h in 0..heads {
                    let p = &p_all[(i * heads + h) * t * t..(i * heads + h + 1) * t * t];
                    let (q, k, v) = (h * dh, d + h * dh, 2 * d + h * dh);
                    let go = &g[h * dh..];
                    // dv = Pᵀ dO.
                    gemm_into(
                        products,
                        [t, t, dh],
                        (p, 1, t),
                        (go, d, 1),
                        (&mut grad[v..], d3),
                        false,
                        1.0,
                    );
                    // dP = dO vᵀ, then dS = P ∘ (dP − rowsum(dP ∘ P)), times the scale.
                    gemm_into(
                        products,
                        [t, dh, t],
                        (go, d, 1),
                        (&x[v..], 1, d3),
                        (&mut ds, t),
                        false,
                        1.0,
                    );
                    for (ds, p) in ds.chunks_mut(t).zip(p.chunks(t)) {
                        let dot: f64 = ds.iter().zip(p).map(|(a, b)| (a * b) as f64).sum();
                        let dot = dot as f32;
                        for (s, &p) in ds.iter_mut().zip(p) {
                            *s = p * (*s - dot) * scale as f32;
                        }
                    }
                    // dq = dS k, dk = dSᵀ q.
                    gemm_into(
                        products,
                        [t, t, dh],
                        (&ds, t, 1),
                        (&x[k..], d3, 1),
                        (&mut grad[q..], d3),
                        false,
                        1.0,
                    );
                    gemm_into(
                        products,
                        [t, t, dh],
                        (&ds, 1, t),
                        (&x[q..], d3, 1),
                        (&mut grad[k..], d3),
                        false,
                        1.0,
                    );
                }
            });
        flex_tensor(grad, shape)
    }

    fn linear(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        products: Products,
    ) -> FlexTensor {
        let shape = x.shape();
        let (m, k, n) = linear_dims(&x, &weight);
        let (xs, w, b) = (values(&x), values(&weight), values(&bias));
        assert_eq!(
            b.len(),
            n,
            "linear: the bias has {} values for {n} outputs",
            b.len()
        );
        // The output starts as the bias in every row; gemm adds the product onto it.
        let mut out = Vec::with_capacity(m * n);
        out.spare_capacity_mut()[..m * n]
            .par_chunks_mut(n.max(1) * rows_per_task(n))
            .for_each(|rows| {
                for row in rows.chunks_mut(n.max(1)) {
                    row.iter_mut().zip(b.iter()).for_each(|(o, &b)| {
                        o.write(b);
                    });
                }
            });
        // SAFETY: every one of the m·n values was written just above.
        unsafe { out.set_len(m * n) };
        let dims = [m, k, n];
        if k > 0 {
            // SAFETY: `out` holds m·n initialised values, m rows of n.
            unsafe {
                gemm_raw(
                    products,
                    dims,
                    ((&xs, k, 1), None),
                    (&w, n, 1),
                    (out.as_mut_ptr(), n),
                    true,
                    1.0,
                    threads(dims),
                )
            };
        }
        flex_tensor(out, with_last(&shape, n))
    }

    fn linear_backward(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        products: Products,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape();
        let (m, k, n) = linear_dims(&x, &weight);
        let (xs, w, dy) = (values(&x), values(&weight), values(&output_grad));
        assert_eq!(
            dy.len(),
            m * n,
            "linear_backward: the output gradient's shape"
        );
        // dx = dy · weightᵀ, d weight = xᵀ · dy (weightᵀ and xᵀ read in place by their strides).
        let x_grad = product(products, [m, n, k], (&dy, n, 1), (&w, 1, n));
        let weight_grad = product(products, [k, m, n], (&xs, 1, k), (&dy, n, 1));
        // d bias = the column sums of dy: 8 row blocks in parallel, added in block order, each
        // summing 64 rows at a time in f32 (vectorised) into f64 totals.
        let rows = m.div_ceil(8).max(1);
        let partials: Vec<Vec<f64>> = dy
            .par_chunks(rows * n.max(1))
            .map(|block| {
                let (mut sums, mut run) = (vec![0f64; n], vec![0f32; n]);
                for rows in block.chunks(64 * n.max(1)) {
                    run.iter_mut().for_each(|r| *r = 0.0);
                    for row in rows.chunks(n.max(1)) {
                        run.iter_mut().zip(row).for_each(|(r, &v)| *r += v);
                    }
                    sums.iter_mut().zip(&run).for_each(|(s, &r)| *s += r as f64);
                }
                sums
            })
            .collect();
        let mut bias_grad = vec![0f64; n];
        for partial in partials {
            bias_grad.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
        }
        (
            flex_tensor(x_grad, shape),
            flex_tensor(weight_grad, Shape::new([k, n])),
            flex_tensor(
                bias_grad.into_iter().map(|v| v as f32).collect(),
                Shape::new([n]),
            ),
        )
    }

    fn adamw_step(
        w: FlexTensor,
        g: FlexTensor,
        moment_1: FlexTensor,
        moment_2: FlexTensor,
        step: AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        assert!(
            [&w, &g, &moment_1, &moment_2]
                .iter()
                .all(|t| t.dtype() == DType::F32),
            "adamw_step takes f32 tensors"
        );
        let (mut w, mut m, mut v) = (owned(w), owned(moment_1), owned(moment_2));
        let g = values(&g);
        let update = step.update();
        w.storage_mut::<f32>()
            .par_chunks_mut(CHUNK)
            .zip(m.storage_mut::<f32>().par_chunks_mut(CHUNK))
            .zip(v.storage_mut::<f32>().par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|(((w, m), v), g)| {
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
                    update(w, g, m, v);
                }
            });
        (w, m, v)
    }

    fn ema(teacher: FlexTensor, student: FlexTensor, m: f64) -> FlexTensor {
        assert!(teacher.dtype() == DType::F32 && student.dtype() == DType::F32);
        let mut teacher = owned(teacher);
        let student = values(&student);
        // burn's mul_scalar takes its f64 scalar as f32.
        let (keep, take) = (m as f32, (1.0 - m) as f32);
        teacher
            .storage_mut::<f32>()
            .par_chunks_mut(CHUNK)
            .zip(student.par_chunks(CHUNK))
            .for_each(|(t, s)| {
                for (t, &s) in t.iter_mut().zip(s) {
                    *t = *t * keep + s * take;
                }
            });
        teacher
    }

    fn gelu(x: FlexTensor) -> FlexTensor {
        elementwise(&x, None, |x, _| {
            let z = x * std::f32::consts::FRAC_1_SQRT_2;
            0.5 * x * (1.0 + erf(z, exp(-z * z)))
        })
        .unwrap_or_else(|| <Flex as ActivationOps<Flex>>::gelu(x))
    }

    fn gelu_backward(x: FlexTensor, output_grad: FlexTensor) -> FlexTensor {
        // d/dx x·Φ(x) = Φ(x) + x·φ(x), φ(x) = exp(−x²/2)/√(2π): one exp for both.
        elementwise(&x, Some(&output_grad), |x, g| {
            let z = x * std::f32::consts::FRAC_1_SQRT_2;
            let e = exp(-z * z);
            let cdf = 0.5 * (1.0 + erf(z, e));
            g * (cdf + x * e * 0.398_942_3)
        })
        .unwrap_or_else(|| <Flex as ActivationOps<Flex>>::gelu_backward(x, output_grad))
    }

    fn relu(x: FlexTensor) -> FlexTensor {
        elementwise(&x, None, |x, _| relu_of(x))
            .unwrap_or_else(|| <Flex as ActivationOps<Flex>>::relu(x))
    }

    fn add_relu(x: FlexTensor, y: FlexTensor) -> FlexTensor {
        elementwise(&x, Some(&y), |x, y| relu_of(x + y)).unwrap_or_else(|| {
            let sum = <Flex as FloatTensorOps<Flex>>::float_add(x, y);
            <Flex as ActivationOps<Flex>>::relu(sum)
        })
    }

    fn relu_backward(output: FlexTensor, output_grad: FlexTensor) -> FlexTensor {
        elementwise(&output, Some(&output_grad), |y, g| match relu_passes(y) {
            true => g,
            false => 0.0,
        })
        .unwrap_or_else(|| <Flex as ActivationOps<Flex>>::relu_backward(output, output_grad))
    }

    fn log_softmax(x: FlexTensor) -> FlexTensor {
        let shape = x.shape();
        let c = shape[shape.num_dims() - 1];
        let xs = values(&x);
        let mut output = zeros(xs.len());
        let chunk = rows_per_task(c) * c;
        output
            .par_chunks_mut(chunk)
            .zip(xs.par_chunks(chunk))
            .for_each(|(out, x)| {
                widest(
                    #[inline(always)]
                    || {
                        // Each row: its exps, then x − max − ln Σ.
                        for (out, x) in out.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                            out.copy_from_slice(x);
                            let (max, sum) = shifted_exps(out);
                            let shift = max + sum.ln() as f32;
                            out.iter_mut().zip(x).for_each(|(o, &v)| *o = v - shift);
                        }
                    },
                )
            });
        flex_tensor(output, shape)
    }

    fn log_softmax_backward(output: FlexTensor, output_grad: FlexTensor) -> FlexTensor {
        let shape = output.shape();
        let c = shape[shape.num_dims() - 1];
        let (ys, gs) = (values(&output), values(&output_grad));
        let mut grad = zeros(ys.len());
        let chunk = rows_per_task(c) * c;
        grad.par_chunks_mut(chunk)
            .zip(ys.par_chunks(chunk).zip(gs.par_chunks(chunk)))
            .for_each(|(dx, (y, g))| {
                widest(
                    #[inline(always)]
                    || {
                        let rows = dx.chunks_exact_mut(c).zip(y.chunks_exact(c));
                        for ((dx, y), g) in rows.zip(g.chunks_exact(c)) {
                            let total = g.iter().map(|&v| v as f64).sum::<f64>() as f32;
                            for ((d, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                                *d = g - exp(y) * total;
                            }
                        }
                    },
                )
            });
        flex_tensor(grad, shape)
    }

    fn layer_norm(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let rows = shape.num_elements() / d.max(1);
        let (xs, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let mut output = zeros(xs.len());
        let mut mean = vec![0f32; rows];
        let mut variance = vec![0f32; rows];
        let per_task = rows_per_task(d);
        output
            .par_chunks_mut(per_task * d)
            .zip(mean.par_chunks_mut(per_task))
            .zip(variance.par_chunks_mut(per_task))
            .enumerate()
            .for_each(|(task, ((out, mean), variance))| {
                let first = task * per_task * d;
                widest(
                    #[inline(always)]
                    || {
                        for (r, out) in out.chunks_exact_mut(d).enumerate() {
                            let x = &xs[first + r * d..][..d];
                            // Only Σx of the two sums.
                            let mu = sums(x, x, 0.0)[0] / d as f64;
                            // Σ x·(x − μ) = Σ (x − μ)², as batch norm's variance.
                            let var = sums(x, x, mu)[1] / d as f64;
                            let (mu, rstd) = (mu as f32, (1.0 / (var + epsilon).sqrt()) as f32);
                            for (((o, x), g), b) in out.iter_mut().zip(x).zip(&*gamma).zip(&*beta) {
                                *o = (x - mu) * rstd * g + b;
                            }
                            (mean[r], variance[r]) = (mu, var as f32);
                        }
                    },
                )
            });
        let stats = Shape::new([rows]);
        (
            flex_tensor(output, shape),
            flex_tensor(mean, stats.clone()),
            flex_tensor(variance, stats),
        )
    }

    fn layer_norm_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let shape = x.shape();
        let d = shape[shape.num_dims() - 1];
        let (xs, dy, gamma) = (values(&x), values(&output_grad), values(&gamma));
        let (mean, variance) = (values(&mean), values(&variance));
        let mut x_grad = zeros(xs.len());
        let per_task = rows_per_task(d);
        let partials: Vec<Vec<f32>> = x_grad
            .par_chunks_mut(per_task * d)
            .enumerate()
            .map(|(task, dx)| {
                let (mut gamma_grad, mut beta_grad) = (vec![0f32; d], vec![0f32; d]);
                let (mut xhat, mut g) = (vec![0f32; d], vec![0f32; d]);
                widest(
                    #[inline(always)]
                    || {
                        // All d long, so that the loops below check no bounds and vectorise.
                        let (gamma, xhat, g) = (&gamma[..d], &mut xhat[..d], &mut g[..d]);
                        let (gamma_grad, beta_grad) = (&mut gamma_grad[..d], &mut beta_grad[..d]);
                        for (r, dx) in dx.chunks_exact_mut(d).enumerate() {
                            let row = task * per_task + r;
                            let (x, dy) = (&xs[row * d..][..d], &dy[row * d..][..d]);
                            let rstd = (1.0 / (variance[row] as f64 + epsilon).sqrt()) as f32;
                            let mu = mean[row];
                            for k in 0..d {
                                xhat[k] = (x[k] - mu) * rstd;
                                g[k] = dy[k] * gamma[k];
                                gamma_grad[k] += dy[k] * xhat[k];
                                beta_grad[k] += dy[k];
                            }
                            // dx = (1/σ)·(g − mean(g) − x̂·mean(g·x̂)), g = dy·γ.
                            let [sum_g, sum_gx] = sums(&g, &xhat, 0.0);
                            let (mean_g, mean_gx) =
                                ((sum_g / d as f64) as f32, (sum_gx / d as f64) as f32);
                            for k in 0..d {
                                dx[k] = rstd * (g[k] - mean_g - xhat[k] * mean_gx);
                            }
                        }
                    },
                );
                [gamma_grad, beta_grad].concat()
            })
            .collect();
        let mut gamma_grad = sum_in_order(partials, 2 * d);
        let beta_grad = gamma_grad.split_off(d);
        let params = Shape::new([d]);
        (
            flex_tensor(x_grad, shape),
            flex_tensor(gamma_grad, params.clone()),
            flex_tensor(beta_grad, params),
        )
    }

    fn conv2d(x: FlexTensor, weight: FlexTensor, geometry: ConvGeometry) -> FlexTensor {
        let Some(shape) = conv_shape(&x, &weight, geometry) else {
            return <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, geometry.options());
        };
        let (xs, ws) = (values(&x), values(&weight));
        let (n, co) = (x.shape()[0], weight.shape()[0]);
        let (image, rows, positions) = (xs.len() / n, shape.rows(), shape.positions());
        let products = geometry.products;
        let mut output = Vec::with_capacity(n * co * positions);
        let per_task = images_per_task(n);
        let tap_major = match shape.is_tap_by_tap() {
            true => shape.tap_major(&ws, co),
            false => Vec::new(),
        };
        let group = shape.images_per_product(per_task);
        let packed = shape.packed_weights((&ws, &tap_major), (co, group), false);
        let direct = shape.direct_forward(&ws, co);
        let blocked = shape
            .blocked
            .then(|| shape.blocked_forward(&ws, co, per_task));
        let group = blocked.as_ref().map_or(group, |b| b.group);
        let index = match blocked {
            Some(_) => Vec::new(),
            None => shape.column_index(),
        };
        output.spare_capacity_mut()[..n * co * positions]
            .par_chunks_mut(per_task * co * positions)
            .enumerate()
            .for_each(|(task, out)| {
                let mut cols = shape.column_buffer(group);
                let mut grouped = match blocked {
                    Some(_) => Vec::new(),
                    None => shape.group_buffer(co, group),
                };
                let (mut padded, mut wide) = (shape.padded_buffer(), shape.wide_buffer(co));
                let mut cl = blocked
                    .as_ref()
                    .map_or((Vec::new(), Vec::new()), |b| b.buffers(co));
                for (g, out) in out.chunks_mut(group * co * positions).enumerate() {
                    let out = zeroed(out);
                    let (first, count) =
                        (task * per_task + g * group, out.len() / (co * positions));
                    let images = &xs[first * image..(first + count) * image];
                    if let Some(plan) = &blocked {
                        plan.forward(&shape, images, co, &mut cl, out);
                        continue;
                    }
                    if shape.is_tap_by_tap() {
                        shape.pad(images, &mut padded);
                        let weights = (&tap_major[..], &packed[..], direct.as_ref());
                        shape.forward_taps(weights, co, &padded, &mut wide);
                        let ([oh, ow], wp) = (shape.output, shape.padded()[1]);
                        copy_rows(&wide, wp, out, ow, co * oh, ow);
                        continue;
                    }
                    let cols = shape.columns(images, &index, &mut cols);
                    let n = count * positions;
                    // out[Co, G·P] = W[Co, K] · cols[K, G·P], the images side by side.
                    let dst = match count {
                        1 => &mut *out,
                        _ => &mut grouped[..co * n],
                    };
                    let (weights, cols) = (((&ws[..], rows, 1), packed.first()), (cols, n, 1));
                    gemm_reusing(products, [co, rows, n], weights, cols, (dst, n), false, 1.0);
                    if count > 1 {
                        ungroup_blocks(&grouped[..co * n], (co, positions), out);
                    }
                }
            });
        // SAFETY: every image's part went through `zeroed` above.
        unsafe { output.set_len(n * co * positions) };
        flex_tensor(
            output,
            Shape::new([n, co, shape.output[0], shape.output[1]]),
        )
    }

    fn conv2d_backward(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        geometry: ConvGeometry,
    ) -> (FlexTensor, FlexTensor) {
        let Some(shape) = conv_shape(&x, &weight, geometry) else {
            let options = geometry.options();
            let x_grad = <Flex as ModuleOps<Flex>>::conv2d_x_backward(
                x.clone(),
                weight.clone(),
                output_grad.clone(),
                options.clone(),
            );
            let weight_grad =
                <Flex as ModuleOps<Flex>>::conv2d_weight_backward(x, weight, output_grad, options);
            return (x_grad, weight_grad);
        };
        let (xs, ws, dy) = (values(&x), values(&weight), values(&output_grad));
        let (n, co) = (x.shape()[0], weight.shape()[0]);
        let (image, rows, positions) = (xs.len() / n, shape.rows(), shape.positions());
        let products = geometry.products;
        let mut x_grad = Vec::with_capacity(xs.len());
        let per_task = images_per_task(n);
        let tap_major = match shape.is_tap_by_tap() {
            true => shape.tap_major(&ws, co),
            false => Vec::new(),
        };
        // The weights transposed, packed for the input gradient's products.
        let group = shape.images_per_product(per_task);
        let packed = shape.packed_weights((&ws, &tap_major), (co, group), true);
        let direct = shape.direct_backward(co);
        let blocked = shape
            .is_blocked_backward()
            .then(|| shape.blocked_backward(&ws, co, per_task));
        let group = blocked.as_ref().map_or(group, |b| b.forward.group);
        let index = match blocked {
            Some(_) => Vec::new(),
            None => shape.column_index(),
        };
        let at_once = shape.weight_grad_at_once(n, co);
        let weight_grad: Vec<Vec<f32>> = x_grad.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(per_task * image)
            .enumerate()
            .map(|(task, dx)| {
                // Kept transposed, [K, Co]: gemm makes its destination column-major, so the
                // operand it packs whole is then dy [Co, P], not the K/Co times larger cols.
                let mut weight_grad_t = vec![0f32; if at_once { 0 } else { rows * co }];
                let mut cols = shape.column_buffer(group);
                let mut col_grad = cols.clone();
                let mut grouped = match blocked {
                    Some(_) => Vec::new(),
                    None => shape.group_buffer(co, group),
                };
                let (mut padded, mut grad) = (shape.padded_buffer(), shape.grad_buffer(co));
                let mut padded_grad = padded.clone();
                let mut cl = blocked.as_ref().map(|b| b.buffers(co));
                for (g, dx) in dx.chunks_mut(group * image).enumerate() {
                    let dx = zeroed(dx);
                    let (first, count) = (task * per_task + g * group, dx.len() / image);
                    let dy = &dy[first * co * positions..(first + count) * co * positions];
                    let images = &xs[first * image..(first + count) * image];
                    if let (Some(plan), Some(cl)) = (&blocked, &mut cl) {
                        plan.backward(&shape, (images, dy), co, cl, &mut weight_grad_t, dx);
                        continue;
                    }
                    if shape.is_tap_by_tap() {
                        shape.pad(images, &mut padded);
                        shape.spread_grad(dy, co, &mut grad);
                        shape.backward_taps(
                            (&tap_major, &packed, co, &direct),
                            &padded,
                            (dy, &grad),
                            &mut weight_grad_t,
                            &mut padded_grad,
                        );
                        shape.unpad(&padded_grad, dx);
                        continue;
                    }
                    // The images side by side: dy[Co, G·P], cols[K, G·P].
                    let n = count * positions;
                    let dy = match count {
                        1 => dy,
                        _ => {
                            group_blocks(dy, (co, positions), &mut grouped[..co * n]);
                            &grouped[..co * n]
                        }
                    };
                    if !at_once {
                        // dWᵀ[K, Co] += cols[K, G·P] · dy[Co, G·P]ᵀ
                        let cols = shape.columns(images, &index, &mut cols);
                        let (cols, dy) = ((cols, n, 1), (dy, 1, n));
                        gemm(products, [rows, n, co], cols, dy, &mut weight_grad_t, true);
                    }
                    // dcols[K, G·P] = W[Co, K]ᵀ · dy[Co, G·P], folded back onto the images.
                    let transposed = ((&ws[..], 1, rows), packed.first());
                    let dy = (dy, n, 1);
                    let dims = [rows, co, n];
                    match shape.is_pointwise() {
                        true => gemm_reusing(products, dims, transposed, dy, (dx, n), false, 1.0),
                        false => {
                            let grad = (&mut col_grad[..rows * n], n);
                            gemm_reusing(products, dims, transposed, dy, grad, false, 1.0);
                            col2im(&col_grad[..rows * n], &index, dx, (image, positions));
                        }
                    }
                }
                weight_grad_t
            })
            .collect();
        // SAFETY: every image's part went through `zeroed` above.
        unsafe { x_grad.set_len(xs.len()) };
        let weight_grad = match at_once {
            true => shape.weight_grad(&xs, &dy, co, &index),
            false => transpose(&sum_in_order(weight_grad, co * rows), [rows, co]),
        };
        (
            flex_tensor(x_grad, x.shape()),
            flex_tensor(weight_grad, weight.shape()),
        )
    }

    fn batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_forward(x, gamma, beta, epsilon, false)
    }

    fn batch_norm_train_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_backward(x, [gamma, mean, variance], None, epsilon, output_grad)
    }

    fn batch_norm_relu_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_forward(x, gamma, beta, epsilon, true)
    }

    fn batch_norm_relu_train_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_backward(x, [gamma, mean, variance], Some(beta), epsilon, output_grad)
    }
}

/// Training-mode batch norm on `flex` ([`CpuKernels::batch_norm_train`]), with `relu` a ReLU
/// on its output in the same pass ([`CpuKernels::batch_norm_relu_train`]). The statistics in one
/// pass, Σx and Σx² in f64 (f32 values square exactly in f64, so the variance E[x²] − μ² loses
/// only about μ²/σ² · 1e-16 of itself). With `relu` they are returned in f64, so that its
/// backward pass recomputes the ReLU's mask from x bit for bit. (Rounding them to f32 for
/// the output instead moved SwAV's gradients by 6e-4 against two ranks' synchronised batch
/// norm in `tests/dist.rs`, for 1e-5 allowed: an error alike at every position of a channel.)
fn batch_norm_forward(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    epsilon: f64,
    relu: bool,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    if !fused_batch_norm(&x, [&gamma, &beta]) {
        let r = <Flex as ModuleOps<Flex>>::batch_norm_train(x, gamma, beta, epsilon);
        let output = match relu {
            true => <Flex as ActivationOps<Flex>>::relu(r.output),
            false => r.output,
        };
        return (output, r.mean, r.variance);
    }
    let (n, c, s) = batch_channels(&x);
    let shape = x.shape();
    let xs = values(&x);
    let (gamma, beta) = (values(&gamma), values(&beta));
    let count = (n * s) as f64;
    let (sum, squares) = channel_sums(&xs, &xs, &vec![0.0; c], None, c, s);
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let variance: Vec<f64> = (squares.iter().zip(&mean))
        .map(|(q, m)| (q / count - m * m).max(0.0))
        .collect();
    let coef = bn_coef(&gamma, &beta, [&mean, &variance], epsilon);
    let fused = if relu { Relu::Output } else { Relu::Off };
    let output = channel_affine(&xs, None, &coef, fused, c, s);
    let statistic = |v: Vec<f64>| match relu {
        true => FlexTensor::new(
            Bytes::from_elems(v),
            Layout::contiguous(Shape::new([c])),
            DType::F64,
        ),
        false => flex_tensor(v.into_iter().map(|v| v as f32).collect(), Shape::new([c])),
    };
    (
        flex_tensor(output, shape),
        statistic(mean),
        statistic(variance),
    )
}

/// Batch norm's output coefficients `[γ/σ, 0, μ, β]` from its statistics `[mean, variance]`
/// ([`channel_affine`]).
fn bn_coef(
    gamma: &[f32],
    beta: &[f32],
    [mean, variance]: [&[f64]; 2],
    epsilon: f64,
) -> Vec<[f64; 4]> {
    (0..gamma.len())
        .map(|ch| {
            let scale = gamma[ch] as f64 / (variance[ch] + epsilon).sqrt();
            [scale, 0.0, mean[ch], beta[ch] as f64]
        })
        .collect()
}

/// The values of an f32 or f64 tensor, in f64.
fn in_f64(x: &FlexTensor) -> Vec<f64> {
    match x.dtype() {
        DType::F64 => x.to_contiguous().as_slice::<f64>().unwrap().to_vec(),
        _ => values(x).iter().map(|&v| v as f64).collect(),
    }
}

/// The gradients (x, γ, β) of [`batch_norm_forward`] from x, `[γ, mean, variance]` and the
/// output's gradient; with `relu_beta` (β) of its fused batch norm + ReLU, the output's gradient
/// counted only where the forward output passed the ReLU (recomputed from x: [`Relu::Mask`]).
fn batch_norm_backward(
    x: FlexTensor,
    [gamma, mean, variance]: [FlexTensor; 3],
    relu_beta: Option<FlexTensor>,
    epsilon: f64,
    output_grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let statistic = |t: &FlexTensor| {
        matches!(t.dtype(), DType::F32 | DType::F64) && t.shape().num_elements() == x.shape()[1]
    };
    let fused = fused_batch_norm(&x, [&gamma])
        && relu_beta
            .as_ref()
            .is_none_or(|beta| fused_batch_norm(&x, [beta]))
        && statistic(&mean)
        && statistic(&variance)
        && output_grad.dtype() == DType::F32;
    if !fused {
        // burn's ops; with the ReLU, its mask from burn's batch norm with the kept statistics.
        let output_grad = match relu_beta {
            Some(beta) => {
                let output = <Flex as ModuleOps<Flex>>::batch_norm(
                    x.clone(),
                    gamma.clone(),
                    beta,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                let output = <Flex as ActivationOps<Flex>>::relu(output);
                <Flex as CpuKernels>::relu_backward(output, output_grad)
            }
            None => output_grad,
        };
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
    let gamma = values(&gamma);
    let (mu, variance) = (in_f64(&mean), in_f64(&variance));
    let forward = relu_beta.map(|beta| bn_coef(&gamma, &values(&beta), [&mu, &variance], epsilon));
    // Σdy and Σdy·(x − μ) per channel give β's and γ's gradients (Σdy·x̂ = Σdy·(x − μ)/σ).
    let (sum_dy, sum_dy_centred) = channel_sums(&dy, &xs, &mu, forward.as_deref(), c, s);
    let count = (n * s) as f64;
    let mut gamma_grad = vec![0f32; c];
    let coef: Vec<[f64; 4]> = (0..c)
        .map(|ch| {
            let inv_std = 1.0 / (variance[ch] + epsilon).sqrt();
            let dy_xhat = sum_dy_centred[ch] * inv_std;
            gamma_grad[ch] = dy_xhat as f32;
            // dx = γ/σ · (dy − mean(dy) − x̂ · mean(dy·x̂)) = a·dy + b·(x − μ) + d.
            let a = gamma[ch] as f64 * inv_std;
            let b = -a * inv_std * dy_xhat / count;
            [a, b, mu[ch], -a * sum_dy[ch] / count]
        })
        .collect();
    let mask = match &forward {
        Some(forward) => Relu::Mask(forward),
        None => Relu::Off,
    };
    let x_grad = channel_affine(&dy, Some(&xs), &coef, mask, c, s);
    let beta_grad = sum_dy.iter().map(|&v| v as f32).collect();
    (
        flex_tensor(x_grad, shape),
        flex_tensor(gamma_grad, Shape::new([c])),
        flex_tensor(beta_grad, Shape::new([c])),
    )
}

/// A normalisation's forward pass on the inner backend: (output, mean, variance) of
/// (x, γ, β, ε), and its backward: (x, γ, β) gradients of (x, γ, β, mean, variance, ε, output
/// grad) (β for a fused ReLU's mask; plain normalisations ignore it).
pub(crate) type NormForward<B> = fn(
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);
pub(crate) type NormBackwardFn<B> = fn(
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    f64,
    FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// The backward step of [`CpuKernels::relu`] and [`CpuKernels::add_relu`] from their kept
/// output: the output's gradient where that output is positive (or NaN), to every parent.
#[derive(Debug)]
struct ReluBackward;

impl<B: Backend + CpuKernels, const N: usize> Backward<B, N> for ReluBackward {
    /// The op's output.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let grad = <B as CpuKernels>::relu_backward(ops.state, grad);
        for node in ops.parents.into_iter().flatten() {
            grads.register::<B>(node.id, grad.clone());
        }
    }
}

/// The backward step of [`normalization`].
#[derive(Debug)]
struct NormBackward<B: Backend> {
    backward: NormBackwardFn<B>,
}

impl<B: Backend> Backward<B, 3> for NormBackward<B> {
    /// (x, γ, β) as checkpointed nodes, the batch or row mean and variance, ε.
    type State = ([NodeId; 3], FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (kept, mean, variance, epsilon) = ops.state;
        let [x, gamma, beta] = kept.map(|n| checkpointer.retrieve_node_output::<FloatTensor<B>>(n));
        let (x_grad, gamma_grad, beta_grad) =
            (self.backward)(x, gamma, beta, mean, variance, epsilon, grad);
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

/// Batch norm or layer norm under autodiff: the fused forward on the inner backend, (x, γ, β)
/// checkpointed with the statistics it returned, and the fused backward (burn's own autodiff
/// step for batch norm, with the fused kernels).
pub(crate) fn normalization<B: Backend, C: CheckpointStrategy>(
    [x, gamma, beta]: [FloatTensor<Autodiff<B, C>>; 3],
    epsilon: f64,
    forward: NormForward<B>,
    backward: NormBackwardFn<B>,
) -> (
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
    FloatTensor<Autodiff<B, C>>,
) {
    let statistic = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    match (NormBackward { backward })
        .prepare::<C>([x.node(), gamma.node(), beta.node()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let kept = [
                prep.checkpoint(&x),
                prep.checkpoint(&gamma),
                prep.checkpoint(&beta),
            ];
            let (output, mean, variance) = forward(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                epsilon,
            );
            let state = (kept, mean.clone(), variance.clone(), epsilon);
            (
                prep.finish(state, output),
                statistic(mean),
                statistic(variance),
            )
        }
        OpsKind::UnTracked(prep) => {
            let (output, mean, variance) = forward(
                x.into_primitive(),
                gamma.into_primitive(),
                beta.into_primitive(),
                epsilon,
            );
            (prep.finish(output), statistic(mean), statistic(variance))
        }
    }
}

impl<B: Backend + CpuKernels, C: CheckpointStrategy> CpuKernels for Autodiff<B, C> {
    fn attention(
        qkv: FloatTensor<Self>,
        heads: usize,
        scale: f64,
        products: Products,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        /// The backward step: the qkv gradient from the checkpointed qkv and the kept weights.
        #[derive(Debug)]
        struct AttentionBackward;

        impl<B: Backend + CpuKernels> Backward<B, 1> for AttentionBackward {
            /// qkv as a checkpointed node, the softmax weights, heads, scale, products.
            type State = (NodeId, FloatTensor<B>, usize, f64, Products);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let (qkv, weights, heads, scale, products) = ops.state;
                let qkv = checkpointer.retrieve_node_output::<FloatTensor<B>>(qkv);
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    <B as CpuKernels>::attention_backward(
                        qkv, weights, grad, heads, scale, products,
                    )
                });
            }
        }

        let weights_only = <Autodiff<B, C> as AutodiffBackend>::from_inner;
        match AttentionBackward
            .prepare::<C>([qkv.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let qkv_state = prep.checkpoint(&qkv);
                let (out, weights) =
                    <B as CpuKernels>::attention(qkv.into_primitive(), heads, scale, products);
                let state = (qkv_state, weights.clone(), heads, scale, products);
                (prep.finish(state, out), weights_only(weights))
            }
            OpsKind::UnTracked(prep) => {
                let (out, weights) =
                    <B as CpuKernels>::attention(qkv.into_primitive(), heads, scale, products);
                (prep.finish(out), weights_only(weights))
            }
        }
    }

    fn adamw_step(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (w, m, v) = <B as CpuKernels>::adamw_step(
            w.into_primitive(),
            g.into_primitive(),
            moment_1.into_primitive(),
            moment_2.into_primitive(),
            step,
        );
        let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
        (untracked(w), untracked(m), untracked(v))
    }

    fn ema(teacher: FloatTensor<Self>, student: FloatTensor<Self>, m: f64) -> FloatTensor<Self> {
        let blended = <B as CpuKernels>::ema(teacher.into_primitive(), student.into_primitive(), m);
        <Autodiff<B, C> as AutodiffBackend>::from_inner(blended)
    }

    fn linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        products: Products,
    ) -> FloatTensor<Self> {
        /// The backward step: the three gradients from the checkpointed x and weight.
        #[derive(Debug)]
        struct LinearBackward;

        impl<B: Backend + CpuKernels> Backward<B, 3> for LinearBackward {
            /// x and the weight as checkpointed nodes, the products.
            type State = (NodeId, NodeId, Products);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight, node_bias] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state.0);
                let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state.1);
                let (x_grad, weight_grad, bias_grad) =
                    <B as CpuKernels>::linear_backward(x, weight, grad, ops.state.2);
                for (node, grad) in [
                    (node_x, x_grad),
                    (node_weight, weight_grad),
                    (node_bias, bias_grad),
                ] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match LinearBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), products);
                let output = <B as CpuKernels>::linear(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    products,
                );
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as CpuKernels>::linear(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                products,
            )),
        }
    }

    fn gelu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        /// The backward step: the fused kernel's derivative at the checkpointed input.
        #[derive(Debug)]
        struct GeluBackward;

        impl<B: Backend + CpuKernels> Backward<B, 1> for GeluBackward {
            type State = NodeId;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(ops.state);
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    <B as CpuKernels>::gelu_backward(x, grad)
                });
            }
        }

        match GeluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = prep.checkpoint(&x);
                prep.finish(state, <B as CpuKernels>::gelu(x.into_primitive()))
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as CpuKernels>::gelu(x.into_primitive())),
        }
    }

    fn relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match ReluBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = <B as CpuKernels>::relu(x.into_primitive());
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as CpuKernels>::relu(x.into_primitive())),
        }
    }

    fn log_softmax(x: FloatTensor<Self>) -> FloatTensor<Self> {
        /// The backward step from the kept output.
        #[derive(Debug)]
        struct LogSoftmaxBackward;

        impl<B: Backend + CpuKernels> Backward<B, 1> for LogSoftmaxBackward {
            /// The op's output.
            type State = FloatTensor<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                unary::<B, _>(ops.parents, ops.node, grads, |grad| {
                    <B as CpuKernels>::log_softmax_backward(ops.state, grad)
                });
            }
        }

        let node = x.node();
        let output = <B as CpuKernels>::log_softmax(x.into_primitive());
        match LogSoftmaxBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(output.clone(), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn add_relu(x: FloatTensor<Self>, y: FloatTensor<Self>) -> FloatTensor<Self> {
        if x.shape() != y.shape() {
            // A broadcast sum: burn's ops, whose backward sums the gradient to each shape.
            return <Self as ActivationOps<Self>>::relu(<Self as FloatTensorOps<Self>>::float_add(
                x, y,
            ));
        }
        let nodes = [x.node(), y.node()];
        let output = <B as CpuKernels>::add_relu(x.into_primitive(), y.into_primitive());
        match ReluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(output.clone(), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        }
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        normalization::<B, C>(
            [x, gamma, beta],
            epsilon,
            <B as CpuKernels>::layer_norm,
            |x, gamma, _, mean, variance, epsilon, grad| {
                <B as CpuKernels>::layer_norm_backward(x, gamma, mean, variance, epsilon, grad)
            },
        )
    }

    fn conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self> {
        /// The backward step: both gradients from one pass of the fused kernel.
        #[derive(Debug)]
        struct Conv2dBackward;

        impl<B: Backend + CpuKernels> Backward<B, 2> for Conv2dBackward {
            /// x and the weight as checkpointed nodes, the geometry.
            type State = (NodeId, NodeId, ConvGeometry);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight] = ops.parents;
                let grad = grads.consume::<B>(&ops.node);
                let (x, weight, geometry) = ops.state;
                let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x);
                let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight);
                let (x_grad, weight_grad) =
                    <B as CpuKernels>::conv2d_backward(x, weight, grad, geometry);
                for (node, grad) in [(node_x, x_grad), (node_weight, weight_grad)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, grad);
                    }
                }
            }
        }

        match Conv2dBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), geometry);
                let output = <B as CpuKernels>::conv2d(
                    x.into_primitive(),
                    weight.into_primitive(),
                    geometry,
                );
                prep.finish(state, output)
            }
            OpsKind::UnTracked(prep) => prep.finish(<B as CpuKernels>::conv2d(
                x.into_primitive(),
                weight.into_primitive(),
                geometry,
            )),
        }
    }

    fn batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        normalization::<B, C>(
            [x, gamma, beta],
            epsilon,
            <B as CpuKernels>::batch_norm_train,
            |x, gamma, _, mean, variance, epsilon, grad| {
                <B as CpuKernels>::batch_norm_train_backward(
                    x, gamma, mean, variance, epsilon, grad,
                )
            },
        )
    }

    fn batch_norm_relu_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        normalization::<B, C>(
            [x, gamma, beta],
            epsilon,
            <B as CpuKernels>::batch_norm_relu_train,
            <B as CpuKernels>::batch_norm_relu_train_backward,
        )
    }
}

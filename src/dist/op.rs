//! The differentiable collectives, through burn's backend extension: a sum over ranks whose
//! backward pass is again a sum over ranks (`torch.distributed.nn.all_reduce`; SimCLR's gather
//! with gradient is a sum of zero-padded rows, [`super::all_gather_rows`]), and synchronised
//! batch norm, whose statistics and backward sums are summed over ranks.
//!
//! Why the backward is a sum: every rank's loss L_s depends on the summed y = Σ_r x_r, and data
//! parallelism trains (1/W)·Σ_s L_s; rank r's share of the gradient through x_r is therefore
//! Σ_s ∂L_s/∂y, the sum over ranks of the gradients each rank holds for y.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{backend_extension, Autodiff, Backend, Dispatch, Flex, TensorMetadata};
use burn::tensor::{try_read_sync, Tensor, TensorData};

/// The collectives, for `flex`, the GPU backends (cubecl's CUDA and wgpu, fused or not) and,
/// with their backward passes, autodiff over them. Each stages through host memory, so one
/// body serves every backend; the `*_backward` op is the inner backend's, called by autodiff.
#[backend_extension(Flex, Cube: cfg(any(feature = "cuda", feature = "wgpu")), Autodiff)]
pub trait Collective: Backend {
    /// Σ over ranks of `x` (every rank passes the same shape).
    fn all_reduce_sum(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (mut values, like) = to_host::<Self>(x);
        super::world().all_reduce_sum(&mut values);
        like.tensor(values)
    }

    /// Batch norm in training over the global batch: `x` `[n, C, ...]` (every rank as many
    /// rows), γ and β `[C]`; (output, mean, biased variance), the statistics `[C]`. The sums
    /// are taken in f64 on each rank, then summed over ranks.
    fn sync_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (mut x, like) = to_host::<Self>(x);
        let (gamma, g) = to_host::<Self>(gamma);
        let (beta, _) = to_host::<Self>(beta);
        let c = gamma.len();
        let per = x.len() / like.shape[0] / c;
        let channel = |i: usize| i / per % c;
        let count = (x.len() / c * super::world().size()) as f64;
        let mut sums = vec![0f64; c];
        x.iter()
            .enumerate()
            .for_each(|(i, &v)| sums[channel(i)] += v as f64);
        let mean = summed(&sums, count);
        let mut sums = vec![0f64; c];
        x.iter()
            .enumerate()
            .for_each(|(i, &v)| sums[channel(i)] += (v as f64 - mean[channel(i)]).powi(2));
        let variance = summed(&sums, count);
        let scale: Vec<f64> = (0..c)
            .map(|ch| gamma[ch] as f64 / (variance[ch] + epsilon).sqrt())
            .collect();
        for (i, v) in x.iter_mut().enumerate() {
            let ch = channel(i);
            *v = ((*v as f64 - mean[ch]) * scale[ch] + beta[ch] as f64) as f32;
        }
        let f32s = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect::<Vec<f32>>();
        (
            like.tensor(x),
            g.tensor(f32s(mean)),
            g.tensor(f32s(variance)),
        )
    }

    /// Gradients (x, γ, β) of [`Collective::sync_batch_norm`]: with x̂ = (x − mean)/σ,
    /// dx = γ/σ·(dy − Σdy/M − x̂·Σ(dy·x̂)/M), the two sums over every rank's M rows·positions
    /// (so that each rank's dx is that of Σ over ranks of their losses); dγ = Σ dy·x̂ and
    /// dβ = Σ dy over this rank's rows (averaged over ranks with the other gradients).
    fn sync_batch_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (x, like) = to_host::<Self>(x);
        let (gamma, g) = to_host::<Self>(gamma);
        let (mean, _) = to_host::<Self>(mean);
        let (variance, _) = to_host::<Self>(variance);
        let (dy, _) = to_host::<Self>(output_grad);
        let c = gamma.len();
        let per = x.len() / like.shape[0] / c;
        let channel = |i: usize| i / per % c;
        let inv: Vec<f64> = (0..c)
            .map(|ch| 1.0 / (variance[ch] as f64 + epsilon).sqrt())
            .collect();
        let xhat = |i: usize| (x[i] as f64 - mean[channel(i)] as f64) * inv[channel(i)];
        let (mut sum_dy, mut sum_dy_xhat) = (vec![0f64; c], vec![0f64; c]);
        for (i, &d) in dy.iter().enumerate() {
            sum_dy[channel(i)] += d as f64;
            sum_dy_xhat[channel(i)] += d as f64 * xhat(i);
        }
        let count = (x.len() / c * super::world().size()) as f64;
        let both: Vec<f64> = sum_dy.iter().chain(&sum_dy_xhat).copied().collect();
        let both = summed(&both, count);
        let x_grad: Vec<f32> = dy
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                let ch = channel(i);
                let centred = d as f64 - both[ch] - xhat(i) * both[c + ch];
                (gamma[ch] as f64 * inv[ch] * centred) as f32
            })
            .collect();
        let f32s = |v: Vec<f64>| v.into_iter().map(|s| s as f32).collect::<Vec<f32>>();
        (
            like.tensor(x_grad),
            g.tensor(f32s(sum_dy_xhat)),
            g.tensor(f32s(sum_dy)),
        )
    }
}

/// `sums` summed over ranks, over `count`.
fn summed(sums: &[f64], count: f64) -> Vec<f64> {
    let mut all = sums.to_vec();
    super::world().all_reduce_sum_f64(&mut all);
    all.into_iter().map(|v| v / count).collect()
}

/// The shape, dtype and device a host copy came from, to make a tensor like it.
struct Like<B: Backend> {
    shape: burn::tensor::Shape,
    dtype: burn::tensor::DType,
    device: B::Device,
}

impl<B: Backend> Like<B> {
    fn tensor(&self, values: Vec<f32>) -> FloatTensor<B> {
        let data = TensorData::new(values, self.shape.clone()).convert_dtype(self.dtype);
        B::float_from_data(data, &self.device)
    }
}

/// `x` as f32 values on the host, and what it was.
fn to_host<B: Backend>(x: FloatTensor<B>) -> (Vec<f32>, Like<B>) {
    let like = Like {
        shape: x.shape(),
        dtype: x.dtype(),
        device: x.device(),
    };
    let data = try_read_sync(B::float_into_data(x))
        .expect("a tensor read synchronously")
        .expect("a tensor read from the device");
    let values = data
        .convert::<f32>()
        .try_into_vec()
        .expect("f32 values after conversion");
    (values, like)
}

impl Collective for Flex {}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl Collective for burn::backend::Cube {}

impl<B: Backend + Collective, C: CheckpointStrategy> Collective for Autodiff<B, C> {
    fn all_reduce_sum(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct AllReduceBackward;

        impl<B: Backend + Collective> Backward<B, 1> for AllReduceBackward {
            type State = ();

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                unary::<B, _>(ops.parents, ops.node, grads, B::all_reduce_sum);
            }
        }

        AllReduceBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateless(B::all_reduce_sum(x.into_primitive()))
    }

    fn sync_batch_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        crate::kernels::normalization::<B, C>(
            [x, gamma, beta],
            epsilon,
            <B as Collective>::sync_batch_norm,
            |x, gamma, _, mean, variance, epsilon, grad| {
                <B as Collective>::sync_batch_norm_backward(x, gamma, mean, variance, epsilon, grad)
            },
        )
    }
}

/// Batch norm of `x` `[n, C, ...]` in training over every rank's rows, differentiable:
/// (output, mean, biased variance).
pub fn sync_batch_norm<const D: usize>(
    x: Tensor<D>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
) -> (Tensor<D>, Tensor<1>, Tensor<1>) {
    let (output, mean, variance) = <Dispatch as Collective>::sync_batch_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
    );
    (
        Tensor::from_dispatch(output),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(variance),
    )
}

/// Σ over ranks of `x`, differentiable: the gradient of `x` is the sum over ranks of the
/// gradients of the result. The identity at world size 1.
pub fn all_reduce<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if super::world().size() == 1 {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as Collective>::all_reduce_sum(x.into_dispatch()))
}

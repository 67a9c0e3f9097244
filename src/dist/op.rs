//! The one differentiable collective: a sum over ranks whose backward pass is again a sum over
//! ranks (`torch.distributed.nn.all_reduce`), through burn's backend extension. With it,
//! synchronised batch norm is ordinary tensor algebra on globally summed statistics, and
//! SimCLR's gather with gradient is a sum of zero-padded rows ([`super::all_gather_rows`]).
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

/// The sum over ranks, for `flex` and, with its backward pass, autodiff over it.
#[backend_extension(Flex, Autodiff)]
pub trait Collective: Backend {
    /// Σ over ranks of `x` (every rank passes the same shape), staged through host memory.
    fn all_reduce_sum(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let (shape, dtype, device) = (x.shape(), x.dtype(), x.device());
        let data = try_read_sync(Self::float_into_data(x))
            .expect("a tensor read synchronously")
            .expect("a tensor read from the device");
        let mut values: Vec<f32> = data
            .convert::<f32>()
            .try_into_vec()
            .expect("f32 values after conversion");
        super::world().all_reduce_sum(&mut values);
        let summed = TensorData::new(values, shape).convert_dtype(dtype);
        Self::float_from_data(summed, &device)
    }
}

impl Collective for Flex {}

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
}

/// Σ over ranks of `x`, differentiable: the gradient of `x` is the sum over ranks of the
/// gradients of the result. The identity at world size 1. On `flex` (the CPU backend) only for
/// now: a GPU run with several ranks refuses at start (see `pretrain`).
pub fn all_reduce<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if super::world().size() == 1 {
        return x;
    }
    Tensor::from_dispatch(<Dispatch as Collective>::all_reduce_sum(x.into_dispatch()))
}

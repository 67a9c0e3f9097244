//! Mixed precision (`train.precision`), as `torch.autocast` and `torch.cuda.amp.GradScaler` do
//! it: matmuls, convolutions and the attention's two products compute in bf16 or f16 inside
//! [`autocast`]; the weights, their gradients, the optimiser's state, EMA teachers, queues,
//! centres, batch norm, layer norm, softmax and every loss stay f32.
//!
//! burn 0.22 has no autocast, so the layers call [`linear`], [`matmul`], [`conv2d`] and
//! [`conv_transpose2d`], which cast their operands to the autocast's dtype and their result back
//! to f32 (`Tensor::cast` is differentiable: each gradient comes back in its operand's dtype).
//! Activations between layers stay f32, unlike PyTorch's, where a matmul's output stays bf16
//! until an f32 op reads it: the same arithmetic, more memory traffic.
//!
//! On the CPU (`flex`) with Intel AMX or AVX-512 BF16 (AMD Zen 4 and later), a bf16 autocast
//! keeps the fused kernels (convolutions, linears, attention) and computes their products with
//! those instructions: operands rounded to bf16, sums in f32 ([`crate::bf16`],
//! [`crate::kernels::Products`]); products too small to gain stay f32. Without either the casts
//! above take burn-flex's bf16 ops, slower than f32.
//!
//! f16's narrow range needs the loss scaled before the backward pass and the gradients unscaled
//! after it ([`LossScale`]); bf16 has f32's range and needs none.

use std::cell::Cell;

use anyhow::{bail, Result};
use burn::backend::ops::{ConvOptions, ConvTransposeOptions};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::ConvTranspose2d;
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{Device, FloatDType, Int, Tensor};
use serde::{Deserialize, Serialize};

/// The dtype matmuls and convolutions compute in during training (`train.precision`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// bfloat16 products (8-bit mantissa, f32's range): no loss scaling.
    Bf16,
    /// IEEE half products (11-bit mantissa, largest 65,504): with dynamic loss scaling.
    F16,
}

impl Precision {
    /// The dtype its products compute in.
    pub fn dtype(self) -> FloatDType {
        match self {
            Precision::F32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
            Precision::F16 => FloatDType::F16,
        }
    }

    /// Refuses a precision whose arithmetic `device` lacks (Vulkan has no bf16), naming the key;
    /// on the CPU, says which engine will run bf16 products or that, slower than f32, none will.
    pub fn check_device(self, device: &Device) -> Result<()> {
        if self == Precision::Bf16 && crate::kernels::on_flex(device) {
            match crate::bf16::engine() {
                Some(engine) => tracing::info!("train.precision = \"bf16\": products on this CPU's {engine:?} bf16 instructions"),
                None => tracing::warn!("train.precision = \"bf16\": this CPU has neither AMX nor AVX-512 BF16, so bf16 products are converted to f32 and back: slower than \"f32\""),
            }
        }
        if !device.supports_dtype(self.dtype()) {
            bail!(
                "train.precision = \"{}\": device {device:?} has no {:?} arithmetic (use \"f32\"{})",
                self.name(),
                self.dtype(),
                match self {
                    Precision::Bf16 => " or \"f16\"",
                    _ => "",
                }
            );
        }
        Ok(())
    }

    /// Its name in a recipe.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }
}

thread_local! {
    static AUTOCAST: Cell<Precision> = const { Cell::new(Precision::F32) };
}

/// Runs `f` with this thread's matmuls and convolutions in `precision` (`torch.autocast`'s
/// context, thread-local as it is: each rank of a threaded test has its own).
pub fn autocast<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            AUTOCAST.set(self.0);
        }
    }
    let _restore = Restore(AUTOCAST.replace(precision));
    f()
}

/// The precision of the autocast in effect on this thread (f32 outside one).
pub fn current() -> Precision {
    AUTOCAST.get()
}

/// The dtype of the autocast in effect; `None` outside one or under f32.
fn lower() -> Option<FloatDType> {
    match AUTOCAST.get() {
        Precision::F32 => None,
        p => Some(p.dtype()),
    }
}

/// `x · w + b` of a burn `Linear` (`x` `[..., d_in]`), as `layer.forward(x)`.
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    linear_with(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// `x · weight + bias` (`weight` `[d_in, d_out]`), as `burn::tensor::module::linear`:
/// [`crate::kernels::linear`], which takes the fused kernel where it can ([`crate::kernels::Products`])
/// and [`cast_linear`] elsewhere.
pub fn linear_with<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    crate::kernels::linear(x, weight, bias)
}

/// burn's `linear` in the autocast's dtype (operands cast, the result back to f32), or in f32
/// outside one: where the fused kernel does not take a linear.
pub fn cast_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
) -> Tensor<D> {
    use burn::tensor::module::linear;
    match lower() {
        None => linear(x, weight, bias),
        Some(t) => linear(x.cast(t), weight.cast(t), bias.map(|b| b.cast(t))).cast(FloatDType::F32),
    }
}

/// `a.matmul(b)`.
pub fn matmul<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> Tensor<D> {
    match lower() {
        None => a.matmul(b),
        Some(t) => a.cast(t).matmul(b.cast(t)).cast(FloatDType::F32),
    }
}

/// `burn::tensor::module::conv2d`.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    use burn::tensor::module::conv2d;
    match lower() {
        None => conv2d(x, weight, bias, options),
        Some(t) => conv2d(x.cast(t), weight.cast(t), bias.map(|b| b.cast(t)), options)
            .cast(FloatDType::F32),
    }
}

/// `up.forward(x)`.
pub fn conv_transpose2d(up: &ConvTranspose2d, x: Tensor<4>) -> Tensor<4> {
    let Some(t) = lower() else {
        return up.forward(x);
    };
    let options = ConvTransposeOptions::new(
        up.stride,
        up.padding,
        up.padding_out,
        up.dilation,
        up.groups,
    );
    let bias = up.bias.as_ref().map(|b| b.val().cast(t));
    burn::tensor::module::conv_transpose2d(x.cast(t), up.weight.val().cast(t), bias, options)
        .cast(FloatDType::F32)
}

/// f16's dynamic loss scale, as `torch.cuda.amp.GradScaler` with its defaults: the loss is
/// multiplied by `scale` before the backward pass and the gradients divided by it after; a step
/// whose gradients hold an inf or a NaN is skipped and halves the scale, 2,000 steps in a row
/// without one double it. Saved in every checkpoint, so a resumed run scales as the
/// uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: usize,
    /// Steps skipped so far.
    pub skipped: usize,
}

impl LossScale {
    /// GradScaler's `init_scale`: 2^16.
    pub const INITIAL: f64 = 65536.0;
    /// GradScaler's `growth_interval`.
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new(scale: f64) -> Self {
        LossScale {
            scale,
            good_steps: 0,
            skipped: 0,
        }
    }

    /// `grads` (of the loss × `scale`) divided by the scale, or `None` for a step to skip when
    /// any is not finite; updates the scale either way. Errors: the device failed.
    pub fn unscale<M: Module>(
        &mut self,
        grads: GradientsParams,
        module: &M,
    ) -> Result<Option<GradientsParams>> {
        let mut unscale = Unscale {
            grads,
            factor: 1.0 / self.scale,
            non_finite: None,
        };
        module.visit(&mut unscale);
        let finite = match unscale.non_finite {
            Some(count) => count.try_into_scalar::<i64>()? == 0,
            None => true,
        };
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped += 1;
            return Ok(None);
        }
        self.good_steps += 1;
        if self.good_steps == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        Ok(Some(unscale.grads))
    }
}

/// Divides every gradient of a module by the scale, counting its non-finite values on the
/// device (one read for the whole step).
struct Unscale {
    grads: GradientsParams,
    factor: f64,
    non_finite: Option<Tensor<1, Int>>,
}

impl ModuleVisitor for Unscale {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let bad = grad.clone().is_finite().bool_not().int().sum();
        self.non_finite = Some(match self.non_finite.take() {
            Some(count) => count + bad,
            None => bad,
        });
        self.grads.register(param.id, grad.mul_scalar(self.factor));
    }
}

//! Optimisers (LARS, SGD with momentum, AdamW) and the learning-rate schedule.
//!
//! burn ships SGD and AdamW; LARS is written here as a burn `Optimizer` (burn has none), and
//! AdamW runs as [`FusedAdamW`]: burn's update, one threaded pass per parameter on the CPU.
//! Bias and normalisation parameters (the rank-1 tensors) are excluded from LARS's adaptation
//! and from weight decay in LARS and AdamW, as SimCLR, MAE and DINO do; MAE's fine-tuning also
//! exempts a ViT's class token and position embeddings (`exempt_embeddings`).

use burn::grad_clipping::GradientClipping;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::{Momentum, MomentumConfig, MomentumState};
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, ModuleOptimizer, Optimizer, SgdConfig,
};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{fraction, not_negative, positive};
use crate::kernels::AdamWStep;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Lars,
    Sgd,
    Adamw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrScaling {
    /// lr = base_lr × batch / 256 (Goyal et al.; SimCLR, MoCo, MAE, DINO).
    Linear,
    /// lr = base_lr × √batch (SimCLR's alternative for LARS at small batches).
    Sqrt,
    /// lr = base_lr.
    None,
}

/// LARS (You et al. 2017) as SimCLR uses it: for a weight w with gradient g,
///   u = g + wd·w,  trust = η·‖w‖ / ‖u‖ (1 if either norm is 0),  v ← m·v + trust·u,  w ← w − lr·v.
/// Rank-1 tensors (biases, norm scales) skip both the decay and the trust ratio.
#[derive(Clone)]
pub struct Lars {
    momentum: Momentum,
    weight_decay: f64,
    eta: f64,
}

impl Lars {
    pub fn new(momentum: f64, weight_decay: f64, eta: f64) -> Self {
        let momentum = Momentum::new(
            &MomentumConfig::new()
                .with_momentum(momentum)
                .with_dampening(0.0),
        );
        Lars {
            momentum,
            weight_decay,
            eta,
        }
    }
}

impl Optimizer for Lars {
    type State<const D: usize> = MomentumState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        w: Tensor<D>,
        g: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let u = if D > 1 {
            let u = g + w.clone().mul_scalar(self.weight_decay);
            let w_norm = w.clone().square().sum().sqrt();
            let u_norm = u.clone().square().sum().sqrt();
            let ratio = w_norm.clone().mul_scalar(self.eta) / u_norm.clone();
            let usable = w_norm.greater_elem(0.0).bool_and(u_norm.greater_elem(0.0));
            let trust = ratio.mask_where(usable.bool_not(), Tensor::ones([1], &w.device()));
            u * trust.reshape([1; D])
        } else {
            g
        };
        let (velocity, state) = self.momentum.transform(u, state);
        (w - velocity.mul_scalar(lr), Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.to_device(device)
    }
}

/// burn's `AdamW` (its state, so its checkpoints, and its f32 arithmetic bit for bit), with
/// each update one parallel pass over the parameter and its moments on `flex`
/// ([`crate::kernels::adamw_step`]) instead of thirteen single-threaded whole-tensor ops.
/// Elsewhere (GPUs, other dtypes) burn's `AdamW` itself.
#[derive(Clone)]
pub struct FusedAdamW {
    /// β1, β2, ε and weight decay; `lr` and `time` are set at each step.
    step: AdamWStep,
    burn: AdamW,
}

impl FusedAdamW {
    /// AdamW with `betas` (β1, β2), `epsilon` and decoupled `weight_decay`.
    pub fn new(betas: [f32; 2], epsilon: f32, weight_decay: f32) -> Self {
        let burn = AdamWConfig::new()
            .with_beta_1(betas[0])
            .with_beta_2(betas[1])
            .with_epsilon(epsilon)
            .with_weight_decay(weight_decay)
            .build();
        let step = AdamWStep {
            lr: 0.0,
            beta_1: betas[0],
            beta_2: betas[1],
            epsilon,
            weight_decay,
            time: 0,
        };
        FusedAdamW { step, burn }
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        w: Tensor<D>,
        g: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let moments = state
            .as_ref()
            .map(|s| [s.momentum.moment_1.dtype(), s.momentum.moment_2.dtype()]);
        let f32s = [w.dtype(), g.dtype()]
            .into_iter()
            .chain(moments.into_iter().flatten())
            .all(|t| t == DType::F32);
        let max_moment = state
            .as_ref()
            .is_some_and(|s| s.momentum.max_moment_2.is_some());
        if !f32s || max_moment || !crate::kernels::on_flex(&w.device()) {
            return self.burn.step(lr, w, g, state);
        }
        // The first step's moments are buffers to write; the kernel does not read them.
        let (time, m, v) = match state {
            Some(s) => (
                s.momentum.time + 1,
                s.momentum.moment_1,
                s.momentum.moment_2,
            ),
            None => (1, w.zeros_like(), w.zeros_like()),
        };
        let step = AdamWStep {
            lr,
            time,
            ..self.step
        };
        let (w, m, v) = crate::kernels::adamw_step(w, g, m, v, step);
        let momentum = AdaptiveMomentumState::new(time, m, v);
        (w, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamW::to_device(state, device)
    }
}

/// One optimiser for matrices and one without weight decay for rank-1 tensors (and, with
/// `exempt_embeddings`, for rank-3 tensors of leading size 1: a ViT's class token and position
/// embeddings).
#[derive(Clone)]
struct DecayMatricesOnly<O> {
    matrices: O,
    vectors: O,
    exempt_embeddings: bool,
}

impl<O: Optimizer> Optimizer for DecayMatricesOnly<O> {
    type State<const D: usize> = O::State<D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        w: Tensor<D>,
        g: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let embedding = D == 3 && w.dims()[0] == 1;
        if D > 1 && !(self.exempt_embeddings && embedding) {
            self.matrices.step(lr, w, g, state)
        } else {
            self.vectors.step(lr, w, g, state)
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        O::to_device(state, device)
    }
}

/// `[train]` optimiser settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    /// SGD / LARS momentum.
    #[serde(default = "momentum")]
    pub momentum: f64,
    /// AdamW (β1, β2).
    #[serde(default = "betas")]
    pub betas: [f32; 2],
    /// LARS trust coefficient η.
    #[serde(default = "eta")]
    pub eta: f64,
    /// Clip each parameter's gradient to this l2 norm (DINO: 3.0); unset or 0: no clipping.
    #[serde(default)]
    pub grad_clip: Option<f32>,
    /// AdamW only: weight decay follows a cosine from `weight_decay` to this value (DINO:
    /// 0.04 → 0.4); the trainer then applies the decoupled decay θ ← θ·(1 − lr·wd) to weight
    /// matrices itself, as AdamW would with that step's wd.
    #[serde(default)]
    pub final_weight_decay: Option<f64>,
    /// AdamW only: no weight decay on a ViT's class token and position embeddings either (the
    /// `[1, …, dim]` rank-3 tensors: timm's `no_weight_decay()`, which MAE's fine-tuning skips;
    /// DINO's pre-training decays them). Set by fine-tuning, not a recipe key.
    #[serde(skip)]
    pub exempt_embeddings: bool,
}

impl Default for OptimConfig {
    /// AdamW without weight decay.
    fn default() -> Self {
        OptimConfig {
            optimizer: OptimizerKind::Adamw,
            weight_decay: 0.0,
            momentum: momentum(),
            betas: betas(),
            eta: eta(),
            grad_clip: None,
            final_weight_decay: None,
            exempt_embeddings: false,
        }
    }
}

fn momentum() -> f64 {
    0.9
}
fn betas() -> [f32; 2] {
    [0.9, 0.999]
}
fn eta() -> f64 {
    0.001
}

impl OptimConfig {
    /// Checks every setting, named as `[train]`'s keys.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.final_weight_decay.is_some() && self.optimizer != OptimizerKind::Adamw {
            anyhow::bail!(
                "train.final_weight_decay: a weight-decay schedule needs optimizer = \"adamw\""
            );
        }
        if let Some(c) = self.grad_clip.filter(|c| !(*c >= 0.0)) {
            anyhow::bail!("train.grad_clip = {c}: must be positive (or 0: no clipping)");
        }
        not_negative("train.weight_decay", self.weight_decay)?;
        if let Some(end) = self.final_weight_decay {
            not_negative("train.final_weight_decay", end)?;
        }
        // β = 1 divides AdamW's bias correction by 0.
        if !self.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            anyhow::bail!("train.betas = {:?}: each must lie in [0, 1)", self.betas);
        }
        fraction("train.momentum", self.momentum)?;
        positive("train.eta", self.eta)
    }

    pub fn init(&self) -> ModuleOptimizer {
        let optim = self.init_unclipped();
        match self.grad_clip {
            Some(c) if c > 0.0 => optim.with_grad_clipping(GradientClipping::Norm(c)),
            _ => optim,
        }
    }

    /// Weight decay at `step` of `total`: constant, or the cosine of `final_weight_decay`.
    pub fn weight_decay_at(&self, step: usize, total: usize) -> f64 {
        match self.final_weight_decay {
            Some(end) => cosine_ramp(step, total, self.weight_decay, end),
            None => self.weight_decay,
        }
    }

    fn init_unclipped(&self) -> ModuleOptimizer {
        match self.optimizer {
            OptimizerKind::Lars => Lars::new(self.momentum, self.weight_decay, self.eta).into(),
            // PyTorch's SGD: no dampening, decay on every parameter (MoCo's setting).
            OptimizerKind::Sgd => SgdConfig::new()
                .with_momentum(Some(
                    MomentumConfig::new()
                        .with_momentum(self.momentum)
                        .with_dampening(0.0),
                ))
                .with_weight_decay(Some(WeightDecayConfig::new(self.weight_decay as f32)))
                .init(),
            OptimizerKind::Adamw => {
                let adam = |wd: f64| FusedAdamW::new(self.betas, 1e-8, wd as f32);
                // A scheduled decay is applied by the trainer (`decay_matrices`).
                let wd = match self.final_weight_decay {
                    Some(_) => 0.0,
                    None => self.weight_decay,
                };
                DecayMatricesOnly {
                    matrices: adam(wd),
                    vectors: adam(0.0),
                    exempt_embeddings: self.exempt_embeddings,
                }
                .into()
            }
        }
    }
}

/// Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to `final_lr` at
/// `total` steps (SimCLR, MoCo v2, MAE, DINO).
pub fn warmup_cosine(step: usize, warmup: usize, total: usize, peak: f64, final_lr: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let t = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    final_lr + 0.5 * (peak - final_lr) * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// Cosine ramp from `base` at step 0 to `end` at `total` (EMA momentum, teacher temperature).
pub fn cosine_ramp(step: usize, total: usize, base: f64, end: f64) -> f64 {
    let t = step as f64 / total.max(1) as f64;
    end - (end - base) * 0.5 * (1.0 + (std::f64::consts::PI * t.min(1.0)).cos())
}

/// The peak learning rate for `batch` under `scaling`.
pub fn scaled_lr(base_lr: f64, batch: usize, scaling: LrScaling) -> f64 {
    match scaling {
        LrScaling::Linear => base_lr * batch as f64 / 256.0,
        LrScaling::Sqrt => base_lr * (batch as f64).sqrt(),
        LrScaling::None => base_lr,
    }
}

/// θ ← θ·(1 − `rate`) for every trained weight matrix (rank > 1, gradient on): decoupled weight
/// decay at a rate that changes per step. Teachers, queues, centres and vectors are left alone.
pub fn decay_matrices<M: burn::module::Module>(module: M, rate: f64) -> M {
    struct Decay(f64);
    impl burn::module::ModuleMapper for Decay {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<Tensor<D>>,
        ) -> burn::module::Param<Tensor<D>> {
            if D < 2 || !param.is_require_grad() {
                return param;
            }
            let keep = 1.0 - self.0;
            // A fresh leaf, as the optimiser writes parameters.
            param.map(|t| Tensor::from_inner(t.without_autodiff().mul_scalar(keep)).require_grad())
        }
    }
    module.map(&mut Decay(rate))
}

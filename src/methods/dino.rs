//! DINO (Caron et al. 2021): self-distillation with no labels. A student and a teacher of the
//! same architecture, each with a DINO head, see multi-crop views: every crop goes through the
//! student, only the two global crops through the teacher. With the teacher's centred and
//! sharpened distribution P_t = softmax((t − c)/τt) and the student's P_s = softmax(s/τs),
//!
//!   L = mean over pairs (global i, crop j ≠ i) of  −Σ_k P_t,i(k) log P_s,j(k),
//!
//! the teacher follows the student, θt ← λ·θt + (1−λ)·θs (λ: 0.996 → 1 by cosine), and the centre
//! c ← m·c + (1−m)·mean(t) (m = 0.9). Centering alone would flatten the teacher, sharpening alone
//! would make it one-hot: together they avoid collapse.

use burn::module::{Module, Param, ParamId};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, not_negative, positive};
use crate::losses::{dino_loss, mean_entropy};
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::{
    ema_update, momentum_copy, Backbone, BackboneConfig, DinoHead, DinoHeadConfig,
};
use crate::train::optim::cosine_ramp;
use crate::train::{Method, Progress, Scalars, StepOutput, Which};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DinoConfig {
    /// K: 65536 on ImageNet, 4096 for CIFAR-scale data.
    pub out_dim: usize,
    pub hidden: usize,
    pub bottleneck: usize,
    pub norm_last_layer: bool,
    /// Batch norm in the head's hidden layers (official `use_bn_in_head`; for ResNets).
    pub head_batch_norm: bool,
    pub student_temp: f64,
    /// τt after the warm-up (0.04; above 0.07 training is unstable).
    pub teacher_temp: f64,
    /// τt at the start, raised linearly to `teacher_temp` over `warmup_teacher_temp_epochs`.
    pub warmup_teacher_temp: f64,
    pub warmup_teacher_temp_epochs: f64,
    pub center_momentum: f64,
    /// Teacher EMA momentum λ at the start; it rises to `final_momentum` by a cosine.
    pub momentum: f64,
    /// λ at the end of training: 1 in the paper; equal to `momentum` for a constant λ, which
    /// keeps the teacher close to the student in short runs.
    pub final_momentum: f64,
    /// Epochs during which the head's last layer does not learn.
    pub freeze_last_layer: usize,
    /// Stochastic depth of a ViT student (official `drop_path_rate`, 0.1); the teacher has none.
    pub drop_path: f64,
}

impl Default for DinoConfig {
    fn default() -> Self {
        DinoConfig {
            out_dim: 65536,
            hidden: 2048,
            bottleneck: 256,
            norm_last_layer: true,
            head_batch_norm: false,
            student_temp: 0.1,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0.0,
            center_momentum: 0.9,
            momentum: 0.996,
            final_momentum: 1.0,
            freeze_last_layer: 1,
            drop_path: 0.1,
        }
    }
}

impl DinoConfig {
    pub fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        let views = feed.view_sizes.len();
        if views < 2 {
            anyhow::bail!("augment: method dino needs the two global crops and any local ones (augment.pipeline = \"dino\"); this pipeline makes {views} view(s)");
        }
        feed.same_size("dino", 0..2)?;
        feed.same_size("dino", 2..views)?;
        if !(0.0..1.0).contains(&self.drop_path) {
            anyhow::bail!(
                "method.drop_path = {}: a drop probability must lie in [0, 1)",
                self.drop_path
            );
        }
        for (name, t) in [
            ("student_temp", self.student_temp),
            ("teacher_temp", self.teacher_temp),
            ("warmup_teacher_temp", self.warmup_teacher_temp),
        ] {
            positive(&format!("method.{name}"), t)?;
        }
        not_negative(
            "method.warmup_teacher_temp_epochs",
            self.warmup_teacher_temp_epochs,
        )?;
        for (name, width) in [
            ("out_dim", self.out_dim),
            ("hidden", self.hidden),
            ("bottleneck", self.bottleneck),
        ] {
            at_least_one(&format!("method.{name}"), width)?;
        }
        for (name, m) in [
            ("momentum", self.momentum),
            ("final_momentum", self.final_momentum),
            ("center_momentum", self.center_momentum),
        ] {
            if !(0.0..=1.0).contains(&m) {
                anyhow::bail!("method.{name} = {m}: must lie in [0, 1]");
            }
        }
        Ok(())
    }

    pub fn init(&self, model: &BackboneConfig, device: &Device) -> Dino {
        let head = DinoHeadConfig {
            input: model.feature_dim(),
            hidden: self.hidden,
            bottleneck: self.bottleneck,
            out_dim: self.out_dim,
            norm_last_layer: self.norm_last_layer,
            batch_norm: self.head_batch_norm,
        };
        let (backbone, student_head) = (model.init(device), head.init(device));
        Dino {
            teacher: momentum_copy(model.init(device), &backbone),
            teacher_head: momentum_copy(head.init(device), &student_head),
            backbone,
            head: student_head,
            center: Param::initialized(ParamId::new(), Tensor::zeros([1, self.out_dim], device))
                .set_require_grad(false),
            student_temp: self.student_temp,
            teacher_temp: self.teacher_temp,
            warmup_teacher_temp: self.warmup_teacher_temp,
            warmup_teacher_temp_epochs: self.warmup_teacher_temp_epochs,
            center_momentum: self.center_momentum,
            momentum: self.momentum,
            final_momentum: self.final_momentum,
            freeze_last_layer: self.freeze_last_layer,
            drop_path: self.drop_path,
        }
    }
}

impl MethodSpec for DinoConfig {
    type Method = Dino;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("dino_cifar10");
    const ENCODERS: Option<[&'static str; 2]> = Some(["student", "teacher"]);

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        DinoConfig::check(self, feed)
    }

    fn init(&self, ctx: &InitContext) -> Dino {
        DinoConfig::init(self, ctx.model, ctx.device)
    }
}

#[derive(Module, Debug)]
pub struct Dino {
    backbone: Backbone,
    head: DinoHead,
    teacher: Backbone,
    teacher_head: DinoHead,
    /// `[1, K]` running mean of the teacher's outputs (no gradient; kept in checkpoints).
    center: Param<Tensor<2>>,
    student_temp: f64,
    teacher_temp: f64,
    warmup_teacher_temp: f64,
    warmup_teacher_temp_epochs: f64,
    center_momentum: f64,
    momentum: f64,
    final_momentum: f64,
    freeze_last_layer: usize,
    drop_path: f64,
}

impl Dino {
    /// τt at (fractional) epoch `epoch`: linear warm-up, then constant.
    pub fn teacher_temp(&self, epoch: f64) -> f64 {
        let w = self.warmup_teacher_temp_epochs;
        if epoch >= w {
            self.teacher_temp
        } else {
            self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * epoch / w
        }
    }

    /// λ at `progress`: `momentum` → `final_momentum` (0.996 → 1) by a cosine over training.
    pub fn teacher_momentum(&self, progress: &Progress) -> f64 {
        cosine_ramp(
            progress.step,
            progress.total_steps,
            self.momentum,
            self.final_momentum,
        )
    }

    pub fn center(&self) -> Tensor<2> {
        self.center.val()
    }

    /// Teacher logits for the global crops `[2n, K]` (no gradient).
    pub fn teacher_logits(&self, globals: Tensor<4>) -> Tensor<2> {
        self.teacher_head
            .forward(self.teacher.forward(globals.detach()), false)
            .detach()
    }

    /// Student logits of all crops, `[Σ n_g, K]` in the order of `groups` (each a batch of
    /// same-sized crops). As the official `MultiCropWrapper`: the backbone runs once per
    /// resolution, the head once on every crop's features together, so that a batch-norm head
    /// normalises over all crops (at least the 2N global ones). A ViT student drops paths
    /// (`drop_path`) with masks drawn from `step`, so that a resumed run draws the same (the
    /// passes of an accumulated step share them, on other images).
    pub fn student_logits(
        &self,
        groups: Vec<Tensor<4>>,
        freeze_last: bool,
        step: usize,
    ) -> Tensor<2> {
        let mut rng = ChaCha8Rng::seed_from_u64(0x6472_6f70 ^ step as u64);
        let features = groups
            .into_iter()
            .map(|x| self.backbone.forward_drop_path(x, self.drop_path, &mut rng))
            .collect();
        self.head.forward(Tensor::cat(features, 0), freeze_last)
    }
}

impl Method for Dino {
    /// `views[0]`, `views[1]`: the global crops; the rest: local crops.
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let epoch = progress.step as f64 / progress.steps_per_epoch.max(1) as f64;
        let freeze = progress.epoch < self.freeze_last_layer;
        let globals = Tensor::cat(views[..2].to_vec(), 0);
        let t = self.teacher_logits(globals.clone());
        let tau_t = self.teacher_temp(epoch);
        let p_t = softmax((t.clone() - self.center.val()).div_scalar(tau_t), 1);
        let teacher: Vec<Tensor<2>> = (0..2).map(|i| p_t.clone().narrow(0, i * n, n)).collect();
        let mut groups = vec![globals];
        if views.len() > 2 {
            groups.push(Tensor::cat(views[2..].to_vec(), 0));
        }
        let s = self.student_logits(groups, freeze, progress.step);
        let student: Vec<Tensor<2>> = (0..views.len())
            .map(|i| s.clone().narrow(0, i * n, n))
            .collect();
        let loss = dino_loss(&teacher, &student, self.student_temp);
        // Diagnostics: H(P_t) in (0, log K); KL(teacher ‖ student) = cross-entropy − H(P_t).
        let entropy = mean_entropy(p_t);
        let center_norm = self.center.val().square().sum().sqrt();
        let kl = loss.clone().detach() - entropy.clone();
        let tau_t = Tensor::<1>::from_floats([tau_t as f32], &loss.device());
        StepOutput {
            loss,
            scalars: vec![
                ("teacher_entropy", entropy),
                ("kl_teacher_student", kl),
                ("center_norm", center_norm),
                ("teacher_temp", tau_t),
            ],
            keep: Some(t),
        }
    }

    /// Warns, at the end of an epoch, of a teacher whose entropy nears 0 (one-hot outputs) or
    /// log K (uniform ones): the two collapses centring and sharpening balance.
    fn watch(&self, scalars: &Scalars, progress: &Progress) {
        let Some(&(_, entropy)) = scalars.iter().find(|(name, _)| *name == "teacher_entropy")
        else {
            return;
        };
        let log_k = (self.center.dims()[1] as f32).ln();
        let collapse = if entropy < 0.05 * log_k {
            Some("one-hot")
        } else if entropy > 0.95 * log_k {
            Some("uniform")
        } else {
            None
        };
        if let Some(kind) =
            collapse.filter(|_| (progress.step + 1) % progress.steps_per_epoch.max(1) == 0)
        {
            tracing::warn!(
                "DINO teacher collapsing at epoch {}: entropy {entropy:.3} of log K = {log_k:.3} ({kind})",
                progress.epoch + 1,
            );
        }
    }

    /// The teacher's EMA, then the centre from this step's teacher outputs.
    fn after_step(mut self, kept: Option<Tensor<2>>, progress: &Progress) -> Self {
        let lambda = self.teacher_momentum(progress);
        self.teacher = ema_update(self.teacher, &self.backbone, lambda);
        self.teacher_head = ema_update(self.teacher_head, &self.head, lambda);
        if let Some(t) = kept {
            let m = self.center_momentum;
            let mean = t.mean_dim(0);
            self.center = self
                .center
                .map(|c| (c.mul_scalar(m) + mean.mul_scalar(1.0 - m)).set_require_grad(false));
        }
        self
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn teacher(&self) -> Option<&Backbone> {
        Some(&self.teacher)
    }

    fn released(&self) -> Which {
        Which::Teacher
    }

    fn start_from(self, weights: Backbone) -> Self {
        Dino {
            teacher: momentum_copy(self.teacher, &weights),
            backbone: weights,
            ..self
        }
    }
}

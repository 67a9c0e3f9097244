//! One trainer for every method: epochs of batches, the optimiser step under a warm-up + cosine
//! schedule, gradient accumulation, checkpoints with exact resume, metrics as JSONL and
//! TensorBoard events (each step once, also after a kill and a resume), progress, and a stop
//! with a clear error on a non-finite loss.
//!
//! The trainer knows the [`Method`] interface, not the methods. Teachers, queues and centres
//! live inside a method (a burn module) and are updated by [`Method::after_step`]; a second
//! model with its own optimiser (a GAN discriminator) updates in [`Method::auxiliary_step`].

pub mod checkpoint;
pub mod events;
pub mod metrics;
pub mod optim;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use burn::lr_scheduler::module_lr_scheduler::{ModuleLearningRate, ModuleLrScheduler};
use burn::module::{Module, ParamGroup};
use burn::optim::{GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, not_negative, positive};
use crate::data::Loader;
use crate::models::Backbone;
use crate::precision::{autocast, LossScale, Precision};
pub use checkpoint::TrainState;
use metrics::Metrics;
pub use optim::{LrScaling, OptimConfig, OptimizerKind};

/// Named scalars worth logging (pretext accuracy, teacher entropy, embedding std, ...).
pub type Scalars = Vec<(&'static str, f32)>;

/// Scalars a method computes on the device, each `[1]` without gradient: the trainer reads them
/// with the loss in one transfer, where a failed device operation becomes an error.
pub type DeviceScalars = Vec<(&'static str, Tensor<1>)>;

/// Where training stands when a method is called.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub epoch: usize,
    /// Optimiser steps taken so far.
    pub step: usize,
    pub total_steps: usize,
    pub steps_per_epoch: usize,
}

impl Progress {
    /// Fraction of training done, in [0, 1] (for momentum and temperature schedules).
    pub fn fraction(&self) -> f64 {
        self.step as f64 / self.total_steps.max(1) as f64
    }
}

/// What a method computes on one batch.
pub struct StepOutput {
    pub loss: Tensor<1>,
    /// Scalars worth logging (averaged over the epoch too).
    pub scalars: DeviceScalars,
    /// Detached rows that [`Method::after_step`] needs (MoCo's keys, DINO's teacher outputs):
    /// blocks of this rank's `n` images per pass (a view each); under gradient accumulation,
    /// those of every pass of the step, concatenated.
    pub keep: Option<Tensor<2>>,
}

impl StepOutput {
    pub fn new(loss: Tensor<1>, scalars: DeviceScalars) -> Self {
        StepOutput {
            loss,
            scalars,
            keep: None,
        }
    }
}

/// What the trainer needs of a self-supervised method.
pub trait Method: Module + Sized {
    /// The loss for one batch of views (`views[v]` is view `v` of every image, `[n, 3, h, w]`).
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput;

    /// After each optimiser step, with the step's `keep` of every rank in global batch order
    /// ([`crate::dist::gather_kept`]): the EMA of a teacher or key encoder, a queue, a centre.
    fn after_step(self, _kept: Option<Tensor<2>>, _progress: &Progress) -> Self {
        self
    }

    /// A second update with its own optimiser, after the main one and before `after_step`,
    /// with this rank's `keep` of the step (a GAN's discriminator on real and generated
    /// images); it averages its gradients over ranks ([`crate::dist::average_gradients`]).
    fn auxiliary_step(
        self,
        _kept: Option<&Tensor<2>>,
        _lr: f64,
        _optim: &mut ModuleOptimizer,
    ) -> Self {
        self
    }

    /// Parameters trained at the peak learning rate throughout, outside the schedule (SimSiam's
    /// predictor, the official `--fix-pred-lr`). `None`: every parameter follows the schedule.
    fn constant_lr(&self) -> Option<ParamGroup> {
        None
    }

    /// Looks at a step's scalars once read (DINO warns of a collapsing teacher).
    fn watch(&self, _scalars: &Scalars, _progress: &Progress) {}

    /// The encoder learned by gradient: DINO's student, MoCo's query encoder, the only one of
    /// every other method.
    fn backbone(&self) -> &Backbone;

    /// The momentum encoder, where the method has one: DINO's teacher, MoCo's key encoder.
    fn teacher(&self) -> Option<&Backbone> {
        None
    }

    /// The encoder the method's official code evaluates and releases, which `pretrain`
    /// evaluates and exports: DINO's teacher (`eval_knn.py`, `eval_linear.py` and
    /// `visualize_attention.py` default to it); the encoder learned by gradient for every other
    /// method (MoCo's `main_lincls.py` takes the query encoder).
    fn released(&self) -> Which {
        Which::Student
    }

    /// One of the two encoders; `None` for a teacher the method does not have.
    fn encoder(&self, which: Which) -> Option<&Backbone> {
        match which {
            Which::Student | Which::Imported => Some(self.backbone()),
            Which::Teacher => self.teacher(),
        }
    }

    /// The method with its encoder replaced by `weights` (`[model] init`), and its momentum
    /// encoder, where it has one, by a copy of them: θt = θs, as at the start of training.
    fn start_from(self, weights: Backbone) -> Self;
}

/// The encoder `method` releases (see [`Method::released`]).
pub fn released<M: Method>(method: &M) -> &Backbone {
    method
        .encoder(method.released())
        .expect("a method releases an encoder it has")
}

/// Which of a method's encoders: the one learned by gradient (DINO's student, MoCo's query
/// encoder) or its momentum copy (DINO's teacher, MoCo's key encoder); an imported run's one
/// encoder is neither.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    #[default]
    Student,
    Teacher,
    #[value(skip)]
    Imported,
}

impl Which {
    /// How messages name it: `student`, `teacher`, `imported encoder`.
    pub fn name(self) -> &'static str {
        match self {
            Which::Student => "student",
            Which::Teacher => "teacher",
            Which::Imported => "imported encoder",
        }
    }
}

/// `[train]` of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Forward passes whose gradients are summed before one optimiser step. It averages the
    /// gradient over `accumulate × batch_size` images, but a contrastive loss still sees only
    /// the negatives of its own pass: it does not emulate a larger contrastive batch.
    #[serde(default = "one")]
    pub accumulate: usize,
    #[serde(flatten)]
    pub optim: OptimConfig,
    /// Peak learning rate before scaling by the batch (see `lr_scaling`).
    pub base_lr: f64,
    #[serde(default = "linear")]
    pub lr_scaling: LrScaling,
    /// Linear warm-up from 0 to the peak lr before the cosine decay, in epochs.
    #[serde(default)]
    pub warmup_epochs: f64,
    /// The warm-up as a fraction of the run's steps instead (Hugging Face's `warmup_ratio`),
    /// so that it keeps its share when `--epochs` shortens or lengthens the run; replaces
    /// `warmup_epochs`, which must then be left out or 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_fraction: Option<f64>,
    /// Learning rate at the end of the cosine decay.
    #[serde(default)]
    pub final_lr: f64,
    /// Write a checkpoint every this many epochs (and always at the end).
    #[serde(default = "ten")]
    pub checkpoint_every: usize,
    /// Run the online kNN monitor every this many epochs (0: never).
    #[serde(default)]
    pub monitor_every: usize,
    /// The dtype of matmuls and convolutions ([`crate::precision`]); f32 for the rest.
    #[serde(default, skip_serializing_if = "is_f32")]
    pub precision: Precision,
    /// f16's starting loss scale (GradScaler's `init_scale`; unset: 2^16); f16 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
}

fn is_f32(p: &Precision) -> bool {
    *p == Precision::F32
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}
fn linear() -> LrScaling {
    LrScaling::Linear
}

impl TrainConfig {
    /// Checks every value of `[train]`; the error names the key.
    pub fn check(&self) -> Result<()> {
        at_least_one("train.epochs", self.epochs)?;
        at_least_one("train.batch_size", self.batch_size)?;
        at_least_one("train.accumulate", self.accumulate)?;
        at_least_one("train.checkpoint_every", self.checkpoint_every)?;
        positive("train.base_lr", self.base_lr)?;
        not_negative("train.final_lr", self.final_lr)?;
        let peak = self.peak_lr();
        if self.final_lr > peak {
            bail!(
                "train.final_lr = {}: above the peak lr {peak} that train.base_lr gives this batch (train.lr_scaling), where the cosine would rise instead of decay",
                self.final_lr
            );
        }
        if let Some(scale) = self.loss_scale {
            positive("train.loss_scale", scale)?;
            if self.precision != Precision::F16 {
                bail!(
                    "train.loss_scale = {scale}: only f16 scales its loss, and train.precision = \"{}\"",
                    self.precision.name()
                );
            }
        }
        if !(0.0..=self.epochs as f64).contains(&self.warmup_epochs) {
            bail!(
                "train.warmup_epochs = {}: must lie in [0, epochs = {}]",
                self.warmup_epochs,
                self.epochs
            );
        }
        if let Some(fraction) = self.warmup_fraction {
            if !(0.0..=1.0).contains(&fraction) {
                bail!("train.warmup_fraction = {fraction}: must lie in [0, 1]");
            }
            if self.warmup_epochs != 0.0 {
                bail!(
                    "train.warmup_fraction = {fraction} and train.warmup_epochs = {}: give one of them",
                    self.warmup_epochs
                );
            }
        }
        self.optim.check()
    }

    /// Peak learning rate for the effective batch (`batch_size × accumulate`).
    pub fn peak_lr(&self) -> f64 {
        optim::scaled_lr(
            self.base_lr,
            self.batch_size * self.accumulate,
            self.lr_scaling,
        )
    }

    /// The warm-up's length in optimiser steps for `steps_per_epoch` of them an epoch:
    /// `warmup_fraction` of the run's steps, else `warmup_epochs` of its epochs, rounded.
    pub fn warmup_steps(&self, steps_per_epoch: usize) -> usize {
        let epochs = match self.warmup_fraction {
            Some(fraction) => fraction * self.epochs as f64,
            None => self.warmup_epochs,
        };
        (epochs * steps_per_epoch as f64).round() as usize
    }
}

/// What a call of [`Trainer::run`] did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The loss of every optimiser step this call ran.
    pub step_losses: Vec<f32>,
    pub state: TrainState,
}

/// Runs a method over a loader, writing everything into `out`.
pub struct Trainer<'a> {
    pub config: TrainConfig,
    pub out: PathBuf,
    pub device: Device,
    /// Called every `monitor_every` epochs with the backbone in evaluation mode (online kNN).
    pub monitor: Option<&'a dyn Fn(&Backbone) -> Result<Scalars>>,
    /// Show a progress bar.
    pub progress: bool,
    /// The session's TensorBoard event file from [`session_events`], when the caller writes
    /// into it too (pictures); by default the trainer starts one.
    pub events: Option<events::EventWriter>,
}

impl<'a> Trainer<'a> {
    pub fn new(config: TrainConfig, out: impl Into<PathBuf>, device: Device) -> Self {
        Trainer {
            config,
            out: out.into(),
            device,
            monitor: None,
            progress: true,
            events: None,
        }
    }

    /// Trains `method` to `config.epochs`, resuming from the latest checkpoint in `out` if there
    /// is one (weights, optimiser state and position: the continuation is exact).
    pub fn run<M: Method>(&self, method: M, loader: &Loader) -> Result<(M, Report)> {
        self.run_until(method, loader, self.config.epochs)
    }

    /// Like [`run`](Self::run), but returns after epoch `until` (with a checkpoint), leaving
    /// the rest of the schedule to a later call: a pause that a resumed run continues exactly.
    pub fn run_until<M: Method>(
        &self,
        method: M,
        loader: &Loader,
        until: usize,
    ) -> Result<(M, Report)> {
        let c = &self.config;
        c.check()?;
        c.precision.check_device(&self.device)?;
        loader.check("train.batch_size")?;
        let (rank, world) = crate::dist::rank_size();
        crate::dist::check_batch("train.batch_size", c.batch_size)?;
        let local = loader.clone().sharded(rank, world);
        if rank == 0 {
            std::fs::create_dir_all(&self.out)
                .with_context(|| format!("cannot create {}", self.out.display()))?;
        }
        let (mut method, mut run) = self.resume(method, loader)?;
        crate::dist::check_same_weights(&method, "at the start")?;
        while run.state.epoch < until.min(c.epochs) {
            let epoch = self.train_one_epoch(method, &local, &mut run)?;
            method = epoch.method;
            self.end_epoch(&method, &mut run, epoch.stats, until)?;
        }
        run.report.state = run.state;
        Ok((method, run.report))
    }

    /// The method, its optimisers and its position from the latest checkpoint in `out`, else
    /// fresh ones; the schedule's lengths; the metrics writer on rank 0.
    fn resume<M: Method>(&self, method: M, loader: &Loader) -> Result<(M, Run)> {
        let c = &self.config;
        let (method, optim, aux, mut state) = match checkpoint::latest(&self.out)? {
            Some(dir) => {
                tracing::info!("resuming from {}", dir.display());
                checkpoint::load(&dir, method, c.optim.init(), c.optim.init())?
            }
            None => (
                method,
                c.optim.init(),
                c.optim.init(),
                TrainState {
                    seed: loader.seed,
                    ..TrainState::default()
                },
            ),
        };
        // f16 scales its loss, from the checkpoint's scale where it trained in f16 too (a run
        // carried on under another precision, `--change-recipe`, starts or drops the scale).
        state.loss_scale = match c.precision {
            Precision::F16 => state
                .loss_scale
                .or_else(|| Some(LossScale::new(c.loss_scale.unwrap_or(LossScale::INITIAL)))),
            _ => None,
        };
        state.images = loader.split().len();
        if state.seed != loader.seed {
            bail!(
                "{} was trained with seed {}, not {}",
                self.out.display(),
                state.seed,
                loader.seed
            );
        }
        let steps_per_epoch = loader.batches_per_epoch() / c.accumulate;
        if steps_per_epoch == 0 {
            bail!(
                "train.accumulate = {}: more than the {} batches of an epoch",
                c.accumulate,
                loader.batches_per_epoch()
            );
        }
        // Rank 0 alone writes the run folder: metrics, events, checkpoints.
        let metrics = match crate::dist::is_main() {
            true => {
                let events = match &self.events {
                    Some(e) => e.clone(),
                    None => session_events(&self.out)?,
                };
                Some(Metrics::open(&self.out, &state, events)?)
            }
            false => None,
        };
        let run = Run {
            optim,
            aux,
            state,
            metrics,
            report: Report::default(),
            steps_per_epoch,
            total_steps: steps_per_epoch * c.epochs,
            warmup: c.warmup_steps(steps_per_epoch),
        };
        Ok((method, run))
    }

    /// One epoch of `local` (this rank's rows of every batch): per batch the method's loss, its
    /// gradient accumulated, and every `accumulate` batches one [`step`](Self::step), each
    /// step's line in the metrics. Stops on a non-finite loss, naming the last good checkpoint.
    fn train_one_epoch<M: Method>(
        &self,
        mut method: M,
        local: &Loader,
        run: &mut Run,
    ) -> Result<Trained<M>> {
        let c = &self.config;
        let (epoch, steps_per_epoch) = (run.state.epoch, run.steps_per_epoch);
        let bar = crate::data::progress_bar(
            steps_per_epoch as u64,
            &format!("epoch {}/{}", epoch + 1, c.epochs),
        );
        if !self.progress || !crate::dist::is_main() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let world = crate::dist::rank_size().1;
        let n = c.batch_size / world;
        let mut accumulator = GradientsAccumulator::<M>::new();
        let mut stats = EpochStats::start();
        let mut step_loss = 0f32;
        let mut kept: Vec<Tensor<2>> = vec![];
        for batch in local
            .epoch(epoch as u64, 0)
            .take(steps_per_epoch * c.accumulate)
        {
            let progress = Progress {
                epoch,
                step: run.state.step,
                total_steps: run.total_steps,
                steps_per_epoch,
            };
            let views: Vec<Tensor<4>> = batch
                .views
                .iter()
                .map(|v| v.to_tensor(&self.device))
                .collect();
            stats.probe = Some(views[0].clone().inner());
            let StepOutput {
                loss,
                scalars,
                keep,
            } = autocast(c.precision, || method.loss(&views, &progress));
            kept.extend(keep);
            // The loss and scalars averaged over ranks: every rank sees the same values.
            let (value, scalars) = read_step(loss.clone(), scalars).with_context(|| {
                format!(
                    "epoch {} step {}: the device failed",
                    epoch + 1,
                    run.state.step
                )
            })?;
            method.watch(&scalars, &progress);
            if !value.is_finite() {
                let kept = last_good(&self.out)?;
                bail!("the loss became {value} at epoch {} step {} (batch {}): training stopped; last good checkpoint: {kept}", epoch + 1, run.state.step, batch.index);
            }
            let scale = run.state.loss_scale.map_or(1.0, |s| s.scale);
            let grads = GradientsParams::from_grads(
                (loss * (scale / c.accumulate as f64)).backward(),
                &method,
            );
            accumulator.accumulate(&method, grads);
            stats.add(value, &scalars, batch.samples.len() * world);
            step_loss += value / c.accumulate as f32;
            if stats.micro % c.accumulate != 0 {
                continue;
            }
            let lr = optim::warmup_cosine(
                run.state.step,
                run.warmup,
                run.total_steps,
                c.peak_lr(),
                c.final_lr,
            );
            let kept = (!kept.is_empty()).then(|| Tensor::cat(std::mem::take(&mut kept), 0));
            let grads = accumulator.grads();
            method = self.step(
                method,
                &mut run.optim,
                &mut run.aux,
                grads,
                run.state.loss_scale.as_mut(),
                kept,
                n,
                lr,
                &progress,
            )?;
            run.state.step += 1;
            run.report.step_losses.push(step_loss);
            let rate = stats.rate();
            bar.set_message(format!(
                "epoch {}/{} loss {step_loss:.4} lr {lr:.2e} {rate:.0} img/s",
                epoch + 1,
                c.epochs
            ));
            bar.inc(1);
            let mut line = serde_json::json!({"kind": "step", "epoch": epoch + 1, "step": run.state.step, "loss": step_loss, "lr": lr, "img_per_s": rate});
            for (name, v) in &scalars {
                line[*name] = serde_json::json!(v);
            }
            if let Some(s) = run.state.loss_scale {
                line["loss_scale"] = serde_json::json!(s.scale);
                line["skipped_steps"] = serde_json::json!(s.skipped);
            }
            if let Some(metrics) = &mut run.metrics {
                metrics.write(&line)?;
            }
            step_loss = 0.0;
        }
        bar.finish_and_clear();
        Ok(Trained { method, stats })
    }

    /// The end of an epoch: its line in the metrics (with the monitor's scalars every
    /// `monitor_every` epochs), the checks (finite features, the same weights on every rank),
    /// a checkpoint every `checkpoint_every` epochs and at the last one.
    fn end_epoch<M: Method>(
        &self,
        method: &M,
        run: &mut Run,
        stats: EpochStats,
        until: usize,
    ) -> Result<()> {
        let c = &self.config;
        let state = &mut run.state;
        let mean_loss = (stats.loss_sum / stats.micro.max(1) as f64) as f32;
        state.epoch += 1;
        state.epoch_losses.push(mean_loss);
        let mut line = serde_json::json!({"kind": "epoch", "epoch": state.epoch, "step": state.step, "loss": mean_loss, "img_per_s": stats.rate()});
        for (name, s) in &stats.sums {
            line[*name] = serde_json::json!(s / stats.micro.max(1) as f64);
        }
        if crate::dist::rank_size().1 > 1 {
            let share = (crate::dist::collective_seconds() - stats.collectives)
                / stats.started.elapsed().as_secs_f64();
            line["collective_share"] = serde_json::json!(share);
        }
        if let Some(x) = stats.probe {
            finite_features(method, x, &self.out, state.epoch)?;
        }
        crate::dist::check_same_weights(method, &format!("after epoch {}", state.epoch))?;
        let Some(metrics) = &mut run.metrics else {
            return Ok(());
        };
        let last = state.epoch == c.epochs || state.epoch == until;
        if let Some(monitor) = self
            .monitor
            .filter(|_| c.monitor_every > 0 && (state.epoch % c.monitor_every == 0 || last))
        {
            for (name, v) in monitor(&released(&method.valid()).clone())? {
                line[name] = serde_json::json!(v);
            }
        }
        tracing::info!("{}", line);
        metrics.write(&line)?;
        if state.epoch % c.checkpoint_every == 0 || last {
            checkpoint::save(&self.out, method, &run.optim, &run.aux, state)?;
        }
        Ok(())
    }
}

/// What a run carries from epoch to epoch: optimiser states, its position, the metrics writer
/// (rank 0), what this call reports, and the schedule's lengths in optimiser steps.
struct Run {
    optim: ModuleOptimizer,
    aux: ModuleOptimizer,
    state: TrainState,
    metrics: Option<Metrics>,
    report: Report,
    steps_per_epoch: usize,
    total_steps: usize,
    warmup: usize,
}

/// The method after an epoch, and what the epoch measured.
struct Trained<M> {
    method: M,
    stats: EpochStats,
}

/// An epoch's sums: losses and scalars over its forward passes, images over every rank, its
/// time and its time in collectives, and the first view of its last batch (what the
/// end-of-epoch check feeds).
struct EpochStats {
    loss_sum: f64,
    sums: Vec<(&'static str, f64)>,
    micro: usize,
    images: usize,
    started: Instant,
    collectives: f64,
    probe: Option<Tensor<4>>,
}

impl EpochStats {
    fn start() -> Self {
        EpochStats {
            loss_sum: 0.0,
            sums: vec![],
            micro: 0,
            images: 0,
            started: Instant::now(),
            collectives: crate::dist::collective_seconds(),
            probe: None,
        }
    }

    /// One forward pass: its loss, its scalars, its images over every rank.
    fn add(&mut self, loss: f32, scalars: &Scalars, images: usize) {
        self.micro += 1;
        self.images += images;
        self.loss_sum += loss as f64;
        for (name, v) in scalars {
            match self.sums.iter_mut().find(|(n, _)| n == name) {
                Some(s) => s.1 += *v as f64,
                None => self.sums.push((name, *v as f64)),
            }
        }
    }

    /// Images a second so far.
    fn rate(&self) -> f64 {
        self.images as f64 / self.started.elapsed().as_secs_f64()
    }
}

impl Trainer<'_> {
    /// One optimiser step on the step's summed gradients: averaged over ranks (and divided by
    /// f16's `loss_scale`: with an inf or a NaN among them the optimiser's update and the
    /// weight-decay schedule are skipped, as GradScaler's `step`), the update at rate `lr` (with
    /// the weight-decay schedule, where the recipe has one), the method's second update on this
    /// rank's `kept` rows (a discriminator, in f32), then its after-step (teacher, queue,
    /// centre) on every rank's `kept` rows, `n` a rank's images per pass: these two run on a
    /// skipped step too, as the EMA and queue updates of the official DINO and MoCo loops do.
    /// Errors: the device failed.
    #[allow(clippy::too_many_arguments)]
    pub fn step<M: Method>(
        &self,
        mut method: M,
        optim: &mut ModuleOptimizer,
        aux: &mut ModuleOptimizer,
        grads: GradientsParams,
        loss_scale: Option<&mut LossScale>,
        kept: Option<Tensor<2>>,
        n: usize,
        lr: f64,
        progress: &Progress,
    ) -> Result<M> {
        let c = &self.config;
        let grads = crate::dist::average_gradients(grads, &method);
        let grads = match loss_scale {
            Some(s) => s.unscale(grads, &method)?,
            None => Some(grads),
        };
        if let Some(grads) = grads {
            let rate: ModuleLearningRate = match method.constant_lr() {
                Some(group) => ModuleLrScheduler::new(lr)
                    .with_group(group, c.peak_lr())
                    .step(),
                None => lr.into(),
            };
            method = optim.step(rate, method, grads);
            if c.optim.final_weight_decay.is_some() {
                let wd = c.optim.weight_decay_at(progress.step, progress.total_steps);
                method = optim::decay_matrices(method, lr * wd);
            }
        }
        let method = method.auxiliary_step(kept.as_ref(), lr, aux);
        let kept = kept.map(|k| crate::dist::gather_kept(k, n));
        Ok(method.after_step(kept, progress))
    }
}

/// Refuses to go on (and so to checkpoint) a method whose released encoder, in evaluation mode
/// (batch norm's running statistics), computes non-finite features of `x`: its loss can stay
/// finite while weights grown huge overflow outside training mode, and such a checkpoint is
/// not a good one to resume or evaluate. The error names the last good checkpoint.
fn finite_features<M: Method>(method: &M, x: Tensor<4>, out: &Path, epoch: usize) -> Result<()> {
    let features = released(method)
        .valid()
        .forward(x)
        .try_into_vec_as::<f32>()?;
    if features.iter().any(|v| !v.is_finite()) {
        bail!("after epoch {epoch} the {} computes NaN or infinite features in evaluation mode (its weights or batch-norm statistics have diverged): training stopped without a checkpoint; last good checkpoint: {}", method.released().name(), last_good(out)?);
    }
    Ok(())
}

/// The checkpoint a stopped run can resume from, for messages: every one written computes
/// finite features ([`finite_features`]).
fn last_good(out: &Path) -> Result<String> {
    Ok(checkpoint::latest(out)?
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "none yet".into()))
}

/// A new TensorBoard event file for a session of the run in `out`. It opens with a session
/// start where the session logs from: step 0 for a fresh run, one past the latest checkpoint's
/// step for a resumed one; TensorBoard then drops what an earlier session, killed, logged from
/// there on.
pub fn session_events(out: &Path) -> Result<events::EventWriter> {
    let first = match checkpoint::latest(out)? {
        Some(dir) => checkpoint::state(&dir)?.step + 1,
        None => 0,
    };
    let events = events::EventWriter::create(out)?;
    events.start_session(first)?;
    Ok(events)
}

/// The loss and the scalars of a step, read from the device in one transfer and averaged over
/// ranks; a device operation
/// that failed since the last read (in this step or the previous step's backward pass) is
/// reported here as an error rather than a panic.
fn read_step(loss: Tensor<1>, scalars: DeviceScalars) -> Result<(f32, Scalars)> {
    let (names, tensors): (Vec<_>, Vec<_>) = scalars.into_iter().unzip();
    let mut all = vec![loss.detach().reshape([1])];
    all.extend(tensors.into_iter().map(|t| t.detach().reshape([1])));
    let mut values = Tensor::cat(all, 0).try_into_vec_as::<f32>()?;
    crate::dist::mean_over_ranks(&mut values);
    Ok((
        values[0],
        names.into_iter().zip(values[1..].iter().copied()).collect(),
    ))
}

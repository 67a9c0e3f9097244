//! The supervised epoch that linear evaluation, the quick probe and fine-tuning share, as MAE's
//! `engine_finetune.train_one_epoch` serves its linear probe and its fine-tuning: for each batch
//! the loss, a stop on a non-finite one, the gradients averaged over ranks, one optimiser step,
//! progress. Data parallelism lands here for all three: a loader sharded over the ranks
//! ([`crate::data::Loader::sharded`]) gives each rank its rows of the global batch, and the
//! averaged gradient is that of the global batch (the quick probe, unsharded, computes the same
//! on every rank).

use anyhow::{bail, Context, Result};
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

/// Supervised training in progress: its step count and progress bar.
pub(crate) struct Supervised {
    /// What trains, in messages: "linear eval", "fine-tuning".
    what: &'static str,
    /// What to do about a non-finite loss, in its error.
    hint: &'static str,
    epochs: usize,
    /// Optimiser steps taken so far, over every epoch.
    pub step: usize,
    bar: indicatif::ProgressBar,
}

impl Supervised {
    /// `epochs` epochs of `steps_per_epoch` steps each, shown as `what`.
    pub fn new(
        what: &'static str,
        hint: &'static str,
        epochs: usize,
        steps_per_epoch: usize,
    ) -> Self {
        Supervised {
            what,
            hint,
            epochs,
            step: 0,
            bar: crate::data::progress_bar((epochs * steps_per_epoch) as u64, what),
        }
    }

    /// Epoch `epoch` (from 0) over `batches`: for each, `loss(&model, batch)`, then one step of
    /// `optim` at `lr(step)`. Errors name the step: a failed device read, a non-finite loss (of the
    /// mean over ranks, so that every rank stops at the same step).
    pub fn epoch<M: Module, B, L: Into<ModuleLearningRate>>(
        &mut self,
        epoch: usize,
        mut model: M,
        batches: impl IntoIterator<Item = B>,
        optim: &mut ModuleOptimizer,
        mut loss: impl FnMut(&M, B) -> Result<Tensor<1>>,
        lr: impl Fn(usize) -> L,
    ) -> Result<M> {
        let what = self.what;
        for batch in batches {
            let step = self.step;
            let loss = loss(&model, batch)?;
            let value: f32 = loss
                .clone()
                .try_into_scalar()
                .with_context(|| format!("{what} step {step}: the device failed"))?;
            // The global batch's loss: every rank sees the same value and stops together.
            let mut value = [value];
            crate::dist::mean_over_ranks(&mut value);
            let [value] = value;
            if !value.is_finite() {
                bail!("{what} loss became {value} at step {step}{}", self.hint);
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let grads = crate::dist::average_gradients(grads, &model);
            model = optim.step(lr(step), model, grads);
            self.step += 1;
            let epochs = self.epochs;
            self.bar
                .set_message(format!("epoch {}/{epochs} loss {value:.3}", epoch + 1));
            self.bar.inc(1);
        }
        Ok(model)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

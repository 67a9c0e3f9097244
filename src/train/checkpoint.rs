//! Checkpoints: the whole training state in one folder, published atomically.
//!
//! A checkpoint is written into `checkpoints/epoch-NNNN.tmp/`, synced, renamed to
//! `checkpoints/epoch-NNNN/`, and only then named in the `latest` file (itself replaced by
//! rename). A run killed at any point leaves `latest` naming a complete checkpoint.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

/// Where training stands, beside the weights and optimiser state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// The next epoch to run.
    pub epoch: usize,
    /// Optimiser steps taken.
    pub step: usize,
    /// The run's seed: together with (epoch, batch) it fixes every random draw that follows.
    pub seed: u64,
    /// Mean loss of each finished epoch.
    pub epoch_losses: Vec<f32>,
    /// Images of the split trained on: a resume on other data is noticed (0: not recorded, a
    /// checkpoint written before it was).
    #[serde(default)]
    pub images: usize,
    /// f16's loss scale where the run trains in f16 ([`crate::precision::LossScale`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::precision::LossScale>,
}

const MODEL: &str = "model.bpk";
const OPTIM: &str = "optimizer.bpk";
const AUX_OPTIM: &str = "aux_optimizer.bpk";
const STATE: &str = "state.json";

/// Writes a checkpoint of `method`, its optimisers and `state` under `out`.
pub fn save<M: Module>(
    out: &Path,
    method: &M,
    optim: &ModuleOptimizer,
    aux: &ModuleOptimizer,
    state: &TrainState,
) -> Result<PathBuf> {
    let dir = out
        .join("checkpoints")
        .join(format!("epoch-{:04}", state.epoch));
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    // `valid()` first: burn keeps a batch-norm layer's newest running statistics pending until
    // they are synced, and a record of the training module itself would hold those of the step
    // before (or the initial 0 and 1 after one step).
    method
        .valid()
        .save_file(tmp.join(MODEL))
        .map_err(|e| anyhow::anyhow!("cannot write the model into {}: {e:?}", tmp.display()))?;
    optim
        .save(tmp.join(OPTIM))
        .map_err(|e| anyhow::anyhow!("cannot write the optimiser into {}: {e:?}", tmp.display()))?;
    aux.save(tmp.join(AUX_OPTIM))
        .map_err(|e| anyhow::anyhow!("cannot write the optimiser into {}: {e:?}", tmp.display()))?;
    write_synced(
        &tmp.join(STATE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;
    for name in [MODEL, OPTIM, AUX_OPTIM] {
        File::open(tmp.join(name))?.sync_all()?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    let latest_tmp = out.join("latest.tmp");
    write_synced(
        &latest_tmp,
        dir.file_name().unwrap().to_string_lossy().as_bytes(),
    )?;
    std::fs::rename(&latest_tmp, out.join("latest"))?;
    // Older checkpoints are no longer needed once `latest` names the new one.
    for entry in std::fs::read_dir(out.join("checkpoints"))?.flatten() {
        if entry.path() != dir {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(dir)
}

/// Writes `bytes` into `path` and syncs it to disk.
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// The checkpoint `latest` names under `out`, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let pointer = out.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer)
        .with_context(|| format!("cannot read {}", pointer.display()))?;
    let dir = out.join("checkpoints").join(name.trim());
    if !dir.join(STATE).exists() {
        anyhow::bail!(
            "{} names {}, which is not a complete checkpoint",
            pointer.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// Where training stood at the checkpoint `dir`.
pub fn state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}", path.display()))
}

/// Loads the weights of the checkpoint `dir` into `method` (same architecture), refusing
/// non-finite ones ([`crate::models::check_weights`]).
pub fn load_model<M: Module>(dir: &Path, method: M) -> Result<M> {
    let path = dir.join(MODEL);
    let method = method
        .try_load_file(&path)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e:?}", path.display()))?;
    crate::models::check_weights(&method, &path.display().to_string())?;
    Ok(method)
}

/// Loads the whole training state of the checkpoint `dir`.
pub fn load<M: Module>(
    dir: &Path,
    method: M,
    optim: ModuleOptimizer,
    aux: ModuleOptimizer,
) -> Result<(M, ModuleOptimizer, ModuleOptimizer, TrainState)> {
    let method = load_model(dir, method)?;
    let load_optim = |o: ModuleOptimizer, name: &str| {
        o.load(dir.join(name))
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e:?}", dir.join(name).display()))
    };
    let optim = load_optim(optim, OPTIM)?;
    let aux = load_optim(aux, AUX_OPTIM)?;
    Ok((method, optim, aux, state(dir)?))
}

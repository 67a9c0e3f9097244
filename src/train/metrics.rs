//! A run's `metrics.jsonl`: one JSON record a line, a step's (`"kind": "step"`) or an epoch's
//! (`"kind": "epoch"`), their numbers also sent to TensorBoard. A kill can cut the last line
//! off: readers skip it with a warning, and a run that starts again first cuts its log back to
//! the checkpoint it resumes from, so that each step is logged once.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::checkpoint::TrainState;
use super::events::EventWriter;

/// The log's name in a run folder.
pub const FILE: &str = "metrics.jsonl";

/// The records of the log `path`. A last line with no line end that does not parse was cut off
/// by a kill: it is skipped with a warning. Any other line that does not parse is an error that
/// names it.
pub fn read(path: &Path) -> Result<Vec<Value>> {
    let text = read_text(path)?;
    Ok(parse(path, &text)?.into_iter().map(|(_, r)| r).collect())
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Each record of `text` with its line (see [`read`]).
fn parse<'t>(path: &Path, text: &'t str) -> Result<Vec<(&'t str, Value)>> {
    let lines: Vec<&str> = text.lines().collect();
    let torn = !text.is_empty() && !text.ends_with('\n');
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(record) => records.push((*line, record)),
            Err(e) if torn && i + 1 == lines.len() => tracing::warn!(
                "{} line {}: cut off ({e}), as by a kill while it was written: skipped",
                path.display(),
                i + 1
            ),
            Err(e) => return Err(e).with_context(|| format!("{} line {}", path.display(), i + 1)),
        }
    }
    Ok(records)
}

/// Cuts the log of the run in `out` back to `state`: keeps the records of steps up to
/// `state.step` and of epochs up to `state.epoch` (none for a fresh run), drops a line a kill
/// cut off, and replaces the file atomically.
pub fn cut(out: &Path, state: &TrainState) -> Result<()> {
    let path = out.join(FILE);
    if !path.exists() {
        return Ok(());
    }
    let text = read_text(&path)?;
    let kept: String = parse(&path, &text)?
        .into_iter()
        .filter(|(_, record)| reached_by(record, state))
        .map(|(line, _)| format!("{line}\n"))
        .collect();
    let tmp = out.join(format!("{FILE}.tmp"));
    super::checkpoint::write_synced(&tmp, kept.as_bytes())?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot replace {}", path.display()))
}

/// Whether training had logged `record` by the time it stood at `state`.
fn reached_by(record: &Value, state: &TrainState) -> bool {
    let (at, reached) = match record["kind"].as_str() {
        Some("step") => (&record["step"], state.step),
        _ => (&record["epoch"], state.epoch),
    };
    at.as_u64().is_some_and(|at| at <= reached as u64)
}

/// Appends records to a run's log and their numbers to its TensorBoard event file, all at the
/// record's `step`: a step's as `train/<name>`, an epoch's as `epoch/<name>` at the step that
/// ends it (one step axis, which a session start in TensorBoard cuts back as a whole).
pub(super) struct Metrics {
    file: std::fs::File,
    path: PathBuf,
    events: EventWriter,
}

impl Metrics {
    /// The log of the run in `out`, cut back to `state` (see [`cut`]), to append to.
    pub(super) fn open(out: &Path, state: &TrainState, events: EventWriter) -> Result<Self> {
        cut(out, state)?;
        let path = out.join(FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Metrics { file, path, events })
    }

    pub(super) fn write(&mut self, record: &Value) -> Result<()> {
        // One write a record: a kill cuts off at most the last line.
        self.file
            .write_all(format!("{record}\n").as_bytes())
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        let group = match record["kind"].as_str() {
            Some("step") => "train",
            _ => "epoch",
        };
        let scalars: Vec<(String, f32)> = record
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(name, _)| !matches!(name.as_str(), "kind" | "epoch" | "step"))
            .filter_map(|(name, v)| Some((format!("{group}/{name}"), v.as_f64()? as f32)))
            .collect();
        let step = record["step"].as_u64().unwrap_or(0) as usize;
        self.events.scalars(step, &scalars)
    }
}

//! The trainer on real CIFAR-10 images with a small SimCLR: the loss falls, a resumed run
//! continues bit for bit, a checkpoint cut off mid-write is ignored, a NaN stops the run, and
//! a run killed past its checkpoint logs each step once after its resume.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use selfsup::augment::{Pipeline, Sizes};
use selfsup::data::{Loader, Split};
use selfsup::methods::{SimClr, SimclrConfig};
use selfsup::models::{init_seeded, Backbone, BackboneConfig, ResNetConfig, Stem};
use selfsup::train::events::{read_events, Kind, SessionStatus, What};
use selfsup::train::{checkpoint, Method, Progress, Report, StepOutput, TrainConfig, Trainer};

fn config(epochs: usize) -> TrainConfig {
    let mut c: TrainConfig = toml::from_str(
        "epochs = 1\nbatch_size = 32\noptimizer = \"adamw\"\nweight_decay = 1e-6\nbase_lr = 0.005\nlr_scaling = \"none\"\nwarmup_epochs = 0\ncheckpoint_every = 1\n",
    )
    .unwrap();
    c.epochs = epochs;
    c
}

fn simclr(device: &Device) -> SimClr {
    let model = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
    });
    init_seeded(device, 1, || {
        SimclrConfig {
            temperature: 0.5,
            proj_hidden: Some(64),
            proj_dim: 32,
            ..SimclrConfig::default()
        }
        .init(&model, device)
    })
}

fn loader(split: &Split) -> Loader {
    Loader::new(
        split.clone(),
        Arc::new(Pipeline::preset("simclr", Sizes::small(32)).unwrap()),
        32,
        3,
    )
    .unwrap()
}

fn trainer(config: TrainConfig, out: &Path) -> Trainer<'static> {
    let mut t = Trainer::new(config, out, Device::flex().autodiff());
    t.progress = false;
    t
}

/// The small SimCLR trained `epochs` epochs on `images` of the committed CIFAR-10 images, into
/// `out`.
fn train(images: usize, epochs: usize, out: &Path) -> (SimClr, Report) {
    let dev = Device::flex().autodiff();
    trainer(config(epochs), out)
        .run(simclr(&dev), &loader(&common::cifar10_train(images)))
        .unwrap()
}

#[test]
fn loss_falls_on_real_images() {
    let dir = tempfile::tempdir().unwrap();
    let (_, report) = train(256, 10, dir.path());
    let losses = &report.state.epoch_losses;
    assert_eq!(losses.len(), 10);
    let (first, last) = (
        (losses[0] + losses[1]) / 2.0,
        (losses[7] + losses[8] + losses[9]) / 3.0,
    );
    // Seeded and deterministic: measured 8.55 -> 8.16 on the committed images.
    assert!(last < first - 0.03, "epoch losses {losses:?}");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"step\""))
            .count(),
        80
    );
    assert!(metrics.contains("z_std"));
}

#[test]
fn resumed_run_repeats_the_uninterrupted_one_exactly() {
    let split = common::cifar10_train(64);
    let dev = Device::flex().autodiff();
    let whole = tempfile::tempdir().unwrap();
    let (straight_model, straight) = trainer(config(3), whole.path())
        .run(simclr(&dev), &loader(&split))
        .unwrap();

    // The same run stopped after epoch 1 (as by a kill after its checkpoint) ...
    let cut = tempfile::tempdir().unwrap();
    let (_, first) = trainer(config(3), cut.path())
        .run_until(simclr(&dev), &loader(&split), 1)
        .unwrap();
    assert_eq!(first.step_losses[..], straight.step_losses[..2]);
    // ... and a checkpoint of epoch 2 cut off while being written.
    let partial = cut.path().join("checkpoints/epoch-0002.tmp");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("model.bpk"), b"half a file").unwrap();

    // Resumed from a fresh model, it continues from epoch 1 with identical losses.
    let (resumed, rest) = trainer(config(3), cut.path())
        .run(simclr(&dev), &loader(&split))
        .unwrap();
    assert_eq!(
        rest.step_losses[..],
        straight.step_losses[2..],
        "resumed losses differ"
    );
    assert_eq!(rest.state, straight.state);
    // ... and ends with the same weights and batch-norm statistics.
    assert_same_state(&resumed, &straight_model);
}

/// Every parameter and buffer of two models is equal, bit for bit.
fn assert_same_state<M: Module>(a: &M, b: &M) {
    let (a, b) = (
        common::params_by_path(&a.valid(), None),
        common::params_by_path(&b.valid(), None),
    );
    assert_eq!(a.len(), b.len());
    for ((path, x, _), (_, y, _)) in a.iter().zip(&b) {
        assert!(x == y, "{path} differs");
    }
}

#[test]
fn metrics_reach_tensorboard_event_files() {
    let dir = tempfile::tempdir().unwrap();
    train(64, 2, dir.path());
    let files = event_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    // The framing TensorFlow writes: the first record (24 bytes of Event) and the masked CRC32C
    // of its length as TensorBoard's own reader computes it (masked_crc32c in
    // tensorboard.compat.tensorflow_stub.pywrap_tensorflow).
    let bytes = std::fs::read(&files[0]).unwrap();
    assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 24);
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        0x224b_7fa3
    );

    let events = read_events(&files[0]).unwrap();
    assert_eq!(
        events[0].what,
        Some(What::FileVersion("brain.Event:2".into()))
    );
    // Every step's loss, at its step, as in metrics.jsonl; an epoch's at the step that ends it.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let mut steps = 0;
    for line in metrics.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let tag = match line["kind"].as_str().unwrap() {
            "step" => "train/loss",
            _ => "epoch/loss",
        };
        let at = line["step"].as_i64().unwrap();
        let logged = events.iter().find_map(|e| match &e.what {
            Some(What::Summary(s)) if e.step == at => {
                s.value.iter().find_map(|v| match (&v.kind, v.tag == tag) {
                    (Some(Kind::SimpleValue(x)), true) => Some(*x),
                    _ => None,
                })
            }
            _ => None,
        });
        assert_eq!(
            logged,
            Some(line["loss"].as_f64().unwrap() as f32),
            "{tag} at {at}"
        );
        steps += (tag == "train/loss") as usize;
    }
    assert_eq!(steps, 4);

    // A flipped byte is caught by the CRC.
    let mut broken = bytes.clone();
    let last = broken.len() - 6;
    broken[last] ^= 1;
    std::fs::write(&files[0], broken).unwrap();
    let err = format!("{:#}", read_events(&files[0]).unwrap_err());
    assert!(err.contains("CRC"), "{err}");
}

#[test]
fn the_last_checkpoint_holds_the_model_the_run_returns() {
    // Issue: the checkpoint written after the last step held the batch-norm statistics of the
    // step before (burn's running state keeps the newest value pending until it is synced).
    let dir = tempfile::tempdir().unwrap();
    let (trained, _) = train(64, 2, dir.path());
    let latest = checkpoint::latest(dir.path()).unwrap().unwrap();
    let saved = checkpoint::load_model(&latest, simclr(&Device::flex().autodiff())).unwrap();
    assert_same_state(&saved, &trained);
}

/// SimCLR whose loss turns NaN from step `nan_from` on.
#[derive(Module, Debug)]
struct Faulty {
    inner: SimClr,
    nan_from: usize,
}

impl Method for Faulty {
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let mut out = self.inner.loss(views, progress);
        if progress.step >= self.nan_from {
            out.loss = out.loss.mul_scalar(f32::NAN);
        }
        out
    }

    fn backbone(&self) -> &Backbone {
        self.inner.backbone()
    }

    fn start_from(self, weights: Backbone) -> Self {
        Faulty {
            inner: self.inner.start_from(weights),
            ..self
        }
    }
}

#[test]
fn a_nan_loss_stops_with_an_error_and_keeps_the_last_checkpoint() {
    let split = common::cifar10_train(64);
    let dev = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let err = trainer(config(3), dir.path())
        .run(
            Faulty {
                inner: simclr(&dev),
                nan_from: 3,
            },
            &loader(&split),
        )
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("NaN") && msg.contains("epoch 2") && msg.contains("epoch-0001"),
        "{msg}"
    );
    let latest = std::fs::read_to_string(dir.path().join("latest")).unwrap();
    assert_eq!(latest, "epoch-0001");
}

#[test]
fn gradient_accumulation_takes_one_step_per_group_of_batches() {
    let split = common::cifar10_train(64);
    let dev = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(2);
    c.accumulate = 2;
    assert_eq!(c.peak_lr(), 0.005, "lr_scaling none");
    let (_, report) = trainer(c, dir.path())
        .run(simclr(&dev), &loader(&split))
        .unwrap();
    assert_eq!(
        report.step_losses.len(),
        2,
        "2 batches of 32 per step, 1 step per epoch"
    );
    assert_eq!(report.state.step, 2);
}

#[test]
fn bad_training_values_are_named() {
    let mut c = config(2);
    c.batch_size = 0;
    assert!(c
        .check()
        .unwrap_err()
        .to_string()
        .contains("train.batch_size"));
    let mut c = config(2);
    c.base_lr = -1.0;
    assert!(c.check().unwrap_err().to_string().contains("train.base_lr"));
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/simclr_cifar10_cpu.toml"),
    )
    .unwrap();
    let err =
        selfsup::config::Recipe::parse(&text.replace("width = 0.125", "width = -1")).unwrap_err();
    assert!(format!("{err:#}").contains("model.width"), "{err:#}");
    let err =
        selfsup::config::Recipe::parse(&text.replace("name = \"simclr\"", "name = \"simclr3\""))
            .unwrap_err();
    assert!(format!("{err:#}").contains("simclr3"), "{err:#}");
}

/// A folder's TensorBoard event files, in name order: the order TensorBoard reads them in.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    files.sort();
    files
}

/// The scalars `(tag, step, value)` TensorBoard shows of a run folder: its event files read in
/// name order, each session start dropping what was read before at its step or later (the
/// event accumulator's `_CheckForRestartAndMaybePurge`).
fn tensorboard_scalars(dir: &Path) -> Vec<(String, i64, f32)> {
    let mut shown: Vec<(String, i64, f32)> = vec![];
    for file in event_files(dir) {
        for event in read_events(&file).unwrap() {
            match event.what {
                Some(What::SessionLog(log)) if log.status == SessionStatus::Start as i32 => {
                    shown.retain(|(_, step, _)| *step < event.step)
                }
                Some(What::Summary(summary)) => {
                    for value in summary.value {
                        if let Some(Kind::SimpleValue(x)) = value.kind {
                            shown.push((value.tag, event.step, x));
                        }
                    }
                }
                _ => {}
            }
        }
    }
    shown
}

/// Cuts a line of `dir`'s metrics.jsonl off, as a kill while it is written does.
fn tear_the_log(dir: &Path) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .unwrap()
        .write_all(br#"{"kind":"step","epoch":1,"st"#)
        .unwrap();
}

/// The run in `dir` logged steps 1..=`steps` and epochs 1..=`epochs` once each, in order, in
/// metrics.jsonl and in what TensorBoard shows (an epoch at the step that ends it), with the
/// same values.
fn assert_logged_once(dir: &Path, steps: i64, epochs: i64) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let numbers = |kind: &str| -> Vec<i64> {
        let of_kind = records.iter().filter(|r| r["kind"] == kind);
        of_kind.map(|r| r[kind].as_i64().unwrap()).collect()
    };
    assert_eq!(numbers("step"), (1..=steps).collect::<Vec<_>>(), "{text}");
    assert_eq!(numbers("epoch"), (1..=epochs).collect::<Vec<_>>(), "{text}");

    let shown = tensorboard_scalars(dir);
    let shown_at = |tag: &str| -> Vec<(i64, f32)> {
        let of_tag = shown.iter().filter(|(t, _, _)| t == tag);
        of_tag.map(|&(_, step, x)| (step, x)).collect()
    };
    let logged = |kind: &str| -> Vec<(i64, f32)> {
        let of_kind = records.iter().filter(|r| r["kind"] == kind);
        of_kind
            .map(|r| {
                (
                    r["step"].as_i64().unwrap(),
                    r["loss"].as_f64().unwrap() as f32,
                )
            })
            .collect()
    };
    assert_eq!(shown_at("train/loss"), logged("step"));
    assert_eq!(shown_at("epoch/loss"), logged("epoch"));
}

#[test]
fn a_run_killed_past_its_checkpoint_logs_each_step_once_after_its_resume() {
    // Issue 28: after a kill and a resume, metrics.jsonl held the steps past the checkpoint
    // twice (and a record glued onto the line the kill cut off), TensorBoard showed them twice,
    // and `report` failed on the cut line for good.
    let split = common::cifar10_train(64);
    let dev = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(4);
    c.checkpoint_every = 2;
    let faulty = |nan_from| Faulty {
        inner: simclr(&dev),
        nan_from,
    };
    // Stopped in epoch 4 with the checkpoint of epoch 2 (step 4): steps 5-7 and epoch 3 were
    // logged past it, then a line was cut off.
    trainer(c.clone(), dir.path())
        .run(faulty(7), &loader(&split))
        .unwrap_err();
    let latest = checkpoint::latest(dir.path()).unwrap().unwrap();
    assert_eq!(checkpoint::state(&latest).unwrap().step, 4);
    tear_the_log(dir.path());
    // Its curves can still be drawn.
    selfsup::viz::report(dir.path(), &dir.path().join("report.png")).unwrap();

    trainer(c, dir.path())
        .run(faulty(usize::MAX), &loader(&split))
        .unwrap();
    assert_logged_once(dir.path(), 8, 4);
    assert_eq!(
        event_files(dir.path()).len(),
        2,
        "one event file per session"
    );
}

#[test]
fn a_run_killed_before_its_first_checkpoint_starts_its_log_afresh() {
    let split = common::cifar10_train(64);
    let dev = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let faulty = |nan_from| Faulty {
        inner: simclr(&dev),
        nan_from,
    };
    // Step 1 logged, no checkpoint yet, a line cut off.
    trainer(config(2), dir.path())
        .run(faulty(1), &loader(&split))
        .unwrap_err();
    assert!(checkpoint::latest(dir.path()).unwrap().is_none());
    tear_the_log(dir.path());

    trainer(config(2), dir.path())
        .run(faulty(usize::MAX), &loader(&split))
        .unwrap();
    assert_logged_once(dir.path(), 4, 2);
}

#[test]
fn a_sessions_event_file_sorts_after_the_earlier_ones() {
    // TensorBoard reads a folder's event files in name order, and a session's start drops only
    // what it read before: a resumed session's file must sort last, even when the one before
    // was named by a clock ahead of this one (or in the same second by a later-sorting host).
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let before = format!("events.out.tfevents.{}.zz-host.99999.0.selfsup", now + 60);
    std::fs::write(dir.path().join(&before), b"").unwrap();
    selfsup::train::events::EventWriter::create(dir.path()).unwrap();
    let files = event_files(dir.path());
    assert_eq!(files.len(), 2);
    assert_eq!(files[0].file_name().unwrap().to_string_lossy(), before);
}

#[test]
fn readers_of_metrics_skip_a_torn_last_line_and_name_a_corrupt_one() {
    let dir = tempfile::tempdir().unwrap();
    let (log, png) = (dir.path().join("metrics.jsonl"), dir.path().join("r.png"));
    let good = "{\"kind\":\"step\",\"epoch\":1,\"step\":1,\"loss\":2.0}\n\
                {\"kind\":\"step\",\"epoch\":1,\"step\":2,\"loss\":1.5}\n";
    std::fs::write(&log, good).unwrap();
    tear_the_log(dir.path());
    selfsup::viz::report(dir.path(), &png).unwrap();
    // A line cut off inside the log is no kill's doing: an error that names it.
    std::fs::write(&log, format!("{good}{{\"kind\":\"st\n{good}")).unwrap();
    let err = format!("{:#}", selfsup::viz::report(dir.path(), &png).unwrap_err());
    assert!(err.contains("metrics.jsonl line 3"), "{err}");
}

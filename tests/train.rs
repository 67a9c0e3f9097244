//! The trainer on real CIFAR-10 images with a small SimCLR: the loss falls, a resumed run
//! continues bit for bit, a checkpoint cut off mid-write is ignored, a NaN stops the run.

mod common;

use std::path::Path;
use std::sync::Arc;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use selfsup::augment::{Pipeline, Sizes};
use selfsup::data::{Loader, Split};
use selfsup::methods::{SimClr, SimclrConfig};
use selfsup::models::{init_seeded, Backbone, BackboneConfig, ResNetConfig, Stem};
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
    use selfsup::train::events::{read_events, Kind, What};
    let dir = tempfile::tempdir().unwrap();
    train(64, 2, dir.path());
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
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
    // Every step's loss, at its step, as in metrics.jsonl.
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let mut steps = 0;
    for line in metrics.lines() {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let (tag, at) = match line["kind"].as_str().unwrap() {
            "step" => ("train/loss", line["step"].as_i64().unwrap()),
            _ => ("epoch/loss", line["epoch"].as_i64().unwrap()),
        };
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

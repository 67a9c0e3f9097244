//! MoCo: the momentum update and the queue against hand computations, the key encoder out of
//! reach of gradients, the positive column, shuffle-BN, and exact resume with key encoder
//! and queue in the checkpoint.

mod common;

use std::sync::Arc;

use burn::module::Param;
use burn::nn::Linear;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::augment::{Pipeline, Sizes};
use selfsup::data::Loader;
use selfsup::methods::moco::{enqueue, shuffle_order};
use selfsup::methods::{Moco, MocoConfig};
use selfsup::models::{ema_update, init_seeded, momentum_copy, BackboneConfig, ResNetConfig, Stem};
use selfsup::train::{Method, Progress, TrainConfig, Trainer};

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

/// Images drawn from a seeded generator (burn's own generator is global and shared by tests).
fn images(n: usize, seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = (0..n * 3 * 32 * 32)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    tensor(v, [n, 3, 32, 32], device)
}

fn moco(config: MocoConfig, device: &Device) -> Moco {
    let model = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    init_seeded(device, 5, || config.init(&model, device))
}

fn small(bn_splits: usize) -> MocoConfig {
    MocoConfig {
        queue_size: 40,
        proj_hidden: 32,
        proj_dim: 16,
        bn_splits,
        ..MocoConfig::default()
    }
}

fn progress(step: usize) -> Progress {
    Progress {
        epoch: 0,
        step,
        total_steps: 10,
        steps_per_epoch: 10,
    }
}

#[test]
fn momentum_update_follows_the_formula() {
    let dev = Device::flex();
    let linear = |w: Vec<f32>, b: Vec<f32>| Linear {
        weight: Param::from_tensor(tensor(w, [2, 2], &dev)),
        bias: Some(Param::from_tensor(tensor(b, [2], &dev))),
    };
    let student = linear(vec![5.0, 6.0, 7.0, 8.0], vec![-1.0, 1.0]);
    let teacher = momentum_copy(linear(vec![0.0; 4], vec![0.0; 2]), &student);
    assert_ne!(teacher.weight.id, student.weight.id, "the copy shares ids");
    assert_eq!(values(teacher.weight.val()), vec![5.0, 6.0, 7.0, 8.0]);

    let teacher = linear(vec![1.0, 2.0, 3.0, 4.0], vec![0.0, 0.0]);
    let teacher = ema_update(teacher, &student, 0.9);
    // 0.9·θt + 0.1·θs
    assert!(close(&values(teacher.weight.val()), &[1.4, 2.4, 3.4, 4.4]));
    assert!(close(&values(teacher.bias.unwrap().val()), &[-0.1, 0.1]));
}

#[test]
fn queue_is_fifo_across_wrap_around() {
    let dev = Device::flex();
    let rows = |v: &[f32]| tensor(v.to_vec(), [v.len(), 1], &dev);
    let q = rows(&[0.0; 5]);
    let q = enqueue(q, rows(&[1.0, 2.0]), 0);
    let q = enqueue(q, rows(&[3.0, 4.0]), 2);
    assert_eq!(values(q.clone()), vec![1.0, 2.0, 3.0, 4.0, 0.0]);
    // K = 5 is no multiple of 2: the third batch wraps, replacing the oldest key.
    let q = enqueue(q, rows(&[5.0, 6.0]), 4);
    assert_eq!(values(q.clone()), vec![6.0, 2.0, 3.0, 4.0, 5.0]);
    let q = enqueue(q, rows(&[7.0, 8.0]), 6);
    assert_eq!(values(q.clone()), vec![6.0, 7.0, 8.0, 4.0, 5.0]);
    // More keys than rows: the newest K remain, in ring order.
    let q = enqueue(q, rows(&[9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0]), 8);
    assert_eq!(values(q), vec![11.0, 12.0, 13.0, 14.0, 15.0]);
}

#[test]
fn after_step_enqueues_the_keys_at_the_step_position() {
    let dev = Device::flex();
    let m = moco(small(1), &dev);
    let keys = |v: f32| Tensor::<2>::full([16, 16], v, &dev);
    // Steps 0, 1, 2 of 16 keys each into K = 40: 0..16, 16..32, then 32..40 and 0..8.
    let m = m.after_step(Some(keys(1.0)), &progress(0));
    let m = m.after_step(Some(keys(2.0)), &progress(1));
    let m = m.after_step(Some(keys(3.0)), &progress(2));
    let first: Vec<f32> = values(m.queue()).chunks(16).map(|row| row[0]).collect();
    let mut expected = vec![3.0; 8];
    expected.extend([1.0; 8]);
    expected.extend([2.0; 16]);
    expected.extend([3.0; 8]);
    assert_eq!(first, expected);
}

#[test]
fn no_gradient_reaches_the_key_encoder_or_the_queue() {
    let dev = Device::flex().autodiff();
    let m = moco(
        MocoConfig {
            symmetric: true,
            ..small(2)
        },
        &dev,
    );
    let views = [images(8, 1, &dev), images(8, 2, &dev)];
    let out = m.loss(&views, &progress(0));
    let grads = GradientsParams::from_grads(out.loss.backward(), &m);
    let seen = common::params_by_path(&m, Some(&grads));
    let key = |p: &str| p.starts_with("key_") || p == "queue" || p.contains("running_");
    assert!(seen.len() > 20);
    for (path, _, has) in &seen {
        assert_eq!(*has, !key(path), "gradient for {path}: {has}");
    }
    assert!(seen.iter().any(|(p, _, _)| p.starts_with("key_backbone")));
}

fn running_stats(m: &Moco, prefix: &str) -> Vec<Vec<f32>> {
    common::params_by_path(m, None)
        .into_iter()
        .filter(|(p, _, _)| p.starts_with(prefix) && p.contains("running_"))
        .map(|(_, v, _)| v)
        .collect()
}

#[test]
fn key_encoder_keeps_its_own_batch_norm_statistics() {
    let dev = Device::flex().autodiff();
    let m = moco(small(1), &dev);
    let before = running_stats(&m, "backbone.");
    assert!(!before.is_empty());
    assert_eq!(before, running_stats(&m, "key_backbone."));
    // burn folds a forward pass's statistics in at the next pass: run two.
    for seed in [6, 7] {
        m.keys(images(8, seed, &dev), &shuffle_order(8, 0));
    }
    assert!(
        running_stats(&m, "backbone.") == before,
        "query statistics moved"
    );
    assert!(
        running_stats(&m, "key_backbone.") != before,
        "key statistics still"
    );
}

#[test]
fn positive_column_is_the_key_of_the_same_image() {
    let dev = Device::flex().autodiff();
    // Identical views and θk = θq (at initialisation): with one batch-norm group the key of
    // each image equals its query, whatever the shuffle, so the keys come back in image order.
    let m = moco(small(1), &dev);
    let x = images(8, 3, &dev);
    let q = m.queries(x.clone());
    let k = m.keys(x, &shuffle_order(8, 0));
    assert!(close(&values(q.clone()), &values(k.clone())));
    let logits = m.logits(q.clone(), k.clone());
    assert_eq!(logits.dims(), [8, 1 + 40]);
    let l = values(logits);
    for i in 0..8 {
        // q·k₊/τ with unit vectors and τ = 0.2: 1/0.2 = 5.
        assert!((l[i * 41] - 5.0).abs() < 1e-4, "row {i}: {}", l[i * 41]);
    }
    // The queue columns are q·queue/τ.
    let expected = values(q.matmul(m.queue().transpose()).div_scalar(0.2));
    let negatives: Vec<f32> = l.chunks(41).flat_map(|row| row[1..].to_vec()).collect();
    assert!(close(&negatives, &expected));
}

#[test]
fn shuffle_bn_normalises_a_key_with_other_images_than_its_query() {
    let dev = Device::flex().autodiff();
    let m = moco(small(2), &dev);
    // The same weights, batch norm over whole batches: the key of a group on its own.
    let whole = moco(small(1), &dev);
    let x = images(8, 4, &dev);
    let order = shuffle_order(8, 7);
    let q = values(m.queries(x.clone()));
    let k = values(m.keys(x.clone(), &order));
    // Each key is that of its group (shuffled positions p ≡ g mod 2), run on its own.
    let mut expected = vec![0.0; 8 * 16];
    for g in 0..2 {
        let idx: Vec<usize> = order.iter().skip(g).step_by(2).copied().collect();
        let xs: Vec<Tensor<4>> = idx.iter().map(|&i| x.clone().narrow(0, i, 1)).collect();
        let alone = whole.keys(Tensor::cat(xs, 0), &[0, 1, 2, 3]);
        for (row, &i) in values(alone).chunks(16).zip(&idx) {
            expected[i * 16..(i + 1) * 16].copy_from_slice(row);
        }
    }
    assert!(close(&k, &expected));
    // Images whose key group differs from their query group get a key unlike their query.
    let moved: Vec<usize> = (0..8)
        .filter(|&i| {
            let pos = order.iter().position(|&j| j == i).unwrap();
            pos % 2 != i % 2
        })
        .collect();
    assert!(!moved.is_empty(), "the shuffle kept every group");
    for i in moved {
        let d: f32 = (0..16).map(|c| (q[i * 16 + c] - k[i * 16 + c]).abs()).sum();
        assert!(
            d > 1e-3,
            "image {i}: key equals query despite other statistics"
        );
    }
}

#[test]
fn resumed_run_continues_exactly_with_key_encoder_and_queue() {
    let split = common::cifar10_train(64);
    let loader = Loader::new(
        split,
        Arc::new(Pipeline::preset("moco_v2", Sizes::small(32)).unwrap()),
        16,
        3,
    )
    .unwrap();
    let config: TrainConfig = toml::from_str(
        "epochs = 3\nbatch_size = 16\noptimizer = \"sgd\"\nmomentum = 0.9\nweight_decay = 5e-4\nbase_lr = 0.06\nlr_scaling = \"none\"\ncheckpoint_every = 1\n",
    )
    .unwrap();
    let dev = Device::flex().autodiff();
    let run = |dir: &std::path::Path, until: usize| {
        let mut t = Trainer::new(config.clone(), dir, dev.clone());
        t.progress = false;
        t.run_until(moco(small(2), &dev), &loader, until).unwrap()
    };
    let whole = tempfile::tempdir().unwrap();
    let (straight_model, straight) = run(whole.path(), 3);
    let cut = tempfile::tempdir().unwrap();
    run(cut.path(), 1);
    let (resumed_model, rest) = run(cut.path(), 3);
    assert_eq!(rest.step_losses[..], straight.step_losses[4..]);
    assert_eq!(
        values(resumed_model.queue()),
        values(straight_model.queue())
    );
}

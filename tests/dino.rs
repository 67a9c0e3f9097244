//! DINO: the loss against a hand computation, the centre update, schedules at their end points,
//! no gradient into the teacher, the frozen last layer, and multi-crop through a ViT.

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::losses::dino_loss;
use selfsup::methods::{Dino, DinoConfig};
use selfsup::models::{init_seeded, BackboneConfig, ResNetConfig, Stem};
use selfsup::train::optim::{decay_matrices, OptimConfig};
use selfsup::train::{Method, Progress};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn config() -> DinoConfig {
    DinoConfig {
        out_dim: 32,
        hidden: 16,
        bottleneck: 8,
        warmup_teacher_temp: 0.04,
        teacher_temp: 0.07,
        warmup_teacher_temp_epochs: 10.0,
        ..DinoConfig::default()
    }
}

fn dino(device: &Device) -> Dino {
    init_seeded(device, 0, || config().init(&common::tiny_vit(), device))
}

fn progress(epoch: usize, step: usize) -> Progress {
    Progress {
        epoch,
        step,
        total_steps: 100,
        steps_per_epoch: 10,
    }
}

fn crops(n: usize, size: usize, seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = (0..n * 3 * size * size)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(v, [n, 3, size, size]), device)
}

#[test]
fn loss_matches_a_hand_computation() {
    let dev = Device::flex();
    let t = |v: Vec<f32>| Tensor::<2>::from_data(TensorData::new(v, [1, 3]), &dev);
    let teacher = vec![t(vec![0.7, 0.2, 0.1]), t(vec![0.1, 0.1, 0.8])];
    let students = vec![
        t(vec![1.0, 0.0, 0.0]),
        t(vec![0.0, 0.5, 0.0]),
        t(vec![0.2, 0.1, 0.3]),
    ];
    let tau = 0.5;
    let log_softmax = |s: &[f32]| -> Vec<f32> {
        let z: Vec<f32> = s.iter().map(|v| v / tau).collect();
        let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
        z.iter().map(|v| v - lse).collect()
    };
    let p = [[0.7f32, 0.2, 0.1], [0.1, 0.1, 0.8]];
    let s = [[1.0f32, 0.0, 0.0], [0.0, 0.5, 0.0], [0.2, 0.1, 0.3]];
    // Pairs (0,1), (0,2), (1,0), (1,2).
    let mut sum = 0.0;
    for (i, j) in [(0, 1), (0, 2), (1, 0), (1, 2)] {
        let lq = log_softmax(&s[j]);
        sum -= (0..3).map(|k| p[i][k] * lq[k]).sum::<f32>();
    }
    let got: f32 = dino_loss(&teacher, &students, tau as f64).into_scalar();
    assert!((got - sum / 4.0).abs() < 1e-5, "{got} vs {}", sum / 4.0);
}

#[test]
fn centre_follows_its_ema() {
    let dev = Device::flex();
    let m = dino(&dev);
    assert!(values(m.center()).iter().all(|&v| v == 0.0));
    let rows = |v: f32, w: f32| {
        let data: Vec<f32> = (0..2)
            .flat_map(|r| (0..32).map(move |k| if r == 0 { v + k as f32 } else { w }))
            .collect();
        Tensor::<2>::from_data(TensorData::new(data, [2, 32]), &dev)
    };
    // c1 = 0.9·0 + 0.1·mean(rows) with mean_k = (1 + k + 3) / 2.
    let m = m.after_step(Some(rows(1.0, 3.0)), &progress(0, 0));
    let c1: Vec<f32> = (0..32).map(|k| 0.1 * (4.0 + k as f32) / 2.0).collect();
    assert!(values(m.center())
        .iter()
        .zip(&c1)
        .all(|(a, b)| (a - b).abs() < 1e-5));
    let m = m.after_step(Some(rows(-1.0, -1.0)), &progress(0, 1));
    let c2: Vec<f32> = (0..32)
        .map(|k| 0.9 * c1[k] + 0.1 * (-2.0 + k as f32) / 2.0)
        .collect();
    assert!(values(m.center())
        .iter()
        .zip(&c2)
        .all(|(a, b)| (a - b).abs() < 1e-5));
}

#[test]
fn schedules_hit_their_end_points() {
    let dev = Device::flex();
    let m = dino(&dev);
    assert!((m.teacher_temp(0.0) - 0.04).abs() < 1e-12);
    assert!((m.teacher_temp(5.0) - 0.055).abs() < 1e-12);
    assert!((m.teacher_temp(10.0) - 0.07).abs() < 1e-12);
    assert!((m.teacher_temp(50.0) - 0.07).abs() < 1e-12);
    assert!((m.teacher_momentum(&progress(0, 0)) - 0.996).abs() < 1e-12);
    assert!((m.teacher_momentum(&progress(9, 100)) - 1.0).abs() < 1e-12);
    // final_momentum = momentum: the constant λ of the short CPU recipe.
    let constant = DinoConfig {
        momentum: 0.99,
        final_momentum: 0.99,
        ..config()
    }
    .init(&common::tiny_vit(), &dev);
    for step in [0, 50, 100] {
        assert!((constant.teacher_momentum(&progress(0, step)) - 0.99).abs() < 1e-12);
    }
    let wd: OptimConfig =
        toml::from_str("optimizer = \"adamw\"\nweight_decay = 0.04\nfinal_weight_decay = 0.4\n")
            .unwrap();
    assert!((wd.weight_decay_at(0, 100) - 0.04).abs() < 1e-12);
    assert!((wd.weight_decay_at(50, 100) - 0.22).abs() < 1e-12);
    assert!((wd.weight_decay_at(100, 100) - 0.4).abs() < 1e-12);
}

#[test]
fn teacher_gets_no_gradient_and_the_last_layer_waits_an_epoch() {
    let dev = Device::flex().autodiff();
    let m = dino(&dev);
    // Two global 16 px crops and four local 8 px crops: the ViT resizes its positions.
    let mut views = vec![crops(4, 16, 1, &dev), crops(4, 16, 2, &dev)];
    views.extend((0..4).map(|i| crops(4, 8, 10 + i, &dev)));
    for (epoch, last_learns) in [(0, false), (1, true)] {
        let out = m.loss(&views, &progress(epoch, epoch * 10));
        assert!(out.keep.as_ref().unwrap().dims() == [8, 32]);
        let names: Vec<&str> = out.scalars.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"teacher_entropy") && names.contains(&"kl_teacher_student"));
        let grads = GradientsParams::from_grads(out.loss.backward(), &m);
        for (path, _, has) in common::params_by_path(&m, Some(&grads)) {
            let student = path.starts_with("backbone") || path.starts_with("head");
            let expected = student && (last_learns || !path.contains("last_v"));
            assert_eq!(has, expected, "epoch {epoch}: gradient for {path}: {has}");
        }
    }
}

#[test]
fn resnet_dino_with_batch_norm_in_the_head_trains_the_student_only() {
    let dev = Device::flex().autodiff();
    let resnet = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    let config = DinoConfig {
        head_batch_norm: true,
        ..config()
    };
    let m = init_seeded(&dev, 0, || config.init(&resnet, &dev));
    let views = vec![
        crops(4, 16, 1, &dev),
        crops(4, 16, 2, &dev),
        crops(4, 8, 3, &dev),
    ];
    let out = m.loss(&views, &progress(1, 10));
    let grads = GradientsParams::from_grads(out.loss.backward(), &m);
    let params = common::params_by_path(&m, Some(&grads));
    assert!(params.iter().any(|(p, _, _)| p.starts_with("head.norms")));
    for (path, _, has) in params {
        let learned = !path.contains("running_");
        let student = path.starts_with("backbone") || path.starts_with("head");
        assert_eq!(has, student && learned, "gradient for {path}: {has}");
    }
}

#[test]
fn scheduled_weight_decay_shrinks_trained_matrices_only() {
    let dev = Device::flex().autodiff();
    let m = dino(&dev);
    let before = m.center();
    let decayed = decay_matrices(m.clone(), 0.5);
    let all = (
        common::params_by_path(&m, None),
        common::params_by_path(&decayed, None),
    );
    let mut decayed_matrices = 0;
    for ((path, a, _), (_, b, _)) in all.0.iter().zip(&all.1) {
        let student = path.starts_with("backbone") || path.starts_with("head");
        if student && path.ends_with(".weight") {
            // Linear and conv weights: rank 2 and 4.
            assert!(
                a.iter().zip(b).all(|(x, y)| (x * 0.5 - y).abs() < 1e-6),
                "{path}"
            );
            decayed_matrices += 1;
        } else if !student || path.ends_with(".bias") || path.ends_with(".gamma") {
            assert_eq!(a, b, "{path} changed");
        }
    }
    assert!(decayed_matrices > 10);
    assert_eq!(values(before), values(decayed.center()));
}

#[test]
fn attention_mask_keeps_the_top_patches_holding_the_mass() {
    // 0.4 + 0.3 = 0.7 ≥ 0.6 of the mass: the two largest patches.
    let keep = selfsup::viz::mass_mask(&[0.1, 0.4, 0.05, 0.3, 0.15], 0.6);
    assert_eq!(keep, vec![false, true, false, true, false]);
    assert_eq!(selfsup::viz::mass_mask(&[1.0, 1.0], 1.0), vec![true, true]);
}

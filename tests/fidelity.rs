//! What runs around the losses, as the papers' own code has it: heads, initialisations, the
//! multi-crop wiring and the published recipes (issue 18).

mod common;

use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::config::Recipe;
use selfsup::methods::{DinoConfig, MaeConfig, MethodConfig, SimclrConfig};
use selfsup::models::{init_seeded, BackboneConfig, ConvInit, ResNetConfig, Stem};
use selfsup::train::{Method, Progress};

fn images(n: usize, size: usize, seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let data: Vec<f32> = (0..n * 3 * size * size)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    Tensor::from_data(TensorData::new(data, [n, 3, size, size]), device)
}

fn progress() -> Progress {
    Progress {
        epoch: 1,
        step: 10,
        total_steps: 100,
        steps_per_epoch: 10,
    }
}

fn resnet() -> BackboneConfig {
    BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    })
}

#[test]
fn simclr_has_the_official_head_and_sums_both_directions() {
    let dev = Device::flex().autodiff();
    let m = init_seeded(&dev, 0, || SimclrConfig::default().init(&resnet(), &dev));
    let views = vec![images(4, 16, 1, &dev), images(4, 16, 2, &dev)];
    let out = m.loss(&views, &progress());
    let grads = GradientsParams::from_grads(out.loss.clone().backward(), &m);
    let head: Vec<(String, usize, bool)> = common::params_by_path(&m, Some(&grads))
        .into_iter()
        .filter(|(p, _, _)| p.starts_with("projector"))
        .map(|(p, v, g)| (p, v.len(), g))
        .collect();
    let names: Vec<&str> = head.iter().map(|(p, _, _)| p.as_str()).collect();
    // Linear (no bias, hidden = the encoder's 64) → BN → ReLU → linear (no bias) → BN without β.
    assert_eq!(
        names,
        [
            "projector.layers.0.weight",
            "projector.layers.1.weight",
            "projector.norms.0.gamma",
            "projector.norms.0.beta",
            "projector.norms.0.running_mean",
            "projector.norms.0.running_var",
            "projector.output_norm.gamma",
            "projector.output_norm.beta",
            "projector.output_norm.running_mean",
            "projector.output_norm.running_var",
        ]
    );
    assert_eq!(head[0].1, 64 * 64);
    assert_eq!(head[1].1, 64 * 128);
    for (path, _, reached) in &head {
        let learned = !path.contains("running_") && path != "projector.output_norm.beta";
        assert_eq!(*reached, learned, "gradient for {path}");
    }
    // tf2/objective.py: loss_a + loss_b, each a mean over N rows = 2 × NT-Xent's mean over 2N.
    let z = m.projections(&views);
    let (z1, z2) = (z.clone().narrow(0, 0, 4), z.narrow(0, 4, 4));
    let expected: f32 = selfsup::losses::nt_xent(z1, z2, 0.5).into_scalar();
    let loss: f32 = out.loss.into_scalar();
    assert!(
        (loss - 2.0 * expected).abs() < 1e-5,
        "{loss} vs 2 × {expected}"
    );
}

#[test]
fn mae_initialises_as_the_official_code() {
    let dev = Device::flex().autodiff();
    let vit = BackboneConfig::Vit(selfsup::models::VitConfig::preset("tiny", 16, 4).unwrap());
    let config = MaeConfig {
        decoder_dim: 32,
        decoder_depth: 1,
        decoder_heads: 2,
        ..MaeConfig::default()
    };
    let m = init_seeded(&dev, 0, || config.init(&vit, &dev));
    let out = m.loss(&[images(2, 16, 1, &dev)], &progress());
    let grads = GradientsParams::from_grads(out.loss.backward(), &m);
    let params = common::params_by_path(&m, Some(&grads));
    let get = |name: &str| {
        params
            .iter()
            .find(|(p, _, _)| p == name)
            .unwrap_or_else(|| panic!("no {name}"))
    };
    // The encoder's positions: the fixed 2-D sin-cos table, no gradient.
    let (_, pos, reached) = get("backbone.Vit.pos_embed");
    assert_eq!(pos, &selfsup::methods::mae::sincos_2d(192, 4));
    assert!(!reached);
    // xavier-uniform linear layers (bound √(6 / (fan_in + fan_out))), zero biases; the patch
    // projection on its flattened [192, 3·4·4] weight.
    for (name, fan_in, fan_out) in [
        ("backbone.Vit.blocks.0.attn.qkv.weight", 192, 576),
        ("backbone.Vit.blocks.11.mlp.fc2.weight", 768, 192),
        ("decoder_embed.weight", 192, 32),
        ("decoder_pred.weight", 32, 48),
        ("backbone.Vit.patch_embed.proj.weight", 48, 192),
    ] {
        let (_, w, _) = get(name);
        let bound = (6.0 / (fan_in + fan_out) as f32).sqrt();
        let max = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!(
            max <= bound && max > 0.9 * bound,
            "{name}: max {max}, bound {bound}"
        );
        assert!(
            (std - bound / 3f32.sqrt()).abs() < 0.05 * bound,
            "{name}: std {std}"
        );
    }
    for name in ["backbone.Vit.blocks.0.attn.qkv.bias", "decoder_pred.bias"] {
        assert!(get(name).1.iter().all(|&b| b == 0.0), "{name}");
    }
}

#[test]
fn vit_and_dino_head_initialise_as_timm_and_dino() {
    let dev = Device::flex();
    let config = DinoConfig {
        out_dim: 4096,
        hidden: 64,
        bottleneck: 256,
        ..DinoConfig::default()
    };
    let m = init_seeded(&dev, 0, || config.init(&common::tiny_vit(), &dev));
    for (path, values, _) in common::params_by_path(&m, None) {
        if path.ends_with(".bias") && (path.contains("blocks") || path.contains("mlp")) {
            assert!(
                values.iter().all(|&b| b == 0.0),
                "{path}: timm's biases start at 0"
            );
        }
        // The last layer keeps PyTorch's Linear init: U(±1/√256).
        if path.ends_with("last_v") {
            let bound = 1.0 / 16.0;
            let max = values.iter().fold(0f32, |m, x| m.max(x.abs()));
            let std = (values.iter().map(|x| x * x).sum::<f32>() / values.len() as f32).sqrt();
            assert!(max <= bound && max > 0.99 * bound, "{path}: {max}");
            assert!(
                (std - bound / 3f32.sqrt()).abs() < 0.01 * bound,
                "{path}: {std}"
            );
        }
    }
}

/// `model.conv_init`: torchvision's Kaiming normal (fan-out) or `nn.Conv2d`'s default
/// U(±1/√fan_in), checked on every convolution of a ResNet-18 by its bound and standard deviation.
#[test]
fn resnet_convolutions_initialise_as_torchvision_or_pytorch() {
    use burn::module::{Module, ModuleVisitor, Param};
    /// Every 4-d weight (a convolution's): its shape and values.
    struct Convs(Vec<([usize; 4], Vec<f32>)>);
    impl ModuleVisitor for Convs {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            if D == 4 {
                let dims = p.val().dims();
                let values = p.val().into_data().try_to_vec::<f32>().unwrap();
                self.0.push(([dims[0], dims[1], dims[2], dims[3]], values));
            }
        }
    }
    let dev = Device::flex();
    for conv_init in [ConvInit::Torchvision, ConvInit::Pytorch] {
        let BackboneConfig::Resnet(mut config) = resnet() else {
            unreachable!()
        };
        config.width = 0.5;
        config.conv_init = conv_init;
        let model = init_seeded(&dev, 0, || BackboneConfig::Resnet(config).init(&dev));
        let mut convs = Convs(vec![]);
        model.visit(&mut convs);
        assert_eq!(
            convs.0.len(),
            20,
            "ResNet-18: 17 convolutions and 3 shortcuts"
        );
        for ([c_out, c_in, kh, kw], values) in convs.0 {
            let n = values.len() as f64;
            let std = (values.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
            let max = values.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
            let (fan_in, fan_out) = ((c_in * kh * kw) as f64, (c_out * kh * kw) as f64);
            let (want_std, bound) = match conv_init {
                ConvInit::Torchvision => ((2.0 / fan_out).sqrt(), f64::INFINITY),
                ConvInit::Pytorch => (1.0 / (3.0 * fan_in).sqrt(), 1.0 / fan_in.sqrt()),
            };
            // The sample's standard deviation is within ~4/√(2n) of the true one.
            let within = 4.0 / (2.0 * n).sqrt() + 1e-6;
            let shape = [c_out, c_in, kh, kw];
            assert!(
                (std / want_std - 1.0).abs() < within,
                "{conv_init:?} {shape:?}: std {std}, want {want_std}"
            );
            assert!(max <= bound, "{conv_init:?} {shape:?}: {max} > {bound}");
        }
    }
}

#[test]
fn dino_runs_its_batch_norm_head_once_over_all_crops() {
    // MultiCropWrapper: the head normalises global and local crops together, so a global crop's
    // logits depend on the local crops beside it.
    let dev = Device::flex().autodiff();
    let config = DinoConfig {
        out_dim: 32,
        hidden: 16,
        bottleneck: 8,
        head_batch_norm: true,
        ..DinoConfig::default()
    };
    let m = init_seeded(&dev, 0, || config.init(&resnet(), &dev));
    let globals = images(4, 16, 1, &dev);
    let logits = |locals: Tensor<4>| -> Vec<f32> {
        m.student_logits(vec![globals.clone(), locals], false, 0)
            .narrow(0, 0, 4)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(images(8, 8, 2, &dev)), logits(images(8, 8, 3, &dev)));
    let moved = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "the globals' logits ignore the locals: {moved}"
    );
    // The method evaluates and releases its teacher, as official DINO.
    assert_eq!(m.released(), selfsup::train::Which::Teacher);
}

#[test]
fn published_recipes_follow_the_sources_they_cite() {
    // google-research/simclr's CIFAR command.
    let r = Recipe::defaults("simclr").unwrap();
    assert_eq!((r.train.batch_size, r.train.epochs), (512, 1000));
    assert_eq!((r.train.base_lr, r.train.optim.weight_decay), (1.0, 1e-4));
    let MethodConfig::Simclr(c) = &r.method else {
        panic!()
    };
    assert_eq!(
        (c.temperature, c.proj_hidden, c.proj_output_norm),
        (0.5, None, true)
    );
    let p = r.augment.build().unwrap();
    assert_eq!(p.views.len(), 1);
    let v = &p.views[0];
    assert_eq!(v.blur.p, 0.0, "no blur at CIFAR scale");
    let j = &v.jitter;
    assert_eq!(
        [j.brightness, j.contrast, j.saturation, j.hue],
        [0.4, 0.4, 0.4, 0.1]
    );
    // DINO at batch 256: momentum 0.9995, no blur.
    let r = Recipe::defaults("dino").unwrap();
    let MethodConfig::Dino(c) = &r.method else {
        panic!()
    };
    assert_eq!((r.train.batch_size, c.momentum), (256, 0.9995));
    assert!(r
        .augment
        .build()
        .unwrap()
        .views
        .iter()
        .all(|v| v.blur.p == 0.0));
    // solo-learn's MoCo v2+: crops from 8% of the image, key momentum 0.99 → 0.999.
    let r = Recipe::defaults("moco").unwrap();
    let MethodConfig::Moco(c) = &r.method else {
        panic!()
    };
    assert_eq!((c.momentum, c.final_momentum), (0.99, Some(0.999)));
    assert_eq!(r.augment.build().unwrap().views[0].scale, [0.08, 1.0]);
    // solo-learn's CIFAR recipes (scripts/pretrain/cifar/*.yaml), batch 256.
    let solarize = |r: &Recipe| -> Vec<f32> {
        let views = r.augment.build().unwrap().views;
        views.iter().map(|v| v.solarize).collect()
    };
    let r = Recipe::defaults("byol").unwrap();
    let MethodConfig::Byol(c) = &r.method else {
        panic!()
    };
    assert_eq!(
        (c.proj_hidden, c.proj_dim, c.pred_hidden),
        (4096, 256, 4096)
    );
    assert_eq!((c.momentum, c.final_momentum), (0.99, 1.0));
    assert_eq!((r.train.base_lr, r.train.optim.weight_decay), (1.0, 1e-5));
    assert_eq!(solarize(&r), [0.0, 0.2], "asymmetric.yaml");
    let r = Recipe::defaults("simsiam").unwrap();
    let MethodConfig::Simsiam(c) = &r.method else {
        panic!()
    };
    assert_eq!(
        (c.proj_hidden, c.proj_dim, c.pred_hidden),
        (2048, 2048, 512)
    );
    assert!(c.fix_pred_lr);
    assert_eq!((r.train.base_lr, r.train.optim.weight_decay), (0.5, 1e-5));
    assert!(r
        .augment
        .build()
        .unwrap()
        .views
        .iter()
        .all(|v| v.blur.p == 0.5));
    let r = Recipe::defaults("barlow_twins").unwrap();
    let MethodConfig::BarlowTwins(c) = &r.method else {
        panic!()
    };
    assert_eq!((c.proj_dim, c.lambda, c.scale_loss), (2048, 0.0051, 0.1));
    assert_eq!((r.train.base_lr, r.train.optim.weight_decay), (0.3, 1e-4));
    let r = Recipe::defaults("vicreg").unwrap();
    let MethodConfig::Vicreg(c) = &r.method else {
        panic!()
    };
    assert_eq!((c.sim_coeff, c.std_coeff, c.cov_coeff), (25.0, 25.0, 1.0));
    assert_eq!(solarize(&r), [0.1]);
    assert_eq!(r.augment.build().unwrap().views[0].scale, [0.2, 1.0]);
    // swav.yaml; main_swav.py's ε, iterations and τ.
    let r = Recipe::defaults("swav").unwrap();
    let MethodConfig::Swav(c) = &r.method else {
        panic!()
    };
    assert_eq!((c.proj_hidden, c.proj_dim, c.prototypes), (2048, 128, 3000));
    assert_eq!(
        (c.epsilon, c.sinkhorn_iterations, c.temperature),
        (0.05, 3, 0.1)
    );
    assert_eq!(
        (
            c.queue_size,
            c.epoch_queue_starts,
            c.freeze_prototypes_epochs
        ),
        (3840, 50, 2)
    );
    assert_eq!((r.train.base_lr, r.train.optim.weight_decay), (0.6, 1e-6));
    let views = r.augment.build().unwrap().views;
    assert!(views
        .iter()
        .all(|v| v.jitter.brightness == 0.8 && v.blur.p == 0.5));
}

#[test]
fn fine_tuning_trains_the_encoder_not_only_the_head() {
    // The encoder arrives on the plain device (as a run folder's is loaded) and must be trained
    // on the autodiff one: before the fix only the linear head learned.
    let dev = Device::flex();
    let backbone = init_seeded(&dev, 0, || resnet().init(&dev));
    let before = common::params_by_path(&backbone, None);
    let split = |n: usize| {
        let images = (0..n as u32).map(common::pattern).collect();
        selfsup::data::Split::new(
            "train",
            images,
            Some((0..n as u32).map(|i| i % 2).collect()),
        )
    };
    let eval =
        selfsup::augment::Pipeline::preset("eval", selfsup::augment::Sizes::small(32)).unwrap();
    let config = selfsup::eval::finetune::FinetuneConfig {
        epochs: 1,
        batch_size: 4,
        warmup_epochs: 0.0,
        ..Default::default()
    };
    let tuned = selfsup::eval::finetune::finetune(
        backbone,
        64,
        &split(8),
        &split(4),
        2,
        &eval,
        &eval,
        &config,
        &dev,
    )
    .unwrap();
    let after = common::params_by_path(&tuned.backbone, None);
    for ((path, a, _), (_, b, _)) in before.iter().zip(&after) {
        if path.ends_with("weight") || path.ends_with("gamma") {
            assert!(a != b, "{path} did not change in fine-tuning");
        }
    }
}

#[test]
fn drop_path_rises_over_the_blocks_and_rescales_what_it_keeps() {
    let dev = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (n, depth, rate) = (4000, 5, 0.4);
    let masks = selfsup::models::drop_path_masks(n, depth, rate, &mut rng, &dev);
    assert_eq!(masks.len(), depth);
    for (i, pair) in masks.iter().enumerate() {
        let p = rate * i as f64 / (depth - 1) as f64;
        for mask in pair {
            assert_eq!(mask.dims(), [n, 1, 1]);
            let v = mask.clone().into_data().try_to_vec::<f32>().unwrap();
            let kept = 1.0 / (1.0 - p) as f32;
            assert!(
                v.iter().all(|&x| x == 0.0 || (x - kept).abs() < 1e-6),
                "block {i}"
            );
            let dropped = v.iter().filter(|&&x| x == 0.0).count() as f64 / n as f64;
            assert!(
                (dropped - p).abs() < 0.03,
                "block {i}: dropped {dropped}, p {p}"
            );
        }
    }
    // Rate 0 is the plain forward; a rate changes the features; the same seed draws the same.
    let vit = init_seeded(&dev, 0, || common::tiny_vit().init(&dev));
    let x = images(3, 16, 1, &dev);
    let f = |rate: f64, seed: u64| -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        vit.forward_drop_path(x.clone(), rate, &mut rng)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap()
    };
    let plain: Vec<f32> = vit
        .forward(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_eq!(f(0.0, 1), plain);
    assert_eq!(f(0.9, 1), f(0.9, 1));
    assert_ne!(f(0.9, 1), plain);
}

#[test]
fn fine_tuning_defaults_are_maes() {
    // main_finetune.py: --drop_path 0.1, --smoothing 0.1, --layer_decay 0.75, --weight_decay
    // 0.05, --warmup_epochs 5, --epochs 100 (ViT-L/H; ViT-B takes 0.65 and 5e-4).
    let c = selfsup::eval::finetune::FinetuneConfig::default();
    assert_eq!((c.drop_path, c.label_smoothing), (0.1, 0.1));
    assert_eq!(
        (c.layer_decay, c.weight_decay, c.warmup_epochs, c.epochs),
        (0.75, 0.05, 5.0, 100)
    );
}

#[test]
fn linear_eval_follows_each_methods_official_code() {
    use selfsup::train::OptimizerKind::{Lars, Sgd};
    let l = |m: &str| Recipe::defaults(m).unwrap().linear_eval;
    // DINO eval_linear.py: SGD 0.001 × b/256, 100 epochs, ViT-S: the last 4 class tokens.
    let d = l("dino");
    assert_eq!(
        (d.optimizer, d.base_lr, d.epochs, d.last_blocks),
        (Sgd, 0.001, 100, 4)
    );
    // MAE main_linprobe.py: BN without affine, LARS 0.1 × b/256, 90 epochs, 10 of warm-up.
    let m = l("mae");
    assert_eq!((m.optimizer, m.base_lr, m.epochs), (Lars, 0.1, 90));
    assert_eq!(
        (m.warmup_epochs, m.batch_norm, m.last_blocks),
        (10.0, true, 1)
    );
    // MoCo main_lincls.py: lr 30, 100 epochs; SimCLR: 0.1 × b/256, 90 epochs. No weight decay.
    let (mo, s) = (l("moco"), l("simclr"));
    assert_eq!(
        (mo.base_lr, mo.epochs, s.base_lr, s.epochs),
        (30.0, 100, 0.1, 90)
    );
    for c in [&d, &m, &mo, &s] {
        assert_eq!(c.weight_decay, 0.0);
    }
    // Each code's own schedule, 10 steps an epoch. MoCo: x0.1 from epochs 60 and 80.
    use selfsup::eval::LinearSchedule::{Cosine, EpochCosine, Step};
    assert_eq!(
        (mo.schedule, mo.milestones.as_slice()),
        (Step, &[60, 80][..])
    );
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12 * b.abs().max(1.0), "{a} vs {b}");
    close(mo.lr(599, 59, 10), 30.0);
    close(mo.lr(600, 60, 10), 3.0);
    close(mo.lr(800, 80, 10), 0.3);
    // DINO: CosineAnnealingLR(epochs) stepped per epoch: constant within one, half at the middle.
    assert_eq!(d.schedule, EpochCosine);
    close(d.lr(0, 0, 10), 0.001);
    close(d.lr(9, 0, 10), 0.001);
    close(d.lr(500, 50, 10), 0.0005);
    // MAE: per-step linear warm-up over 10 epochs, then a per-step cosine over the other 80.
    assert_eq!((m.schedule, s.schedule), (Cosine, Cosine));
    let peak = 0.1 * m.batch_size as f64 / 256.0;
    close(m.lr(0, 0, 10), peak / 100.0);
    close(m.lr(99, 9, 10), peak);
    close(m.lr(100, 10, 10), peak);
    close(m.lr(500, 50, 10), peak / 2.0);
}

#[test]
fn last_blocks_class_tokens_end_with_the_one_forward_gives() {
    let dev = Device::flex();
    let BackboneConfig::Vit(config) = common::tiny_vit() else {
        panic!()
    };
    let vit = init_seeded(&dev, 0, || config.init(&dev));
    let x = images(3, config.image_size, 4, &dev);
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    let own = values(vit.forward(x.clone()));
    assert_eq!(values(vit.last_blocks_cls(x.clone(), 1)), own);
    let two = vit.last_blocks_cls(x, 2);
    let d = config.dim;
    assert_eq!(two.dims(), [3, 2 * d]);
    // The second block of columns is the last block's: the class token forward returns.
    assert_eq!(values(two.clone().narrow(1, d, d)), own);
    assert_ne!(values(two.narrow(1, 0, d)), own);
}

/// Images of two classes a frozen random encoder tells apart linearly: dark and bright noise.
fn dark_or_bright(n: usize, seed: u64) -> selfsup::data::Split {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let labels: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    let images = labels
        .iter()
        .map(|&c| {
            image::RgbImage::from_fn(32, 32, |_, _| {
                let base = if c == 0 { 40 } else { 180 };
                image::Rgb([0; 3].map(|_: u8| base + rng.random_range(0..60u8)))
            })
        })
        .collect();
    selfsup::data::Split::new("train", images, Some(labels))
}

#[test]
fn linear_eval_learns_a_classifier_on_frozen_augmented_features() {
    use selfsup::eval::{linear_eval, LinearEvalConfig};
    let dev = Device::flex();
    let backbone = init_seeded(&dev, 0, || resnet().init(&dev));
    let sizes = selfsup::augment::Sizes::small(32);
    let eval = selfsup::augment::Pipeline::preset("eval", sizes).unwrap();
    let augment = selfsup::augment::Pipeline {
        views: vec![selfsup::augment::ViewSpec::default()],
        ..eval.clone()
    };
    let (train, test) = (dark_or_bright(64, 1), dark_or_bright(20, 2));
    // MoCo's SGD and MAE's LARS behind batch norm without affine parameters.
    // LARS scales each weight step to 0.001 of the weight norm (its bias steps are plain SGD's),
    // so it takes more steps: 64 at peak lr 6.4 = MAE's 0.1 × 16384 / 256.
    for (epochs, base_lr, lars) in [(4, 30.0, false), (16, 102.4, true)] {
        let config = LinearEvalConfig {
            epochs,
            batch_size: 16,
            optimizer: if lars {
                selfsup::train::OptimizerKind::Lars
            } else {
                selfsup::train::OptimizerKind::Sgd
            },
            base_lr,
            batch_norm: lars,
            ..LinearEvalConfig::default()
        };
        let acc = linear_eval(&backbone, &train, &test, 2, &augment, &eval, &config, &dev).unwrap();
        assert!(acc.top1 >= 0.9, "lars {lars}: top-1 {}", acc.top1);
    }
    // AdamW is the quick probe's, not a paper's linear evaluation.
    let adamw = LinearEvalConfig {
        optimizer: selfsup::train::OptimizerKind::Adamw,
        ..LinearEvalConfig::default()
    };
    let err = linear_eval(&backbone, &train, &test, 2, &augment, &eval, &adamw, &dev).unwrap_err();
    assert!(err.to_string().contains("linear_eval.optimizer"), "{err}");
}

#[test]
fn the_class_head_of_linear_evaluation_and_fine_tuning_trains_its_bias() {
    // Official heads: weight N(0, std), bias zeroed *and trained* (a bias replaced by a fresh
    // zero tensor through `Param::map` is silently frozen in burn).
    let dev = Device::flex().autodiff();
    for std in [0.01, 2e-5] {
        let head = selfsup::eval::classifier_head(384, 10, std, &dev);
        let x = Tensor::<2>::random([8, 384], burn::tensor::Distribution::Default, &dev);
        let loss = head.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &head);
        let params = common::params_by_path(&head, Some(&grads));
        for (path, values, has_grad) in &params {
            assert!(has_grad, "std {std}: {path} gets no gradient");
            if path.ends_with("bias") {
                assert!(values.iter().all(|&v| v == 0.0), "{path} starts at 0");
            } else {
                let sd = (values.iter().map(|v| v * v).sum::<f32>() / values.len() as f32).sqrt();
                assert!(
                    (sd / std as f32 - 1.0).abs() < 0.05,
                    "weight std {sd}, want {std}"
                );
            }
        }
        assert_eq!(params.len(), 2);
    }
}

#[test]
fn fine_tuning_exempts_the_class_token_and_positions_from_weight_decay() {
    // MAE's param_groups_lrd skips timm's no_weight_decay() set (pos_embed, cls_token) and every
    // bias and norm; matrices decay. With zero gradients, AdamW's step is the decay alone.
    use selfsup::train::{OptimConfig, OptimizerKind};
    let dev = Device::flex().autodiff();
    let BackboneConfig::Vit(config) = common::tiny_vit() else {
        panic!()
    };
    for exempt in [true, false] {
        let vit = init_seeded(&dev, 0, || config.init(&dev));
        let before = common::params_by_path(&vit, None);
        let x = images(2, config.image_size, 1, &dev);
        let loss = vit.forward(x).sum().mul_scalar(0.0);
        let grads = GradientsParams::from_grads(loss.backward(), &vit);
        let mut optim = OptimConfig {
            optimizer: OptimizerKind::Adamw,
            weight_decay: 0.5,
            exempt_embeddings: exempt,
            ..OptimConfig::default()
        }
        .init();
        let after = common::params_by_path(&optim.step(0.1, vit, grads), None);
        for ((path, a, _), (_, b, _)) in before.iter().zip(&after) {
            let embedding = path.ends_with("cls_token") || path.ends_with("pos_embed");
            let decayed = a
                .iter()
                .zip(b)
                .all(|(a, b)| (b - a * 0.95).abs() <= 1e-6 * a.abs().max(1.0));
            let kept = a == b;
            match (
                embedding,
                path.ends_with("weight") && !path.contains("norm"),
            ) {
                (true, _) => assert!(
                    if exempt { kept } else { decayed },
                    "{path}, exempt {exempt}"
                ),
                (false, true) => assert!(decayed, "{path} did not decay"),
                (false, false) => assert!(kept, "{path} decayed"),
            }
        }
    }
}

#[test]
fn mixup_and_cutmix_mix_images_and_labels_as_timm() {
    use selfsup::augment::mix::{cutmix_box, mixup_targets, Mix};
    let dev = Device::flex();
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    // mixup_target([0, 2], 3 classes, λ 0.7, ε 0.1): off 0.1/3, on 1 − 0.1 + 0.1/3; image 0's
    // partner is image 1 (the batch reversed).
    let t = values(mixup_targets(&[0, 2], 3, 0.7, 0.1, &dev));
    let (off, on) = (0.1 / 3.0, 0.9 + 0.1 / 3.0);
    let want = [
        off + (on - off) * 0.7,
        off,
        off + (on - off) * 0.3,
        off + (on - off) * 0.3,
        off,
        off + (on - off) * 0.7,
    ];
    for (g, w) in t.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{t:?}");
    }
    // With λ = 1 the soft loss is the label-smoothed one.
    let logits = images(4, 1, 3, &dev).reshape([4, 3]);
    let labels = [2, 0, 1, 1];
    let soft: f32 = selfsup::losses::soft_cross_entropy(
        logits.clone(),
        mixup_targets(&labels, 3, 1.0, 0.1, &dev),
    )
    .into_scalar();
    let smoothed: f32 = selfsup::losses::cross_entropy_smoothed(logits, &labels, 0.1).into_scalar();
    assert!((soft - smoothed).abs() < 1e-6, "{soft} vs {smoothed}");

    // rand_bbox: λ 0.75 → sides 16 of 32, around (5, 20), clipped at the top.
    assert_eq!(cutmix_box([32, 32], 0.75, [5, 20]), (0..13, 12..28));
    let x = images(2, 4, 5, &dev);
    let cut = Mix::Cutmix {
        lam: 0.75,
        rows: 1..3,
        cols: 0..2,
    };
    let mixed = cut
        .apply(x.clone())
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let x0 = x.clone().into_data().try_to_vec::<f32>().unwrap();
    let at = |n: usize, c: usize, y: usize, x: usize| ((n * 3 + c) * 4 + y) * 4 + x;
    for (c, y, col) in [(0, 1, 0), (2, 2, 1), (1, 0, 0), (0, 3, 3)] {
        let boxed = (1..3).contains(&y) && col < 2;
        let from = if boxed { 1 } else { 0 };
        assert_eq!(
            mixed[at(0, c, y, col)],
            x0[at(from, c, y, col)],
            "({c}, {y}, {col})"
        );
    }
    let mixup = Mix::Mixup { lam: 0.6 }
        .apply(x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let i = at(1, 2, 3, 1);
    assert!((mixup[i] - (0.6 * x0[i] + 0.4 * x0[at(0, 2, 3, 1)])).abs() < 1e-6);
    // Drawn: λ of a CutMix is the area its box leaves.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut kinds = [0, 0];
    for _ in 0..200 {
        match Mix::draw(0.8, 1.0, 0.5, [32, 32], &mut rng).unwrap() {
            Mix::Mixup { lam } => {
                assert!((0.0..=1.0).contains(&lam));
                kinds[0] += 1;
            }
            Mix::Cutmix { lam, rows, cols } => {
                assert!((lam - (1.0 - (rows.len() * cols.len()) as f64 / 1024.0)).abs() < 1e-12);
                kinds[1] += 1;
            }
        }
    }
    assert!(kinds[0] > 70 && kinds[1] > 70, "{kinds:?}");
    assert!(Mix::draw(0.0, 0.0, 0.5, [32, 32], &mut rng).is_none());
}

#[test]
fn random_erasing_fills_one_rectangle_with_noise() {
    use selfsup::augment::mix::random_erase;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (c, h, w) = (3, 32, 32);
    let mut erased = 0;
    for _ in 0..100 {
        let mut image = vec![5.0f32; c * h * w];
        let did = random_erase(&mut image, [c, h, w], 0.25, &mut rng);
        let changed: Vec<usize> = (0..h * w).filter(|&i| image[i] != 5.0).collect();
        assert_eq!(did, !changed.is_empty());
        if !did {
            continue;
        }
        erased += 1;
        // One rectangle, the same on every channel, of 2%–⅓ of the image (rounding aside).
        let (ys, xs): (Vec<usize>, Vec<usize>) = changed.iter().map(|i| (i / w, i % w)).unzip();
        let rows = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
        let cols = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
        assert_eq!(rows * cols, changed.len());
        let frac = changed.len() as f64 / (h * w) as f64;
        assert!((0.01..0.4).contains(&frac), "{frac}");
        for ch in 1..c {
            assert!(changed.iter().all(|&i| image[ch * h * w + i] != 5.0));
        }
    }
    assert!(
        (10..45).contains(&erased),
        "{erased} of 100 erased at p 0.25"
    );
}

#[test]
fn fine_tuning_a_mean_pooling_vit_normalises_its_mean_token_afresh() {
    // MAE's models_vit.py (global_pool): fc_norm(mean(patch tokens)), the blocks' output
    // without the final norm, through a fresh LayerNorm. Features of a random ViT: the mean
    // token differs from the mean of normalised tokens (Pool::Mean, timm's avg pool).
    let dev = Device::flex();
    let BackboneConfig::Vit(mut config) = common::tiny_vit() else {
        panic!()
    };
    config.pool = selfsup::models::Pool::Mean;
    let vit = init_seeded(&dev, 0, || config.init(&dev));
    let x = images(3, config.image_size, 2, &dev);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let raw = vit.mean_patch_token(x.clone(), 0.0, &mut rng);
    let pooled = vit.forward(x);
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    let (raw, pooled) = (values(raw), values(pooled));
    assert_ne!(raw, pooled);
    // Pool::Mean rows are means of normalised tokens (γ 1, β 0 at init): their spread is below
    // 1, where the raw mean keeps the blocks' scale.
    for row in pooled.chunks(config.dim) {
        let mean = row.iter().sum::<f32>() / row.len() as f32;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / row.len() as f32;
        assert!(var < 1.0, "{var}");
    }
}

#[test]
fn a_resnets_intermediate_stage_can_be_evaluated() {
    // RotNet evaluates earlier blocks: linear_eval.stage picks a ResNet stage's pooled output.
    let dev = Device::flex();
    let BackboneConfig::Resnet(config) = resnet() else {
        panic!()
    };
    let net = init_seeded(&dev, 0, || config.init(&dev));
    let x = images(2, 32, 6, &dev);
    let values = |t: Tensor<2>| t.into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(
        values(net.stage_features(x.clone(), 4)),
        values(net.forward(x.clone()))
    );
    // Width 0.125: stages of 8, 16, 32 and 64 channels.
    for (stage, c) in [(1, 8), (2, 16), (3, 32)] {
        assert_eq!(net.stage_features(x.clone(), stage).dims(), [2, c]);
    }
    let bad = selfsup::eval::LinearEvalConfig {
        stage: 5,
        ..Default::default()
    };
    assert!(bad
        .check()
        .unwrap_err()
        .to_string()
        .contains("linear_eval.stage = 5"));
}

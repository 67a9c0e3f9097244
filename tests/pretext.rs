//! Pretext tasks: rotation views and labels, the jigsaw permutation set and puzzles, inpainting
//! masks, the weighted reconstruction loss, the decoder's bottlenecks, what the discriminator
//! judges and at which rate, and the separation of generator and discriminator.

mod common;

use std::collections::HashSet;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::augment::ops::MaskKind;
use selfsup::augment::{sample_rng, Pipeline, Sizes, View};
use selfsup::methods::inpainting::{masked_mse, overlap_weights, Adversary};
use selfsup::methods::jigsaw::{hamming, min_hamming, permutation_set, Selection, TILES};
use selfsup::methods::{InpaintingConfig, JigsawConfig, RotationConfig};
use selfsup::models::{init_seeded, BackboneConfig, Bottleneck, ResNetConfig, Stem, VitConfig};
use selfsup::train::{Method, OptimConfig, OptimizerKind, Progress};

fn model() -> BackboneConfig {
    BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    })
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn progress() -> Progress {
    Progress {
        epoch: 0,
        step: 0,
        total_steps: 1,
        steps_per_epoch: 1,
    }
}

/// View data turned one quarter counter-clockwise: out(y, x) = in(x, w−1−y).
fn turn(v: &View) -> View {
    let (h, w) = (v.height, v.width);
    let mut data = vec![0.0; v.data.len()];
    for c in 0..3 {
        for y in 0..w {
            for x in 0..h {
                data[c * h * w + y * h + x] = v.data[c * h * w + x * w + (w - 1 - y)];
            }
        }
    }
    View {
        data,
        height: w,
        width: h,
    }
}

#[test]
fn rotation_view_r_is_view_0_turned_r_quarters() {
    let img = common::pattern(7);
    let base = Pipeline::preset("mae", Sizes::small(32)).unwrap();
    let views = RotationConfig {}
        .augment(base)
        .views(&img, &mut sample_rng(0, 0, 0));
    assert_eq!(views.len(), 4);
    let mut expected = views[0].clone();
    for (r, v) in views.iter().enumerate().skip(1) {
        expected = turn(&expected);
        assert_eq!(v, &expected, "view {r}");
        assert_ne!(v, &views[0]);
    }
}

#[test]
fn rotation_loss_labels_view_r_with_r() {
    let dev = Device::flex().autodiff();
    let m = init_seeded(&dev, 0, || RotationConfig {}.init(&model(), &dev));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let views: Vec<Tensor<4>> = (0..4)
        .map(|_| {
            let x: Vec<f32> = (0..2 * 3 * 16 * 16)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Tensor::<4>::from_data(TensorData::new(x, [2, 3, 16, 16]), &dev)
        })
        .collect();
    let loss: f32 = m.loss(&views, &progress()).loss.into_scalar();
    // By hand: rows 2r, 2r+1 are the images of slot r, labelled r.
    let logits = values(m.logits(Tensor::cat(views, 0)));
    let mut sum = 0.0;
    for (row, z) in logits.chunks(4).enumerate() {
        let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
        sum += lse - z[row / 2];
    }
    assert!((loss - sum / 8.0).abs() < 1e-4, "{loss} vs {}", sum / 8.0);
}

#[test]
fn permutation_set_is_spread_and_without_duplicates() {
    for (count, seed) in [(100, 0), (30, 5)] {
        let set = permutation_set(count, seed, Selection::MaxMean);
        assert_eq!(set.len(), count);
        let unique: HashSet<_> = set.iter().collect();
        assert_eq!(unique.len(), count, "duplicates");
        for p in &set {
            let mut sorted = *p;
            sorted.sort();
            assert_eq!(sorted, std::array::from_fn::<u8, TILES, _>(|i| i as u8));
        }
        // A random set of the same size, for comparison.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 100);
        let random: Vec<[u8; TILES]> = (0..count)
            .map(|_| {
                let mut p: [u8; TILES] = std::array::from_fn(|i| i as u8);
                rand::seq::SliceRandom::shuffle(&mut p[..], &mut rng);
                p
            })
            .collect();
        let mean = |s: &[[u8; TILES]]| {
            let mut sum = 0;
            for (i, a) in s.iter().enumerate() {
                sum += s[i + 1..].iter().map(|b| hamming(a, b)).sum::<usize>();
            }
            sum as f64 / (s.len() * (s.len() - 1) / 2) as f64
        };
        let (ours, theirs) = (mean(&set), mean(&random));
        println!(
            "{count} permutations: mean Hamming distance {ours:.3} (random set: {theirs:.3}), minimum {}",
            min_hamming(&set)
        );
        assert!(ours > theirs && ours > 8.0, "{ours} vs random {theirs}");
    }
    // The greedy rule of Noroozi's script: each pick has the largest mean distance to the picks
    // before it among all 9! permutations.
    // The max-min rule instead: no two of 100 closer than 6 tiles (a random set: 2 or less).
    assert!(min_hamming(&permutation_set(100, 0, Selection::MaxMin)) >= 6);
    let set = permutation_set(6, 1, Selection::MaxMean);
    let mut all: Vec<[u8; TILES]> = vec![];
    let mut p: [u8; TILES] = std::array::from_fn(|i| i as u8);
    loop {
        all.push(p);
        // Lexicographic successor.
        let Some(i) = (0..TILES - 1).rev().find(|&i| p[i] < p[i + 1]) else {
            break;
        };
        let j = (i + 1..TILES).rev().find(|&j| p[j] > p[i]).unwrap();
        p.swap(i, j);
        p[i + 1..].reverse();
    }
    for k in 1..set.len() {
        let sum = |q: &[u8; TILES]| set[..k].iter().map(|c| hamming(c, q)).sum::<usize>();
        let best = all
            .iter()
            .filter(|q| !set[..k].contains(q))
            .map(sum)
            .max()
            .unwrap();
        assert_eq!(sum(&set[k]), best, "pick {k}");
    }
    assert_eq!(
        hamming(&[0, 1, 2, 3, 4, 5, 6, 7, 8], &[1, 0, 2, 3, 4, 5, 6, 7, 8]),
        2
    );
    assert_eq!(
        permutation_set(50, 3, Selection::MaxMean),
        permutation_set(50, 3, Selection::MaxMean),
        "not a function of the seed"
    );
}

#[test]
fn jigsaw_puzzle_places_tile_pi_j_at_position_j() {
    let dev = Device::flex();
    let config = JigsawConfig {
        permutations: 10,
        hidden: 16,
        ..JigsawConfig::default()
    };
    let m = init_seeded(&dev, 0, || config.init(&model(), 0, &dev)).valid();
    let set = m.permutations();
    assert_eq!(
        set,
        permutation_set(10, 0, Selection::MaxMean),
        "the stored set is not the seed's"
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let tiles: Vec<Tensor<4>> = (0..TILES)
        .map(|_| {
            let v: Vec<f32> = (0..2 * 3 * 9 * 9)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Tensor::from_data(TensorData::new(v, [2, 3, 9, 9]), &dev)
        })
        .collect();
    // Puzzle p of tiles T shows T[π_p(j)] at position j. Lay the tiles out so that permutation
    // q shows the same sequence: U[π_q(j)] = T[π_p(j)]; both puzzles must then be identical.
    let (p, q) = (3, 7);
    let mut laid = tiles.clone();
    for j in 0..TILES {
        laid[set[q][j] as usize] = tiles[set[p][j] as usize].clone();
    }
    let a = values(m.logits(&tiles, &[p, p]));
    let b = values(m.logits(&laid, &[q, q]));
    assert_eq!(a.len(), 2 * 10);
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
    let c = values(m.logits(&tiles, &[q, q]));
    assert!(
        a.iter().zip(&c).any(|(x, y)| (x - y).abs() > 1e-4),
        "the order is ignored"
    );
}

#[test]
fn tile_colour_jitter_shifts_each_channel_and_clips() {
    // The PyTorch port's rgb_jittering: im[:, :, ch] += randint(-2, 2), clipped to 0..=255.
    let mut img = image::RgbImage::from_pixel(2, 1, image::Rgb([0, 128, 255]));
    img.put_pixel(1, 0, image::Rgb([1, 2, 254]));
    selfsup::augment::ops::shift_channels(&mut img, [-2, 1, 1]);
    assert_eq!(img.get_pixel(0, 0).0, [0, 129, 255]);
    assert_eq!(img.get_pixel(1, 0).0, [0, 3, 255]);
    assert_eq!(JigsawConfig::default().tile_jitter, 2);
}

#[test]
fn inpainting_views_are_the_image_and_a_mask_of_the_asked_area() {
    let img = common::pattern(3);
    let base = Pipeline::preset("mae", Sizes::small(32)).unwrap();
    for (kind, area) in [
        (MaskKind::Central, 0.25),
        (MaskKind::RandomBlocks, 0.2),
        (MaskKind::RandomRegion, 0.3),
    ] {
        let views = InpaintingConfig {
            mask: kind,
            area,
            ..InpaintingConfig::default()
        }
        .augment(base.clone())
        .views(&img, &mut sample_rng(0, 0, 1));
        assert_eq!(views.len(), 2);
        let m = &views[1].data;
        assert!(m.iter().all(|&v| v == 0.0 || v == 1.0));
        let covered = m.iter().sum::<f32>() / m.len() as f32;
        assert!(
            (covered - area).abs() < 0.06,
            "{kind:?}: {covered} of the image hidden, asked {area}"
        );
        // The mask is the same on the three channels.
        let plane = m.len() / 3;
        assert_eq!(m[..plane], m[plane..2 * plane]);
    }
}

#[test]
fn masked_mse_ignores_visible_pixels() {
    let dev = Device::flex();
    let t = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [1, 1, 2, 2]), &dev);
    let x = t(vec![1.0, 2.0, 3.0, 4.0]);
    let mask = t(vec![1.0, 0.0, 1.0, 0.0]);
    // Hidden pixels 0 and 2: ((1 − 0)² + (3 − 1)²) / 2 = 2.5.
    let a: f32 = masked_mse(x.clone(), t(vec![0.0, 9.0, 1.0, -7.0]), mask.clone()).into_scalar();
    assert!((a - 2.5).abs() < 1e-6, "{a}");
    let b: f32 = masked_mse(x, t(vec![0.0, 100.0, 1.0, 50.0]), mask).into_scalar();
    assert_eq!(a, b);
}

#[test]
fn overlap_band_weighs_the_visible_ring_around_the_hole() {
    // A 2×2 hole in a 6×6 image, a 1-px band: the 4×4 ring around it weighs 10, as the released
    // code's wtl2Matrix (overlapL2Weight 10 on the band, 1 inside).
    let dev = Device::flex();
    let mut m = vec![0.0f32; 36];
    for (y, x) in [(2, 2), (2, 3), (3, 2), (3, 3)] {
        m[y * 6 + x] = 1.0;
    }
    let mask = Tensor::<4>::from_data(TensorData::new(m, [1, 1, 6, 6]), &dev);
    let w = values(overlap_weights(mask.clone(), 1, 10.0));
    for y in 0..6 {
        for x in 0..6 {
            let want = match (y, x) {
                (2..=3, 2..=3) => 1.0,
                (1..=4, 1..=4) => 10.0,
                _ => 0.0,
            };
            assert_eq!(w[y * 6 + x], want, "weight at ({y}, {x})");
        }
    }
    assert_eq!(
        values(overlap_weights(mask.clone(), 0, 10.0)),
        values(mask.clone())
    );
    // An overlap of the image side reaches every visible pixel (train_random.lua's weights).
    let whole = values(overlap_weights(mask.clone(), 6, 10.0));
    let m = values(mask.clone());
    for (w, m) in whole.iter().zip(&m) {
        assert_eq!(*w, if *m == 1.0 { 1.0 } else { 10.0 });
    }
    // L_rec = Σ W (x − y)² / #{W > 0}: an error of 1 on every pixel gives (4 + 12·10) / 16.
    let zeros = Tensor::<4>::zeros([1, 1, 6, 6], &dev);
    let rec: f32 = masked_mse(
        zeros.clone(),
        zeros.add_scalar(1.0),
        overlap_weights(mask, 1, 10.0),
    )
    .into_scalar();
    assert!((rec - 124.0 / 16.0).abs() < 1e-6, "{rec}");
}

fn batch(config: &InpaintingConfig, n: usize, dev: &Device) -> [Tensor<4>; 2] {
    let aug = config.augment(Pipeline::preset("mae", Sizes::small(32)).unwrap());
    let views: Vec<Vec<View>> = (0..n)
        .map(|i| aug.views(&common::pattern(i as u32), &mut sample_rng(0, 0, i as u64)))
        .collect();
    [0, 1].map(|v| {
        let data: Vec<f32> = views.iter().flat_map(|s| s[v].data.clone()).collect();
        Tensor::<4>::from_data(TensorData::new(data, [n, 3, 32, 32]), dev)
    })
}

/// The parameter count of every parameter whose path starts with `prefix`.
fn sizes(m: &impl Module, prefix: &str) -> Vec<(String, usize)> {
    common::params_by_path(m, None)
        .into_iter()
        .filter(|(p, _, _)| p.starts_with(prefix) && !p.contains("running_"))
        .map(|(p, v, _)| (p, v.len()))
        .collect()
}

#[test]
fn decoder_starts_from_the_spatial_map_through_each_bottleneck() {
    let dev = Device::flex().autodiff();
    let vit = BackboneConfig::Vit(VitConfig::preset("tiny", 32, 4).unwrap());
    // ResNet (64 channels on a 4×4 map at 32 px) and ViT-Tiny/4 (192 on 8×8).
    for (model, c, g) in [(model(), 64, 4), (vit, 192, 8)] {
        assert_eq!(model.feature_grid(32), g);
        for bottleneck in [
            Bottleneck::Conv,
            Bottleneck::ChannelWise,
            Bottleneck::Pooled,
        ] {
            let config = InpaintingConfig {
                width: 8,
                bottleneck_layer: bottleneck,
                bottleneck_dim: 40,
                ..InpaintingConfig::default()
            };
            let m = init_seeded(&dev, 0, || config.init(&model, 32, &dev));
            let [x, mask] = batch(&config, 2, &dev);
            assert_eq!(m.paint(x, mask).dims(), [2, 3, 32, 32], "{bottleneck:?}");
            let first = sizes(&m, "decoder.start_layer");
            let expected: Vec<usize> = match bottleneck {
                // The released code: the whole map to a 40-d code (weights without bias, its
                // BN's γ and β), then to the 4·8-channel 4×4 start (no bias).
                Bottleneck::Conv => vec![c * g * g * 40, 40, 40, 40 * 32 * 16],
                // The paper: one g²×g² layer per channel, then a 1×1 conv to the start width
                // (8 << ups−1 channels: 32 from 4×4, 16 from 8×8).
                Bottleneck::ChannelWise => {
                    let start = if g == 4 { 32 } else { 16 };
                    vec![c * g.pow(4), c * g * g, c * start, start]
                }
                Bottleneck::Pooled => vec![c * 32 * 16],
            };
            let got: Vec<usize> = first.iter().map(|(_, n)| *n).collect();
            assert_eq!(got, expected, "{bottleneck:?}: {first:?}");
        }
    }
}

#[test]
fn channel_wise_bottleneck_needs_a_power_of_two_upscale() {
    let vit = BackboneConfig::Vit(VitConfig::preset("tiny", 48, 6).unwrap());
    let config = InpaintingConfig {
        bottleneck_layer: Bottleneck::ChannelWise,
        ..InpaintingConfig::default()
    };
    let feed = selfsup::methods::Feed {
        model: &vit,
        view_sizes: vec![48],
        size: 48,
        batch: 8,
        world: 1,
    };
    let err = config.check(&feed).unwrap_err().to_string();
    assert!(
        err.contains("method.bottleneck_layer") && err.contains("48"),
        "{err}"
    );
    let conv = InpaintingConfig::default();
    assert!(conv.check(&feed).is_ok());
}

#[test]
fn discriminator_judges_the_raw_output_by_default_at_a_tenth_of_the_rate() {
    let dev = Device::flex().autodiff();
    // (adversary, overlap): the raw painting where L_rec reaches (the whole image with an
    // overlap of the image side; hole and 4-px band by default), or the completion.
    for (adversary, overlap) in [
        (Adversary::Output, 32),
        (Adversary::Output, 4),
        (Adversary::Completed, 4),
    ] {
        let config = InpaintingConfig {
            width: 8,
            bottleneck_dim: 32,
            adversary,
            overlap,
            ..InpaintingConfig::default()
        };
        let m = init_seeded(&dev, 0, || config.init(&model(), 32, &dev));
        let [x, mask] = batch(&config, 2, &dev);
        let kept = m
            .loss(&[x.clone(), mask.clone()], &progress())
            .keep
            .unwrap();
        let judged = kept
            .narrow(1, 3 * 32 * 32, 3 * 32 * 32)
            .reshape([2, 3, 32, 32]);
        let painted = m.paint(x.clone(), mask.clone());
        let region = match adversary {
            Adversary::Output => overlap_weights(mask, overlap, 10.0)
                .greater_elem(0.0)
                .float(),
            Adversary::Completed => mask,
        };
        let want = painted * region.clone() + x * region.clone().neg().add_scalar(1.0);
        let gap: f32 = (judged - want).abs().max().into_scalar();
        assert!(
            gap < 1e-5,
            "{adversary:?}, overlap {overlap}: D is shown something else ({gap})"
        );
        let share: f32 = region.mean().into_scalar();
        match (adversary, overlap) {
            (Adversary::Output, 32) => assert_eq!(share, 1.0),
            _ => assert!(share > 0.2 && share < 0.6, "{share}"),
        }
    }
    // Plain SGD: D's step scales with discriminator_lr.
    let step = |share: f64| {
        let config = InpaintingConfig {
            width: 8,
            bottleneck_dim: 32,
            discriminator_lr: share,
            ..InpaintingConfig::default()
        };
        let m = init_seeded(&dev, 0, || config.init(&model(), 32, &dev));
        let out = m.loss(&batch(&config, 2, &dev), &progress());
        let mut optim = OptimConfig {
            optimizer: OptimizerKind::Sgd,
            weight_decay: 0.0,
            momentum: 0.0,
            ..OptimConfig::default()
        }
        .init();
        let before = flat(&m, true);
        let after = flat(&m.auxiliary_step(out.keep.as_ref(), 0.5, &mut optim), true);
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| a - b)
            .collect::<Vec<f32>>()
    };
    let (full, tenth) = (step(1.0), step(0.1));
    let ratio: f32 =
        full.iter().map(|d| d.abs()).sum::<f32>() / tenth.iter().map(|d| d.abs()).sum::<f32>();
    assert!(
        (ratio - 10.0).abs() < 1e-2,
        "D's steps differ by {ratio}×, not 10×"
    );
}

/// All parameter values of the discriminator, or of everything else (buffers aside).
fn flat<M: Module>(m: &M, discriminator: bool) -> Vec<f32> {
    common::params_by_path(m, None)
        .into_iter()
        .filter(|(p, _, _)| {
            p.starts_with("discriminator") == discriminator && !p.contains("running_")
        })
        .flat_map(|(_, v, _)| v)
        .collect()
}

#[test]
fn generator_and_discriminator_get_only_their_own_gradients() {
    let dev = Device::flex().autodiff();
    let config = InpaintingConfig {
        width: 8,
        ..InpaintingConfig::default()
    };
    let m = init_seeded(&dev, 0, || config.init(&model(), 32, &dev));
    let base = Pipeline::preset("mae", Sizes::small(32)).unwrap();
    let aug = config.augment(base);
    let views: Vec<Vec<View>> = (0..4)
        .map(|i| aug.views(&common::pattern(i), &mut sample_rng(0, 0, i as u64)))
        .collect();
    let stack = |v: usize| {
        let data: Vec<f32> = views.iter().flat_map(|s| s[v].data.clone()).collect();
        Tensor::<4>::from_data(TensorData::new(data, [4, 3, 32, 32]), &dev)
    };
    let out = m.loss(&[stack(0), stack(1)], &progress());
    let grads = GradientsParams::from_grads(out.loss.backward(), &m);
    let seen: Vec<(String, bool)> = common::params_by_path(&m, Some(&grads))
        .into_iter()
        .filter(|(p, _, _)| !p.contains("running_"))
        .map(|(p, _, has)| (p, has))
        .collect();
    assert!(seen.iter().any(|(p, _)| p.starts_with("discriminator")));
    for (path, has) in &seen {
        assert_eq!(
            *has,
            !path.starts_with("discriminator"),
            "G's loss and {path}"
        );
    }

    // D's step moves D and nothing else.
    let (d_before, g_before) = (flat(&m, true), flat(&m, false));
    let mut optim = OptimConfig {
        optimizer: OptimizerKind::Adamw,
        weight_decay: 0.0,
        momentum: 0.9,
        betas: [0.5, 0.999],
        eta: 0.001,
        ..OptimConfig::default()
    }
    .init();
    let m = m.auxiliary_step(out.keep.as_ref(), 1e-3, &mut optim);
    assert_ne!(flat(&m, true), d_before);
    assert_eq!(flat(&m, false), g_before);
}

#[test]
fn rotation_is_learned_on_real_images() {
    use selfsup::data::Loader;
    use selfsup::train::{TrainConfig, Trainer};
    let split = common::cifar10_train(256);
    let config = RotationConfig {};
    let loader = Loader::new(
        split,
        config.augment(Pipeline::preset("mae", Sizes::small(32)).unwrap()),
        64,
        0,
    )
    .unwrap();
    let train: TrainConfig = toml::from_str(
        "epochs = 4\nbatch_size = 64\noptimizer = \"adamw\"\nweight_decay = 1e-4\nbase_lr = 0.003\nlr_scaling = \"none\"\n",
    )
    .unwrap();
    let dev = Device::flex().autodiff();
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(train, dir.path(), dev.clone());
    trainer.progress = false;
    let (_, report) = trainer
        .run(
            init_seeded(&dev, 0, || config.init(&model(), &dev)),
            &loader,
        )
        .unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let acc: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .map(|v| v["pretext_acc"].as_f64().unwrap())
        .collect();
    let losses = &report.state.epoch_losses;
    assert!(losses[3] < losses[0], "losses {losses:?}");
    // Chance is 25%: well above it and rising (the kernels' rounding, and so the figure, differs
    // between CPUs).
    assert!(
        acc[3] > 0.35 && acc[3] > acc[0] + 0.08,
        "pretext accuracy per epoch {acc:?}"
    );
}

#[test]
fn context_encoder_decoder_and_discriminator_start_as_dcgan() {
    // train.lua's weights_init: convolution weights N(0, 0.02), BN γ ~ N(1, 0.02), β = 0, and
    // every convolution's bias zeroed before each step (so: none).
    use selfsup::models::{Bottleneck, ContextDecoderConfig, DiscriminatorConfig};
    let dev = Device::flex();
    let decoder = ContextDecoderConfig {
        bottleneck: Bottleneck::Conv,
        channels: 64,
        grid: 4,
        bottleneck_dim: 400,
        width: 32,
        size: 32,
    }
    .init(&dev);
    let discriminator = DiscriminatorConfig {
        width: 32,
        size: 32,
    }
    .init(&dev);
    let stats = |v: &[f32]| {
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        (mean, var.sqrt())
    };
    let mut params = common::params_by_path(&decoder, None);
    params.extend(common::params_by_path(&discriminator, None));
    let (mut weights, mut gammas) = (0, 0);
    for (path, values, _) in &params {
        let (mean, sd) = stats(values);
        if path.ends_with("gamma") {
            gammas += 1;
            assert!(
                (mean - 1.0).abs() < 0.02 && (sd - 0.02).abs() < 0.01,
                "{path}: {mean} {sd}"
            );
        } else if path.ends_with("beta") {
            assert!(values.iter().all(|&b| b == 0.0), "{path}");
        } else if path.ends_with("weight") {
            weights += 1;
            assert!(
                mean.abs() < 0.01 && (sd - 0.02).abs() < 0.004,
                "{path}: {mean} {sd}"
            );
        } else {
            assert!(
                !path.ends_with("bias"),
                "{path}: train.lua's convolutions have no bias"
            );
        }
    }
    // Decoder: bottleneck, fc, 3 up-convolutions; discriminator: 3 convolutions and the logit.
    assert_eq!(
        (weights, gammas),
        (9, 4),
        "{:?}",
        params.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
}

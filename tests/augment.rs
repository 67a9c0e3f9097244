//! Augmentation: properties that must hold for any input, and hand-computed values.

mod common;

use std::sync::Arc;

use image::{Rgb, RgbImage};
use proptest::prelude::*;
use rand::SeedableRng;
use selfsup::augment::{ops, sample_rng, Jitter, Pipeline, Sizes, ViewSpec, PRESETS};
use selfsup::config::{AugmentConfig, Recipe};
use selfsup::data::{Loader, Split};

fn random_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    RgbImage::from_fn(w, h, |_, _| {
        Rgb([
            rand::Rng::random(&mut rng),
            rand::Rng::random(&mut rng),
            rand::Rng::random(&mut rng),
        ])
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn crops_lie_inside_the_image(w in 1u32..300, h in 1u32..300, lo in 0.01f32..1.0, span in 0.0f32..1.0, seed: u64) {
        let scale = [lo, (lo + span).min(1.0)];
        let c = ops::random_resized_crop_box(w, h, scale, [3.0 / 4.0, 4.0 / 3.0], &mut sample_rng(seed, 0, 0));
        prop_assert!(c.w > 0 && c.h > 0);
        prop_assert!(c.x + c.w <= w && c.y + c.h <= h);
    }

    #[test]
    fn views_have_the_asked_size(w in 8u32..80, h in 8u32..80, size in 4u32..48, seed: u64) {
        let spec = ViewSpec { size, ..Pipeline::preset("simclr", Sizes::small(size)).unwrap().views[0].clone() };
        let v = spec.view(&random_image(w, h, seed), &mut sample_rng(seed, 1, 2));
        prop_assert_eq!(v.dimensions(), (size, size));
    }

    #[test]
    fn flip_twice_is_identity(w in 1u32..40, h in 1u32..40, seed: u64) {
        let img = random_image(w, h, seed);
        let mut f = img.clone();
        ops::flip_horizontal(&mut f);
        ops::flip_horizontal(&mut f);
        prop_assert_eq!(f, img);
    }

    #[test]
    fn zero_strength_jitter_is_identity(w in 1u32..40, h in 1u32..40, seed: u64) {
        let img = random_image(w, h, seed);
        let mut j = img.clone();
        Jitter { p: 1.0, ..Jitter::default() }.apply(&mut j, &mut sample_rng(seed, 0, 0));
        prop_assert_eq!(&j, &img);
        // The operations themselves at their neutral factors.
        ops::adjust_brightness(&mut j, 1.0);
        ops::adjust_contrast(&mut j, 1.0);
        ops::adjust_saturation(&mut j, 1.0);
        ops::adjust_hue(&mut j, 0.0);
        prop_assert_eq!(&j, &img);
    }

    #[test]
    fn grayscale_channels_are_equal(w in 1u32..40, h in 1u32..40, seed: u64) {
        let mut img = random_image(w, h, seed);
        ops::grayscale(&mut img);
        prop_assert!(img.pixels().all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
    }

    #[test]
    fn four_quarter_turns_are_identity(w in 1u32..30, h in 1u32..30, seed: u64) {
        let img = random_image(w, h, seed);
        let r = ops::rotate90(&ops::rotate90(&ops::rotate90(&ops::rotate90(&img, 1), 1), 1), 1);
        prop_assert_eq!(r, img);
    }
}

#[test]
fn crop_fallback_is_torchvisions_central_crop() {
    // A 100×10 strip cannot hold a square of 90% of its area: after ten tries torchvision
    // takes the central crop with the aspect clamped to the ratio bounds: 10×10 in the middle.
    let c = ops::random_resized_crop_box(100, 10, [0.9, 1.0], [1.0, 1.0], &mut sample_rng(0, 0, 0));
    assert_eq!(
        c,
        ops::Crop {
            x: 45,
            y: 0,
            w: 10,
            h: 10
        }
    );
}

#[test]
fn colour_operations_match_hand_computed_values() {
    let px = |r, g, b| RgbImage::from_pixel(1, 1, Rgb([r, g, b]));
    let mut img = px(100, 200, 40);
    ops::adjust_brightness(&mut img, 0.5);
    assert_eq!(img.get_pixel(0, 0).0, [50, 100, 20]);

    // Saturation 0 gives the luma: (299·100 + 587·200 + 114·40) / 1000 = 151.86 -> 152.
    let mut img = px(100, 200, 40);
    ops::adjust_saturation(&mut img, 0.0);
    assert_eq!(img.get_pixel(0, 0).0, [152, 152, 152]);

    // Contrast 0.5 blends with the mean luma of the image: pixels 0 and 200 -> mean 100.
    let mut img = RgbImage::from_fn(2, 1, |x, _| {
        if x == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([200, 200, 200])
        }
    });
    ops::adjust_contrast(&mut img, 0.5);
    assert_eq!(
        (img.get_pixel(0, 0).0, img.get_pixel(1, 0).0),
        ([50; 3], [150; 3])
    );

    // A third of a turn of hue takes red to green.
    let mut img = px(255, 0, 0);
    ops::adjust_hue(&mut img, 1.0 / 3.0);
    assert_eq!(img.get_pixel(0, 0).0, [0, 255, 0]);

    let mut img = px(127, 128, 255);
    ops::solarize(&mut img, 128);
    assert_eq!(img.get_pixel(0, 0).0, [127, 127, 0]);
}

#[test]
fn blur_keeps_flat_images_and_smooths_noise() {
    let mut flat = RgbImage::from_pixel(16, 16, Rgb([90, 10, 200]));
    ops::gaussian_blur(&mut flat, 5, 1.5);
    assert!(flat.pixels().all(|p| p.0 == [90, 10, 200]));
    let noise = random_image(32, 32, 3);
    let mut blurred = noise.clone();
    ops::gaussian_blur(&mut blurred, 5, 1.5);
    assert!(variance(&blurred) < variance(&noise) / 4.0);
}

/// The variance of an image's bytes, over all its channels.
fn variance(img: &RgbImage) -> f32 {
    let v: Vec<f32> = img.iter().map(|&x| x as f32).collect();
    let m = v.iter().sum::<f32>() / v.len() as f32;
    v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / v.len() as f32
}

#[test]
fn quarter_turn_is_counter_clockwise() {
    let img = RgbImage::from_fn(2, 1, |x, _| {
        if x == 1 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 0])
        }
    });
    // The right end of a horizontal bar goes to the top after 90° counter-clockwise.
    let r = ops::rotate90(&img, 1);
    assert_eq!(r.dimensions(), (1, 2));
    assert_eq!(r.get_pixel(0, 0).0, [255, 0, 0]);
}

#[test]
fn jigsaw_tiles_come_from_their_cells() {
    // Each cell of a 3×3 grid painted its own colour: every tile must be of its cell's colour.
    let img = RgbImage::from_fn(96, 96, |x, y| Rgb([(x / 32 * 3 + y / 32) as u8 * 20, 0, 0]));
    let tiles = ops::jigsaw_tiles(&img, 3, 27, &mut sample_rng(1, 0, 0));
    assert_eq!(tiles.len(), 9);
    for (i, t) in tiles.iter().enumerate() {
        let (gx, gy) = (i as u32 % 3, i as u32 / 3);
        assert_eq!(t.dimensions(), (27, 27));
        assert!(
            t.pixels().all(|p| p.0[0] == (gx * 3 + gy) as u8 * 20),
            "tile {i}"
        );
    }
}

#[test]
fn inpainting_masks_cover_the_asked_area() {
    for kind in [
        ops::MaskKind::Central,
        ops::MaskKind::RandomBlocks,
        ops::MaskKind::RandomRegion,
    ] {
        for seed in 0..5 {
            let m = ops::inpainting_mask(kind, 32, 32, 0.25, &mut sample_rng(seed, 0, 0));
            let frac = m.iter().filter(|&&b| b).count() as f32 / m.len() as f32;
            assert!((0.24..=0.36).contains(&frac), "{kind:?}: {frac}");
        }
    }
    let central = ops::inpainting_mask(
        ops::MaskKind::Central,
        32,
        32,
        0.25,
        &mut sample_rng(0, 0, 0),
    );
    assert!(
        central[16 * 32 + 16] && !central[0],
        "a central square hides the middle only"
    );
    let region = ops::inpainting_mask(
        ops::MaskKind::RandomRegion,
        32,
        32,
        0.25,
        &mut sample_rng(0, 0, 0),
    );
    assert_eq!(region.iter().filter(|&&b| b).count(), 256);
}

#[test]
fn presets_are_valid_and_unknown_names_are_refused() {
    for name in PRESETS {
        let p = Pipeline::preset(name, Sizes::small(32)).unwrap();
        p.check().unwrap();
    }
    let dino = Pipeline::preset(
        "dino",
        Sizes {
            size: 224,
            local_size: 96,
            local_crops: 8,
        },
    )
    .unwrap();
    assert_eq!(dino.num_views(), 10);
    let err = Pipeline::preset("simclr2", Sizes::small(32))
        .unwrap_err()
        .to_string();
    assert!(err.contains("simclr2") && err.contains("moco_v2"), "{err}");
}

#[test]
fn recipe_values_are_checked_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(
        &path,
        "[augment]\npipeline = \"moco_v2\"\nsize = 32\n[[augment.views]]\ncount = 2\nflip = 1.5\n",
    )
    .unwrap();
    let err = format!("{:#}", Recipe::load(&path).unwrap_err());
    assert!(
        err.contains("augment.views[0].flip") && err.contains("1.5"),
        "{err}"
    );
    std::fs::write(&path, "[augment]\npipline = \"simclr\"\n").unwrap();
    let err = format!("{:#}", Recipe::load(&path).unwrap_err());
    assert!(err.contains("pipline"), "{err}");
    // A whole pipeline spelled out in TOML replaces the preset's views.
    std::fs::write(&path, "[augment]\nsize = 16\n[[augment.views]]\ncount = 2\nsize = 16\nsolarize = 1.0\n[augment.views.jitter]\np = 0.5\nhue = 0.1\n").unwrap();
    let p = Recipe::load(&path).unwrap().augment.build().unwrap();
    assert_eq!(p.num_views(), 2);
    assert_eq!(p.views[0].jitter.hue, 0.1);
    let _ = AugmentConfig::default().build().unwrap();
}

fn loader(images: usize, batch: usize) -> Loader {
    let imgs: Vec<RgbImage> = (0..images as u32).map(common::pattern).collect();
    let labels: Vec<u32> = (0..images as u32).map(|i| i % 10).collect();
    let split = Split::new("train", imgs, Some(labels));
    let p = Pipeline::preset("dino", Sizes::small(32)).unwrap();
    Loader::new(split, Arc::new(p), batch, 7).unwrap()
}

#[test]
fn same_seed_gives_same_views_on_one_and_two_threads() {
    let l = loader(24, 8);
    let on = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| l.batch(3, 1))
    };
    let (a, b) = (on(1), on(2));
    assert_eq!(a.samples, b.samples);
    for (va, vb) in a.views.iter().zip(&b.views) {
        assert_eq!(va, vb);
    }
    assert_eq!(a.views.len(), 8, "dino: 2 global + 6 local views");
    assert_eq!(a.views[0].shape, [8, 3, 32, 32]);
    assert_eq!(a.views[2].shape, [8, 3, 16, 16]);
}

#[test]
fn loader_shuffles_per_epoch_and_resumes_mid_epoch() {
    let l = loader(30, 8);
    assert_eq!(l.batches_per_epoch(), 3, "the last 6 images are dropped");
    let mut seen: Vec<usize> = l.order(0);
    seen.sort();
    assert_eq!(seen, (0..30).collect::<Vec<_>>());
    assert_ne!(l.order(0), l.order(1));
    let all: Vec<_> = l.epoch(2, 0).collect();
    let resumed: Vec<_> = l.epoch(2, 1).collect();
    assert_eq!(all.len(), 3);
    assert_eq!(resumed.len(), 2);
    assert_eq!(resumed[0].samples, all[1].samples);
    assert_eq!(resumed[0].views, all[1].views);
    assert_eq!(
        all[0].labels.as_ref().unwrap()[0],
        all[0].samples[0] as u32 % 10
    );
    let seq = l.clone().sequential();
    assert_eq!(seq.batches_per_epoch(), 4);
    assert_eq!(seq.batch(0, 3).samples, vec![24, 25, 26, 27, 28, 29]);
    let big = loader(5, 8);
    let err = big.check("train.batch_size").unwrap_err().to_string();
    assert!(
        err.contains("train.batch_size = 8") && err.contains("more than the 5 images"),
        "{err}"
    );
}

#[test]
fn normalisation_is_per_channel() {
    let img = RgbImage::from_pixel(2, 1, Rgb([255, 0, 51]));
    let v = selfsup::augment::normalize(&img, [0.5, 0.5, 0.0], [0.5, 0.25, 0.2]);
    assert_eq!(v.data, vec![1.0, 1.0, -2.0, -2.0, 1.0, 1.0]);
}

#[test]
fn antialiasing_filters_only_where_the_crop_shrinks() {
    // Shrunk 4×, an antialiased bilinear averages about 8×8 pixels of noise, the plain one
    // about 2×2: the variance falls by ~64× against ~4×. Enlarged, the two are the same.
    let noise = random_image(32, 32, 5);
    let resize = |crop, side, antialias| {
        let bilinear = ops::Interpolation::Bilinear;
        ops::crop_resize_with(&noise, crop, side, side, bilinear, antialias)
    };
    let whole = ops::Crop::whole(&noise);
    let (smooth, sharp) = (
        variance(&resize(whole, 8, true)),
        variance(&resize(whole, 8, false)),
    );
    assert!(smooth * 20.0 < variance(&noise), "{smooth}");
    assert!(sharp * 8.0 > variance(&noise), "{sharp}");
    let part = ops::Crop {
        x: 3,
        y: 5,
        w: 10,
        h: 12,
    };
    assert_eq!(resize(part, 24, true), resize(part, 24, false));
}

#[test]
fn dino_and_mae_crops_resize_bicubic_simclr_bilinear() {
    // DINO's and MAE's RandomResizedCrop(..., interpolation=BICUBIC); torchvision's default
    // (bilinear) for SimCLR and MoCo.
    let interpolation = |name: &str| {
        let p = Pipeline::preset(name, Sizes::small(32)).unwrap();
        p.views.iter().map(|v| v.interpolation).collect::<Vec<_>>()
    };
    assert!(interpolation("dino")
        .iter()
        .all(|&i| i == ops::Interpolation::Bicubic));
    assert!(interpolation("mae")
        .iter()
        .all(|&i| i == ops::Interpolation::Bicubic));
    assert!(interpolation("simclr")
        .iter()
        .all(|&i| i == ops::Interpolation::Bilinear));
    // Upsampling a step edge: Catmull-Rom overshoots on both sides of it, bilinear never
    // leaves the range of its inputs.
    let step = RgbImage::from_fn(
        4,
        1,
        |x, _| if x < 2 { Rgb([50; 3]) } else { Rgb([200; 3]) },
    );
    let range = |i| {
        let up = ops::crop_resize_with(&step, ops::Crop::whole(&step), 16, 1, i, true);
        let v: Vec<u8> = up.pixels().map(|p| p.0[0]).collect();
        (*v.iter().min().unwrap(), *v.iter().max().unwrap())
    };
    assert_eq!(range(ops::Interpolation::Bilinear), (50, 200));
    let (low, high) = range(ops::Interpolation::Bicubic);
    assert!(low < 50 && high > 200, "{low}..{high}");
}

/// A 1-row image of the given grey levels (the same on the three channels).
fn grey_row(values: &[u8]) -> RgbImage {
    RgbImage::from_fn(values.len() as u32, 1, |x, _| Rgb([values[x as usize]; 3]))
}

fn reds(img: &RgbImage) -> Vec<u8> {
    img.pixels().map(|p| p.0[0]).collect()
}

#[test]
fn rand_augment_colour_operations_match_pil() {
    use selfsup::augment::randaugment::{
        apply_op, auto_contrast, equalize, posterize, solarize, Op,
    };
    // ImageOps.posterize(img, 1) keeps the top bit; solarize(img, 128) inverts from 128 up;
    // invert is 255 − v; SolarizeAdd at level 1 adds 110 below 128.
    let mut img = grey_row(&[0, 100, 127, 128, 200, 255]);
    posterize(&mut img, 1);
    assert_eq!(reds(&img), [0, 0, 0, 128, 128, 128]);
    let mut img = grey_row(&[0, 100, 127, 128, 200, 255]);
    solarize(&mut img, 128);
    assert_eq!(reds(&img), [0, 100, 127, 127, 55, 0]);
    let mut img = grey_row(&[0, 100, 200]);
    apply_op(&mut img, Op::Invert, 0.9, 1.0, [0; 3]);
    assert_eq!(reds(&img), [255, 155, 55]);
    let mut img = grey_row(&[0, 100, 127, 128, 200]);
    apply_op(&mut img, Op::SolarizeAdd, 1.0, 1.0, [0; 3]);
    assert_eq!(reds(&img), [110, 210, 237, 128, 200]);
    // Magnitude 9 (level 0.9): posterize keeps 4 − int(3.6) = 1 bit, solarize inverts from
    // 256 − int(230.4) = 26 up.
    let mut img = grey_row(&[25, 26, 200]);
    apply_op(&mut img, Op::Solarize, 0.9, 1.0, [0; 3]);
    assert_eq!(reds(&img), [25, 229, 55]);
    // autocontrast stretches 50..150 to 0..255: int((v − 50) · 2.55).
    let mut img = grey_row(&[50, 100, 150]);
    auto_contrast(&mut img);
    assert_eq!(reds(&img), [0, 127, 255]);
    // equalize: 4 values of counts 1, 1, 1, 1 → step (4 − 1) / 255 = 0: unchanged (PIL's rule);
    // 512 pixels half 10 and half 20 → step 1, lut[10] = 0, lut[20] = (0 + 256) / 1 capped.
    let mut img = grey_row(&[1, 2, 3, 4]);
    equalize(&mut img);
    assert_eq!(reds(&img), [1, 2, 3, 4]);
    let mut values = vec![10u8; 256];
    values.extend(vec![20u8; 256]);
    let mut img = grey_row(&values);
    equalize(&mut img);
    let r = reds(&img);
    assert_eq!((r[0], r[300]), (0, 255));
    // Brightness at level 0.9, sign −1: factor max(0.1, 1 − 0.81) = 0.19, a blend with black.
    let mut img = grey_row(&[100, 200]);
    apply_op(&mut img, Op::Brightness, 0.9, -1.0, [0; 3]);
    assert_eq!(reds(&img), [19, 38]);
}

#[test]
fn rand_augment_geometry_matches_pil_affine() {
    use selfsup::augment::randaugment::{affine, apply_op, Op, RandAugment};
    let img = random_image(20, 12, 3);
    // The identity transform and a whole-pixel shift resample exactly (bicubic at integer
    // offsets); what leaves the image is the fill colour.
    assert_eq!(affine(&img, [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1, 2, 3]), img);
    let shifted = affine(&img, [1.0, 0.0, 3.0, 0.0, 1.0, 0.0], [1, 2, 3]);
    for y in 0..12 {
        for x in 0..20 {
            let want = if x + 3 < 20 {
                *img.get_pixel(x + 3, y)
            } else {
                Rgb([1, 2, 3])
            };
            assert_eq!(*shifted.get_pixel(x, y), want, "({x}, {y})");
        }
    }
    // TranslateXRel at level 1: 0.45 of the width (9 of 20 px), in either direction.
    let mut moved = img.clone();
    apply_op(&mut moved, Op::TranslateX, 1.0, 1.0, [0; 3]);
    assert_eq!(*moved.get_pixel(0, 5), *img.get_pixel(9, 5));
    assert_eq!(*moved.get_pixel(11, 5), Rgb([0; 3]));
    // PIL's rotate(90) of a square turns it counter-clockwise: the top-right corner goes to
    // the top-left.
    let square = random_image(9, 9, 4);
    let mut turned = square.clone();
    apply_op(&mut turned, Op::Rotate, 3.0, 1.0, [0; 3]);
    assert_eq!(*turned.get_pixel(0, 0), *square.get_pixel(8, 0));
    assert_eq!(*turned.get_pixel(4, 4), *square.get_pixel(4, 4));
    // Two operations at probability ½ each: about a quarter of the images come out unchanged.
    let ra = RandAugment {
        n: 2,
        ..RandAugment::default()
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let unchanged = (0..400)
        .filter(|_| {
            let mut v = img.clone();
            ra.apply(&mut v, &mut rng);
            v == img
        })
        .count();
    assert!(
        (70..150).contains(&unchanged),
        "{unchanged} of 400 unchanged"
    );
}

//! MAE: masking, order restoration, patchify, the loss on masked patches only, and an encoder
//! that sees the visible patches alone.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::methods::mae::{
    masked_patch_loss, patchify, random_masking, sincos_2d, unpatchify, Masking,
};
use selfsup::methods::{Feed, MaeConfig};
use selfsup::models::{init_seeded, BackboneConfig};

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn random(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let v = (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

#[test]
fn masking_keeps_round_one_minus_r_of_the_patches() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    for (l, r, kept) in [(64, 0.75, 16), (10, 0.6, 4), (49, 0.75, 12), (16, 0.0, 16)] {
        let m = random_masking(5, l, r, &mut rng);
        for i in 0..5 {
            assert_eq!(m.keep[i].len(), kept, "L={l} r={r}");
            let mut unique = m.keep[i].clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), kept);
            assert_eq!(m.mask[i].iter().sum::<f32>() as usize, l - kept);
            for &k in &m.keep[i] {
                assert_eq!(m.mask[i][k], 0.0, "kept patch {k} marked masked");
            }
        }
        // Samples draw their own masks.
        assert!(r == 0.0 || m.keep[0] != m.keep[1]);
    }
}

#[test]
fn restoring_the_order_gives_back_the_sequence() {
    let dev = Device::flex();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let Masking { keep, restore, .. } = random_masking(3, 16, 0.75, &mut rng);
    // The shuffled sequence: the kept patches, then the masked ones (in shuffle order).
    let shuffle: Vec<Vec<usize>> = restore
        .iter()
        .map(|back| {
            let mut s = vec![0; back.len()];
            for (patch, &pos) in back.iter().enumerate() {
                s[pos] = patch;
            }
            s
        })
        .collect();
    for (s, k) in shuffle.iter().zip(&keep) {
        assert_eq!(&s[..k.len()], &k[..]);
    }
    let tokens: Vec<f32> = (0..3 * 16).map(|i| (i % 16) as f32).collect();
    let tokens = Tensor::<2>::from_data(TensorData::new(tokens, [3, 16]), &dev);
    let idx = |rows: &Vec<Vec<usize>>| {
        let flat: Vec<i64> = rows.iter().flatten().map(|&i| i as i64).collect();
        Tensor::<2, Int>::from_data(TensorData::new(flat, [3, 16]), &dev)
    };
    let shuffled = tokens.clone().gather(1, idx(&shuffle));
    let restored = shuffled.gather(1, idx(&restore));
    assert_eq!(values(restored), values(tokens));
}

#[test]
fn patchify_and_unpatchify_round_trip() {
    let dev = Device::flex();
    let x = random([2, 3, 8, 8], 2, &dev);
    let p = patchify(x.clone(), 4);
    assert_eq!(p.dims(), [2, 4, 48]);
    assert_eq!(values(unpatchify(p.clone(), 4)), values(x.clone()));
    // Patch 1 is the top-right 4x4 block; its entries run over (row, column, channel).
    let xs = values(x);
    let ps = values(p);
    let at = |c: usize, y: usize, xx: usize| xs[c * 64 + y * 8 + xx];
    for (k, v) in ps[48..96].iter().enumerate() {
        let (y, x, c) = (k / 12, (k / 3) % 4, k % 3);
        assert_eq!(*v, at(c, y, 4 + x));
    }
}

#[test]
fn loss_ignores_visible_patches() {
    let dev = Device::flex();
    let target = random([1, 1, 4, 6], 3, &dev).reshape([1, 4, 6]);
    let pred = random([1, 1, 4, 6], 4, &dev).reshape([1, 4, 6]);
    let mask = Tensor::<2>::from_data(TensorData::new(vec![1.0, 0.0, 1.0, 0.0], [1, 4]), &dev);
    let a: f32 = masked_patch_loss(pred.clone(), target.clone(), mask.clone()).into_scalar();
    // By hand: the mean over the two masked patches of each patch's mean squared error.
    let (t, p) = (values(target.clone()), values(pred.clone()));
    let mse = |i: usize| {
        (0..6)
            .map(|j| (p[i * 6 + j] - t[i * 6 + j]).powi(2))
            .sum::<f32>()
            / 6.0
    };
    assert!((a - (mse(0) + mse(2)) / 2.0).abs() < 1e-5);
    // Changing the prediction of visible patches 1 and 3 changes nothing.
    let keep = Tensor::<3>::from_data(TensorData::new(vec![1.0, 0.0, 1.0, 0.0], [1, 4, 1]), &dev);
    let moved = pred.clone() * keep.clone() + (keep.neg().add_scalar(1.0)) * 100.0;
    let b: f32 = masked_patch_loss(moved, target, mask).into_scalar();
    assert_eq!(a, b);
}

#[test]
fn encoder_sees_only_the_visible_patches() {
    let dev = Device::flex();
    let model = common::tiny_vit();
    let config = MaeConfig {
        decoder_dim: 16,
        decoder_depth: 1,
        decoder_heads: 2,
        ..MaeConfig::default()
    };
    let feed = |model| Feed {
        model,
        view_sizes: vec![16],
        size: 16,
        batch: 2,
        world: 1,
    };
    config.check(&feed(&model)).unwrap();
    let mae = init_seeded(&dev, 0, || config.init(&model, &dev));
    let masking = random_masking(2, 16, 0.75, &mut rand_chacha::ChaCha8Rng::seed_from_u64(5));
    let x = random([2, 3, 16, 16], 6, &dev);
    let encoded = mae.encode(x.clone(), &masking);
    assert_eq!(encoded.dims(), [2, 1 + 4, 24]);
    // Scribbling over every masked patch leaves the encoding unchanged.
    // Pixel (y, x) of sample i lies in patch (y/4)·4 + x/4.
    let pixel_mask: Vec<f32> = masking
        .mask
        .iter()
        .flat_map(|m| (0..3 * 16 * 16).map(|k| m[((k / 16) % 16 / 4) * 4 + (k % 16) / 4]))
        .collect();
    let pixel_mask = Tensor::<4>::from_data(TensorData::new(pixel_mask, [2, 3, 16, 16]), &dev);
    let scribbled = x.clone() + pixel_mask * random([2, 3, 16, 16], 7, &dev).mul_scalar(5.0);
    let again = mae.encode(scribbled.clone(), &masking);
    assert_eq!(values(encoded), values(again));
    // The decoder predicts every patch.
    let (pred, target) = mae.predict(scribbled, &masking);
    assert_eq!(pred.dims(), [2, 16, 48]);
    assert_eq!(target.dims(), [2, 16, 48]);
    // Nothing masked: every patch is encoded and none comes from the mask token.
    let none = random_masking(2, 16, 0.0, &mut rand_chacha::ChaCha8Rng::seed_from_u64(6));
    assert_eq!(mae.encode(x.clone(), &none).dims(), [2, 17, 24]);
    assert_eq!(mae.predict(x, &none).0.dims(), [2, 16, 48]);
    // A bad pairing is refused with the field named.
    let resnet = BackboneConfig::default();
    assert!(config
        .check(&feed(&resnet))
        .unwrap_err()
        .to_string()
        .contains("vit"));
}

#[test]
fn sincos_embedding_has_a_zero_class_row_and_distinct_positions() {
    let e = sincos_2d(16, 4);
    assert_eq!(e.len(), 17 * 16);
    assert!(e[..16].iter().all(|&v| v == 0.0));
    assert!(e.iter().all(|v| v.abs() <= 1.0));
    let rows: Vec<&[f32]> = e.chunks(16).skip(1).collect();
    for i in 0..rows.len() {
        for j in i + 1..rows.len() {
            assert_ne!(rows[i], rows[j], "positions {i} and {j} share an embedding");
        }
    }
}

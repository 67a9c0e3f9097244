//! What masking saves: one training step (forward + backward) of the MAE encoder alone, and of
//! the whole MAE (encoder + decoder + loss), at mask ratio 0.75 and 0.0, on ViT-Tiny (192-d,
//! 12 blocks, patch 4, 64 tokens at 32 px), batch 64. Ratios are measured interleaved, so a
//! busy machine slows both alike.
//!
//! Run: `cargo bench --profile dev --bench mae_step`.

use std::time::Instant;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use rand::SeedableRng;
use selfsup::methods::mae::{masked_patch_loss, random_masking, Masking};
use selfsup::methods::MaeConfig;
use selfsup::models::{init_seeded, BackboneConfig, VitConfig};

fn main() {
    let (batch, rounds) = (64usize, 4usize);
    let dev = Device::flex().autodiff();
    let model = BackboneConfig::Vit(VitConfig::preset("tiny", 32, 4).unwrap());
    let config = MaeConfig {
        decoder_dim: 128,
        decoder_depth: 2,
        decoder_heads: 4,
        ..MaeConfig::default()
    };
    let mae = init_seeded(&dev, 0, || config.init(&model, &dev));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let masks =
        |ratio: f64, rng: &mut rand_chacha::ChaCha8Rng| random_masking(batch, 64, ratio, rng);
    let encoder_step = |x: Tensor<4>, m: &Masking| {
        let _ = mae.encode(x, m).mean().backward();
    };
    let full_step = |x: Tensor<4>, m: &Masking| {
        let (pred, target) = mae.predict(x, m);
        let mask = Tensor::<2>::from_data(TensorData::new(m.mask.concat(), [batch, 64]), &dev);
        let _ = masked_patch_loss(pred, target, mask).backward();
    };
    let mut time = |f: &dyn Fn(Tensor<4>, &Masking), ratio: f64| {
        let x = Tensor::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev);
        let m = masks(ratio, &mut rng);
        let start = Instant::now();
        f(x, &m);
        let _ = dev.sync();
        start.elapsed().as_secs_f64()
    };
    // Warm up both shapes, then alternate.
    for r in [0.75, 0.0] {
        time(&encoder_step, r);
        time(&full_step, r);
    }
    let mut t = [[0.0f64; 2]; 2];
    for _ in 0..rounds {
        for (i, r) in [0.75, 0.0].into_iter().enumerate() {
            t[0][i] += time(&encoder_step, r) / rounds as f64;
            t[1][i] += time(&full_step, r) / rounds as f64;
        }
    }
    for (name, [masked, full]) in [
        ("encoder step", t[0]),
        ("MAE step (enc + dec + loss)", t[1]),
    ] {
        println!(
            "{name}, ViT-Tiny batch {batch}: mask 0.75 {:.3} s, mask 0.0 {:.3} s, ratio {:.2}",
            masked,
            full,
            masked / full
        );
    }
}

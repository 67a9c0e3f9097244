//! Training throughput of one SimCLR step: ResNet-18 (CIFAR stem), batch 128 images (256 views
//! at 32 px), projection head 512-2048-128, NT-Xent, LARS; fresh random inputs every step (a
//! memorised batch drives gradients denormal and slows every framework). Peak memory is the
//! process's high-water mark (VmHWM).
//!
//! Run: `cargo bench --profile dev --bench simclr_step`; the PyTorch reference, same model, batch,
//! loss and optimiser on 2 threads: `python3 benches/reference/simclr_step_torch.py`.

mod common;

use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use selfsup::methods::SimclrConfig;
use selfsup::models::{init_seeded, BackboneConfig, ResNetConfig, Stem};
use selfsup::train::optim::{OptimConfig, OptimizerKind};
use selfsup::train::{Method, Progress};

fn main() {
    let (batch, steps) = (128usize, 5usize);
    let device = std::env::args()
        .nth(1)
        .filter(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "cpu".into());
    let dev = selfsup::pretrain::device(&device).unwrap().autodiff();
    let model = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 1.0,
        init: None,
        conv_init: Default::default(),
    });
    let mut method = init_seeded(&dev, 0, || {
        SimclrConfig {
            temperature: 0.5,
            proj_hidden: Some(2048),
            proj_dim: 128,
            proj_layers: 2,
            // As the PyTorch step it is compared with.
            proj_output_norm: false,
        }
        .init(&model, &dev)
    });
    let mut optim = OptimConfig {
        optimizer: OptimizerKind::Lars,
        weight_decay: 1e-6,
        momentum: 0.9,
        betas: [0.9, 0.999],
        eta: 0.001,
        ..OptimConfig::default()
    }
    .init();
    let progress = Progress {
        epoch: 0,
        step: 0,
        total_steps: 1,
        steps_per_epoch: 1,
    };
    let mut times = Vec::new();
    for step in 0..=steps {
        let views: Vec<Tensor<4>> = (0..2)
            .map(|_| Tensor::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), &dev))
            .collect();
        let start = Instant::now();
        let loss = method.loss(&views, &progress).loss;
        let grads = GradientsParams::from_grads(loss.backward(), &method);
        method = optim.step(0.1, method, grads);
        let _ = dev.sync();
        if step > 0 {
            times.push(start.elapsed().as_secs_f64()); // step 0 warms up
        }
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    println!("selfsup (burn flex) {device}: ResNet-18 SimCLR step, batch {batch}: {:.2} s/step, {:.1} img/s, peak RSS {:.0} MiB", mean, batch as f64 / mean, common::peak_rss_mib());
}

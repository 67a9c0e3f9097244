//! The convolutions of a CIFAR ResNet-18 (the CPU SimCLR recipe's backbone) one by one, as
//! `kernels::conv2d` runs them in training: milliseconds of the forward and backward passes
//! (best of 7), GFLOP/s, and each shape's share of a step (times its count in the network).
//! The per-layer profile of issue 30; `benches/reference/conv_layers_torch.py` times PyTorch's
//! convolutions on the same shapes.
//!
//! Run: `cargo bench --profile dev --bench conv_layers [-- WIDTH [BATCH [PX]]]` (default 0.125,
//! 512 and 32: the recipe's two views of 256 images; PX is the views' side, 24 in the CPU recipes).

use std::time::Instant;

use burn::nn::conv::Conv2dConfig;
use burn::nn::PaddingConfig2d;
use burn::tensor::{Device, Distribution, Tensor};
use selfsup::kernels;

#[global_allocator]
static ALLOCATOR: selfsup::alloc::MiMalloc = selfsup::alloc::MiMalloc;

/// (input channels, output channels, input px, kernel, stride, count in the network) of a CIFAR
/// ResNet-18 (3×3 stem at stride 1, no max pool) of `width` on `px`-pixel views.
fn layers(width: f64, px: usize) -> Vec<(usize, usize, usize, usize, usize, usize)> {
    let c = |base: f64| ((base * width).round() as usize).max(1);
    let (c1, c2, c3, c4) = (c(64.0), c(128.0), c(256.0), c(512.0));
    let (p1, p2, p3, p4) = (px, px.div_ceil(2), px.div_ceil(4), px.div_ceil(8));
    vec![
        (3, c1, p1, 3, 1, 1),
        (c1, c1, p1, 3, 1, 4),
        (c1, c2, p1, 3, 2, 1),
        (c1, c2, p1, 1, 2, 1),
        (c2, c2, p2, 3, 1, 3),
        (c2, c3, p2, 3, 2, 1),
        (c2, c3, p2, 1, 2, 1),
        (c3, c3, p3, 3, 1, 3),
        (c3, c4, p3, 3, 2, 1),
        (c3, c4, p3, 1, 2, 1),
        (c4, c4, p4, 3, 1, 3),
    ]
}

/// The best of 7 runs of `f`, in seconds.
fn best(mut f: impl FnMut()) -> f64 {
    (0..7)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    selfsup::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let width: f64 = args.first().map_or(0.125, |w| w.parse().expect("a width"));
    let n: usize = args.get(1).map_or(512, |b| b.parse().expect("a batch"));
    let px: usize = args.get(2).map_or(32, |p| p.parse().expect("a side in px"));
    let device = Device::flex().autodiff();
    println!("ResNet-18 w{width} convolutions, batch {n}, {px} px views, forward and backward (x and weight)");
    println!("| layer | count | forward ms | backward ms | forward GFLOP/s | backward GFLOP/s | share of the convolutions |");
    println!("|---|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (c, co, px, k, s, count) in layers(width, px) {
        let pad = k / 2;
        let conv = Conv2dConfig::new([c, co], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            .init(&device);
        let x = Tensor::<4>::random([n, c, px, px], Distribution::Default, &device).require_grad();
        let forward = best(|| drop(kernels::conv2d(&conv, x.clone())));
        let both = best(|| {
            let grads = kernels::conv2d(&conv, x.clone()).sum().backward();
            drop(x.grad(&grads));
        });
        let flop = 2.0 * (n * co * px.div_ceil(s).pow(2) * c * k * k) as f64;
        let backward = (both - forward).max(1e-9);
        rows.push((
            format!("{c}→{co} {px} px {k}×{k}/{s}"),
            count,
            forward,
            backward,
            flop,
        ));
    }
    let total: f64 = rows
        .iter()
        .map(|(_, count, forward, backward, _)| *count as f64 * (forward + backward))
        .sum();
    for (name, count, forward, backward, flop) in rows {
        println!(
            "| {name} | {count} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0}% |",
            forward * 1e3,
            backward * 1e3,
            flop / forward / 1e9,
            2.0 * flop / backward / 1e9,
            100.0 * count as f64 * (forward + backward) / total
        );
    }
    println!("all convolutions of one step: {:.0} ms", total * 1e3);
}

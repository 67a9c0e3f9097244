//! Augmentation throughput, in views per second:
//! - the SimCLR pipeline at 32 px on CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz),
//! - DINO multi-crop (2 × 224 px + 8 × 96 px) on the photos of ../shared/data/photos.
//!
//! Run: `cargo bench --profile dev --bench augment`; the torchvision reference, same pipelines on
//! the same images: `python3 benches/reference/augment_torchvision.py`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use selfsup::augment::{Pipeline, Sizes};
use selfsup::data::{Dataset, LoadOptions, Loader, Split};

/// Views per second of `pipeline` over `split`, normalised batches included, on `threads` threads.
fn throughput(
    split: &Split,
    pipeline: &Pipeline,
    batch: usize,
    epochs: u64,
    threads: usize,
) -> f64 {
    let loader = Loader::new(split.clone(), Arc::new(pipeline.clone()), batch, 0).unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let _warm = loader.batch(0, 0);
        let start = Instant::now();
        let mut views = 0usize;
        for epoch in 0..epochs {
            for b in 0..loader.batches_per_epoch() {
                let batch = loader.batch(epoch, b);
                views += batch.views.iter().map(|v| v.shape[0]).sum::<usize>();
            }
        }
        views as f64 / start.elapsed().as_secs_f64()
    })
}

fn main() {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let cifar = Dataset::open(shared.join("cifar10-jpeg.tar.gz"), &LoadOptions::default()).unwrap();
    let cifar = cifar.split("train").unwrap().subset(10_000, 0);
    let photos = Dataset::open(
        shared.join("photos"),
        &LoadOptions {
            load_size: None,
            skip_bad: true,
        },
    )
    .unwrap();
    let photos = photos.split("train").unwrap().clone();

    let simclr = Pipeline::preset("simclr", Sizes::small(32)).unwrap();
    let dino = Pipeline::preset(
        "dino",
        Sizes {
            size: 224,
            local_size: 96,
            local_crops: 8,
        },
    )
    .unwrap();
    println!("| pipeline | images | threads | views/s |");
    println!("|---|---|---|---|");
    for threads in [1, 2] {
        let v = throughput(&cifar, &simclr, 256, 1, threads);
        println!(
            "| simclr 32 px, CIFAR-10 | {} | {threads} | {v:.0} |",
            cifar.len()
        );
    }
    for threads in [1, 2] {
        let v = throughput(&photos, &dino, photos.len(), 3, threads);
        println!(
            "| dino 2x224 + 8x96 px, photos | {} | {threads} | {v:.0} |",
            photos.len()
        );
    }
}

//! Training throughput of whole recipes: the real loop of `selfsup pretrain` (decoded CIFAR-10
//! from `../shared/data`, augmentation on the loader's threads, the method, the optimiser, the
//! checkpoint at the end) for a few steps after a warm-up run of the same recipe. Prints img/s,
//! CPU time (user, sys) and cores busy of the timed steps alone (a run of 2 steps subtracted
//! from a run of 2 + the case's steps, so that the model's init, the loader's first batch and
//! the checkpoint drop out, as the PyTorch reference times its steps), the img/s the longer run
//! reports itself (which counts them in), and peak RSS; each case runs in a process of its own
//! so that its peak RSS is its own.
//!
//! Run: `cargo bench --profile dev --bench train_throughput [-- [--bf16] CASE...]` (`--bf16`:
//! `train.precision = "bf16"`, AMX's or AVX-512 BF16's products where the CPU has them); the PyTorch
//! reference for the same cases: `python3 benches/reference/train_throughput_torch.py [CASE...]`.

mod common;

use std::process::Command;
use std::time::Instant;

use selfsup::config::Recipe;
use selfsup::data::{Dataset, LoadOptions};
use selfsup::precision::Precision;

#[global_allocator]
static ALLOCATOR: selfsup::alloc::MiMalloc = selfsup::alloc::MiMalloc;

/// SimCLR on a CIFAR ResNet-18 of `width`: τ 0.2, head 512-128 with BN, SGD at `lr`.
fn simclr(width: f32, batch: usize, lr: f64) -> String {
    format!(
        "[augment]\npipeline = \"simclr\"\n\
         [method]\nname = \"simclr\"\ntemperature = 0.2\nproj_hidden = 512\nproj_dim = 128\nproj_output_norm = false\n\
         [model]\narch = \"resnet\"\nwidth = {width:?}\n\
         [train]\nbatch_size = {batch}\noptimizer = \"sgd\"\nmomentum = 0.9\nbase_lr = {lr:?}\n\
         lr_scaling = \"none\"\nweight_decay = 1e-5\n"
    )
}

/// (name, steps timed, recipe): the cases of issue 15. MAE and DINO take the rest of their
/// published recipes (ViT-Tiny/4 at 32 px).
fn cases() -> [(&'static str, usize, String); 4] {
    [
        ("simclr_r18w0.25_b256", 8, simclr(0.25, 256, 0.6)),
        ("simclr_r18_b128", 4, simclr(1.0, 128, 0.3)),
        (
            "mae_vit_tiny4_b64",
            8,
            "[method]\nname = \"mae\"\nmask_ratio = 0.75\n[train]\nbatch_size = 64\n".into(),
        ),
        (
            "dino_vit_tiny4_2+4crops_b64",
            4,
            "[method]\nname = \"dino\"\n[augment]\nlocal_crops = 4\n[train]\nbatch_size = 64\n"
                .into(),
        ),
    ]
}

/// Seconds of CPU this process has used: (user, sys), from /proc/self/stat.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th and
    // 13th of them, in clock ticks.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let tick = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    (
        fields.get(11).copied().unwrap_or(0.0) / tick,
        fields.get(12).copied().unwrap_or(0.0) / tick,
    )
}

/// Runs one case in this process and prints its row.
fn run_case(name: &str, steps: usize, text: &str, precision: Precision) {
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/cifar10-jpeg.tar.gz");
    let dataset = Dataset::open(&data, &LoadOptions::default()).expect("the CIFAR-10 archive");
    let mut recipe = Recipe::parse(text).expect("a valid case");
    // No kNN at the end: the test split is not named.
    recipe.data.test_split = "none".into();
    recipe.train.epochs = 1;
    recipe.train.warmup_epochs = 0.0;
    recipe.train.monitor_every = 0;
    recipe.train.precision = precision;
    let device = burn::tensor::Device::flex();
    let tmp = std::env::temp_dir().join(format!("selfsup-bench-{}", std::process::id()));
    // One run of `steps` steps: the last step's img/s as the run reports it (images over the
    // epoch's wall time so far), and the CPU and wall seconds of the whole call.
    let run = |dir: &str, steps: usize| {
        let mut r = recipe.clone();
        r.data.train_limit = steps * r.train.batch_size;
        let out = tmp.join(dir);
        let _ = std::fs::remove_dir_all(&out);
        let (cpu0, wall0) = (cpu_seconds(), Instant::now());
        selfsup::pretrain::pretrain(&r, &dataset, &out, &device, false).expect("training");
        let (cpu1, wall) = (cpu_seconds(), wall0.elapsed().as_secs_f64());
        let metrics =
            selfsup::train::metrics::read(&out.join(selfsup::train::metrics::FILE)).unwrap();
        let last = metrics.iter().rfind(|r| r["kind"] == "step").unwrap();
        let reported = last["img_per_s"].as_f64().unwrap();
        (reported, cpu1.0 - cpu0.0, cpu1.1 - cpu0.1, wall)
    };
    run("warmup", 2);
    // The steps alone, as the PyTorch reference times them: a run of 2 steps subtracted from a
    // run of 2 + `steps`, which takes out the model's init, the loader's first batch and the
    // checkpoint at the end.
    let (_, short_user, short_sys, short_wall) = run("short", 2);
    let (reported, user, sys, wall) = run("timed", 2 + steps);
    let (user, sys, wall) = (user - short_user, sys - short_sys, wall - short_wall);
    let rate = (steps * recipe.train.batch_size) as f64 / wall;
    println!(
        "| {name} | {steps} | {rate:.1} | {reported:.1} | {user:.0} | {sys:.0} ({:.0}%) | {:.2} | {:.0} |",
        100.0 * sys / (user + sys),
        (user + sys) / wall,
        common::peak_rss_mib()
    );
    let _ = std::fs::remove_dir_all(&tmp);
}

fn main() {
    selfsup::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bf16 = args.iter().any(|a| a == "--bf16");
    let precision = match bf16 {
        true => Precision::Bf16,
        false => Precision::F32,
    };
    if let Some(i) = args.iter().position(|a| a == "--case") {
        let name = &args[i + 1];
        let cases = cases();
        let (_, steps, text) = cases.iter().find(|c| c.0 == name).expect("a known case");
        run_case(name, *steps, text, precision);
        return;
    }
    let chosen: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    println!(
        "selfsup (burn 0.22.1 flex), 2 cores, products in {} (bf16 engine: {:?}); img/s, CPU seconds and cores busy of the timed steps alone",
        precision.name(),
        selfsup::bf16::engine()
    );
    println!("| case | steps | img/s | img/s as the run reports it | user s | sys s | cores busy | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, _, _) in cases() {
        if chosen.is_empty() || chosen.iter().any(|c| c.as_str() == name) {
            let mut child = Command::new(std::env::current_exe().unwrap());
            if bf16 {
                child.arg("--bf16");
            }
            let status = child
                .args(["--case", name])
                .status()
                .expect("the bench itself");
            assert!(status.success(), "{name} failed");
        }
    }
}

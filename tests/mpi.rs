//! Data parallelism over Open MPI, as users launch it: `mpirun -np N selfsup ...` on loopback.
//! Every method's steps at 2 and 3 ranks against one process (`selfsup dist-check`); a
//! `pretrain` at 2 ranks that writes one run folder with one process's losses, and survives a
//! `kill -9` of one rank to resume to the same losses. Built with `--features mpi` only (CI
//! installs Open MPI); `tests/dist.rs` checks the same with ranks as threads, without MPI.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use selfsup::methods::METHODS;

/// `mpirun -np N selfsup ARGS`, one thread per rank, as root and oversubscribed where CI needs it.
fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args(["-np", &np.to_string(), env!("CARGO_BIN_EXE_selfsup")])
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("RAYON_NUM_THREADS", "1");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn every_method_trains_the_same_over_mpi_at_two_and_three_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::test_data().join("cifar10");
    for method in METHODS {
        let recipe = dir.path().join(format!("{method}.toml"));
        let text_recipe = toml::to_string(&common::small_recipe(method)).unwrap();
        std::fs::write(&recipe, text_recipe).unwrap();
        for np in [2, 3] {
            let out = mpirun(np, &["dist-check", "--recipe"])
                .arg(&recipe)
                .arg("--data")
                .arg(&data)
                .args(["--images", "48"])
                .output()
                .unwrap();
            let all = text(&out);
            assert!(out.status.success(), "{method} at {np} ranks: {all}");
            let line = String::from_utf8_lossy(&out.stdout);
            let gaps: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
            eprintln!("{method} at {np} ranks over MPI: {gaps}");
            assert_eq!(gaps["world"], np, "{all}");
        }
    }
}

/// A SimCLR small enough to train in seconds: 3 epochs of 9 steps.
fn tiny_recipe(dir: &Path) -> std::path::PathBuf {
    let text = "seed = 0\n[augment]\npipeline = \"simclr\"\nsize = 32\nblur = false\n\
         [method]\nname = \"simclr\"\nproj_hidden = 32\nproj_dim = 16\n\
         [model]\narch = \"resnet\"\ndepth = 18\nstem = \"cifar\"\nwidth = 0.125\n\
         [train]\nepochs = 3\nbatch_size = 32\noptimizer = \"sgd\"\nmomentum = 0.9\n\
         base_lr = 0.002\nlr_scaling = \"none\"\nweight_decay = 1e-6\nwarmup_epochs = 0\n\
         checkpoint_every = 1\nmonitor_every = 0\n[eval]\nknn_k = 5\n";
    let path = dir.join("simclr.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The logged losses of `kind` ("step", "epoch") of `run`.
fn losses(run: &Path, kind: &str) -> Vec<f64> {
    selfsup::train::metrics::read(&run.join(selfsup::train::metrics::FILE))
        .unwrap()
        .iter()
        .filter(|l| l["kind"] == kind)
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn mpirun_pretrain_writes_one_process_run_and_resumes_after_a_rank_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(dir.path());
    let data = common::test_data().join("cifar10");
    let pretrain = |run: &Path| {
        let mut args = vec!["pretrain".into(), "--recipe".into()];
        args.push(recipe.clone().into_os_string());
        args.extend(["--data".into(), data.clone().into_os_string()]);
        args.extend(["--out".into(), run.as_os_str().to_owned()]);
        args
    };

    // One process.
    let single = dir.path().join("single");
    let out = Command::new(env!("CARGO_BIN_EXE_selfsup"))
        .args(pretrain(&single))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));

    // Two ranks: one run folder, rank 0's report, one process's losses.
    let two = dir.path().join("two");
    let out = mpirun(2, &[]).args(pretrain(&two)).output().unwrap();
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert_eq!(all.matches("run folder:").count(), 1, "{all}");
    // The first two steps agree to float rounding (at most 2.4e-7 apart over seeds 0-7 of this
    // recipe, with either convolution kernel, on an AVX2 CPU). From the third on, rounding that
    // flips a ReLU whose input lies within it of 0 grows from step to step: the third step's
    // losses were 1.4e-5 to 6.6e-4 apart for 4 of those 8 seeds with the gemm tap products (2
    // with the direct convolution), the fourth's up to 2.4e-2. The
    // epochs then run as two draws of one run, whose mean losses agree to 3e-2 (1.2% apart at
    // epoch 2; tests/train.rs holds bf16's epochs to 5% likewise).
    let (a, b) = (losses(&single, "step"), losses(&two, "step"));
    for (x, y) in a.iter().zip(&b).take(2) {
        assert!(((x - y) / x).abs() < 1e-5, "step losses {a:?} vs {b:?}");
    }
    let (a, b) = (losses(&single, "epoch"), losses(&two, "epoch"));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            ((x - y) / x).abs() < 3e-2,
            "per-epoch losses {a:?} vs {b:?}"
        );
    }
    assert!(two.join("backbone.safetensors").exists() && two.join("summary.json").exists());

    // Kill rank 1 with SIGKILL once the first checkpoint is written: mpirun ends the run with
    // an error; the same command resumes it to the uninterrupted run's losses.
    let killed = dir.path().join("killed");
    let child = mpirun(2, &[])
        .args(pretrain(&killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while !killed.join("checkpoints").join("epoch-0001").exists() {
        assert!(
            started.elapsed().as_secs() < 120,
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ranks = Command::new("pgrep")
        .args(["-f", "-P", &child.id().to_string(), "selfsup"])
        .output()
        .unwrap();
    let pids = String::from_utf8_lossy(&ranks.stdout);
    let victim = pids
        .split_whitespace()
        .last()
        .expect("the ranks' processes");
    Command::new("kill").args(["-9", victim]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "mpirun succeeded after a rank was killed"
    );
    let out = mpirun(2, &[]).args(pretrain(&killed)).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(losses(&killed, "epoch"), b, "the resumed run's losses");
}

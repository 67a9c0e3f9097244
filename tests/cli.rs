//! The command line on real data: what a user types and sees.

mod common;

use std::process::Command;

fn selfsup(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_selfsup"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn data_info_on_the_cifar10_image_archive() {
    let archive = common::shared_data().join("cifar10-jpeg.tar.gz");
    let (ok, out, err) = selfsup(&["data", "info", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("classes: 10"), "{out}");
    assert!(out.contains("split train: 50000 images, 32x32x3"), "{out}");
    assert!(out.contains("split test: 10000 images, 32x32x3"), "{out}");
    assert!(out.contains("airplane         5000"), "{out}");
}

#[test]
fn data_info_on_a_cifar10_binary_release() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cifar10(dir.path(), 4);
    let (ok, out, err) = selfsup(&["data", "info", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("split train: 20 images, 32x32x3") && out.contains("split test: 4 images"),
        "{out}"
    );
}

#[test]
fn views_writes_a_grid_of_real_images() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("views.png");
    let photos = common::shared_data().join("photos");
    let (ok, out, err) = selfsup(&[
        "views",
        "--data",
        photos.to_str().unwrap(),
        "--pipeline",
        "dino",
        "--size",
        "96",
        "--count",
        "3",
        "--load-size",
        "256",
        "--skip-bad",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("3 images x 8 views"), "{out}");
    // 3 rows, 9 columns (original + 8 views) of 96-px cells with 4-px gaps.
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (9 * 100 + 4, 3 * 100 + 4));
}

#[test]
fn bad_input_gives_a_clear_error_and_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = selfsup(&[
        "views",
        "--data",
        dir.path().to_str().unwrap(),
        "--pipeline",
        "simclr9",
    ]);
    assert!(!ok && err.contains("unknown pipeline 'simclr9'"), "{err}");
    let (ok, _, err) = selfsup(&["data", "info", dir.path().to_str().unwrap()]);
    assert!(!ok && err.contains("no images"), "{err}");
    let (ok, _, err) = selfsup(&["data", "download", "imagenet"]);
    assert!(!ok && err.contains("imagenet"), "{err}");
}

#[test]
fn printed_pipeline_reads_back_as_a_recipe() {
    let (ok, out, err) = selfsup(&["pipeline", "moco_v2"]);
    assert!(ok, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, &out).unwrap();
    let recipe = selfsup::config::Recipe::load(&path).unwrap();
    let printed = recipe.augment.build().unwrap();
    let preset =
        selfsup::augment::Pipeline::preset("moco_v2", selfsup::augment::Sizes::small(32)).unwrap();
    assert_eq!(printed, preset);
}

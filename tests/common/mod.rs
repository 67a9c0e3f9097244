//! Helpers shared by the integration tests: small real files written to temporary folders.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;

/// Runs the `selfsup` binary: (success, stdout, stderr).
pub fn selfsup(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_selfsup"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `selfsup pretrain --recipe RECIPE --data DATA --out RUN MORE...`: (success, stdout, stderr).
pub fn pretrain(recipe: &Path, data: &Path, run: &Path, more: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "pretrain",
        "--recipe",
        recipe.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ];
    args.extend(more);
    selfsup(&args)
}

/// `tests/data`: the small real files committed with the tests (a few hundred CIFAR-10 images
/// in `cifar10/{train,test}/<class>/`, three photos in `photos/`; see its README.md).
pub fn test_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// `n` of the committed real CIFAR-10 training images (300, 30 per class), classes mixed
/// ([`selfsup::data::Split::subset`]).
pub fn cifar10_train(n: usize) -> selfsup::data::Split {
    let ds = selfsup::data::Dataset::open(
        test_data().join("cifar10"),
        &selfsup::data::LoadOptions::default(),
    )
    .unwrap();
    ds.split("train").unwrap().subset(n, 0)
}

/// The data folder `$SELFSUP_DATA` that holds the whole datasets (`cifar10-jpeg.tar.gz`), for
/// the `#[ignore]`d tests that need them; `.ci/run` points it at `../shared/data`.
pub fn data_folder() -> PathBuf {
    match std::env::var_os("SELFSUP_DATA").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "this test needs the whole CIFAR-10 archive: set SELFSUP_DATA to the folder that holds \
             cifar10-jpeg.tar.gz, e.g. SELFSUP_DATA=../shared/data cargo test -- --ignored"
        ),
    }
}

/// A 32×32 image whose pixels encode `seed` (so that every image differs).
pub fn pattern(seed: u32) -> RgbImage {
    RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([
            (x * 8 + seed) as u8,
            (y * 8) as u8,
            (seed * 37 + x + y) as u8,
        ])
    })
}

/// `root/<split>/<class>/<i>.png` for each (split, class, number of images).
pub fn write_folder(root: &Path, layout: &[(&str, &str, usize)]) {
    for &(split, class, n) in layout {
        let dir = root.join(split).join(class);
        std::fs::create_dir_all(&dir).unwrap();
        for i in 0..n {
            pattern(i as u32)
                .save(dir.join(format!("{i}.png")))
                .unwrap();
        }
    }
}

/// Labelled 2-d features, one row per label.
pub fn features(rows: &[[f32; 2]], labels: &[u32]) -> selfsup::eval::Features {
    selfsup::eval::Features {
        data: rows.iter().flatten().copied().collect(),
        dim: 2,
        labels: labels.to_vec(),
    }
}

/// A CIFAR-10 binary release with `per_batch` records in each of the six files; labels cycle 0..10.
pub fn write_cifar10(dir: &Path, per_batch: usize) -> Vec<Vec<(RgbImage, u32)>> {
    std::fs::create_dir_all(dir).unwrap();
    let names: Vec<String> = (1..=5)
        .map(|i| format!("data_batch_{i}.bin"))
        .chain(["test_batch.bin".to_string()])
        .collect();
    let mut all = Vec::new();
    for (b, name) in names.iter().enumerate() {
        let records: Vec<(RgbImage, u32)> = (0..per_batch)
            .map(|i| {
                (
                    pattern((b * per_batch + i) as u32),
                    ((b * per_batch + i) % 10) as u32,
                )
            })
            .collect();
        let (imgs, labels): (Vec<_>, Vec<_>) = records.iter().cloned().unzip();
        std::fs::write(
            dir.join(name),
            selfsup::data::encode_cifar_records(&imgs, &labels),
        )
        .unwrap();
        all.push(records);
    }
    std::fs::write(
        dir.join("batches.meta.txt"),
        selfsup::data::CIFAR10_CLASSES.join("\n") + "\n\n",
    )
    .unwrap();
    all
}

/// A `.tar.gz` of `dir`, its files under `top/` (as published archives are).
pub fn tar_gz(dir: &Path, top: &str, out: &Path) {
    let file = std::fs::File::create(out).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(top, dir).unwrap();
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

/// Every float parameter and buffer of `m` by module path (`backbone.ResNet.bn1.running_mean`),
/// with its values and whether `grads` holds a gradient for it.
pub fn params_by_path<M: burn::module::Module>(
    m: &M,
    grads: Option<&burn::optim::GradientsParams>,
) -> Vec<(String, Vec<f32>, bool)> {
    use burn::module::{ModuleVisitor, Param};
    use burn::tensor::Tensor;
    struct Walk<'a> {
        grads: Option<&'a burn::optim::GradientsParams>,
        path: Vec<String>,
        out: Vec<(String, Vec<f32>, bool)>,
    }
    impl ModuleVisitor for Walk<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let values = p.val().into_data().try_to_vec::<f32>().unwrap();
            let reached = self.grads.is_some_and(|g| g.get::<D>(p.id).is_some());
            self.out.push((self.path.join("."), values, reached));
        }
    }
    let mut walk = Walk {
        grads,
        path: vec![],
        out: vec![],
    };
    m.visit(&mut walk);
    walk.out
}

/// A tiny ViT (16 px images, 4 px patches, 24-d, 2 blocks) for method tests.
pub fn tiny_vit() -> selfsup::models::BackboneConfig {
    selfsup::models::BackboneConfig::Vit(selfsup::models::VitConfig {
        image_size: 16,
        patch_size: 4,
        dim: 24,
        depth: 2,
        heads: 2,
        mlp_ratio: 2.0,
        pool: selfsup::models::Pool::Cls,
        registers: 0,
        layer_scale: None,
        no_embed_class: false,
        init: None,
    })
}

/// The tensors of a safetensors file by name, sorted: (name, (dtype, shape, bytes)).
pub fn safetensors_by_name(path: &Path) -> Vec<(String, (String, Vec<usize>, Vec<u8>))> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let value = (
                format!("{:?}", t.dtype()),
                t.shape().to_vec(),
                t.data().to_vec(),
            );
            (name, value)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A small version of the method's published recipe: a narrow ResNet-18 or a 2-block ViT, a
/// global batch of 12 (which 2 and 3 divide), MoCo's batch norm in 6 groups.
pub fn small_recipe(method: &str) -> selfsup::config::Recipe {
    let mut text = selfsup::methods::published(method).unwrap().1.to_string();
    text = text.replace("width = 1.0", "width = 0.125");
    text = text.replace("dim = 192", "dim = 48");
    text = text.replace("depth = 12", "depth = 2");
    for wide in [
        "proj_hidden = 2048",
        "proj_dim = 2048",
        "proj_hidden = 4096",
        "pred_hidden = 4096",
    ] {
        let key = wide.split(" = ").next().unwrap();
        text = text.replace(wide, &format!("{key} = 256"));
    }
    let mut recipe = selfsup::config::Recipe::parse(&text).unwrap();
    recipe.train.batch_size = 12;
    if let selfsup::methods::MethodConfig::Moco(m) = &mut recipe.method {
        m.bn_splits = 6;
        m.queue_size = 48;
    }
    // MoCo v3 at the official default τ = 1: the CIFAR recipe's 0.2 sharpens the softmax five
    // times, and past the first step rounding grows (3 ranks: loss 4.5e-6, weights 3e-5 of
    // their change after 3 steps; the first gradients agree to 1e-6 at either τ).
    if let selfsup::methods::MethodConfig::MocoV3(m) = &mut recipe.method {
        m.temperature = 1.0;
    }
    // SwAV's queue in use from the second step, its prototypes learning from the first.
    if let selfsup::methods::MethodConfig::Swav(s) = &mut recipe.method {
        (s.prototypes, s.queue_size, s.epoch_queue_starts) = (300, 24, 0);
        s.freeze_prototypes_epochs = 0;
    }
    if let selfsup::methods::MethodConfig::Dino(d) = &mut recipe.method {
        (d.out_dim, d.hidden, d.bottleneck) = (256, 128, 64);
    }
    recipe.check().unwrap();
    recipe
}

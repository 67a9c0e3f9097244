//! Numbers a user can trust (issue 28): no accuracy from ties or non-finite features, no
//! weights that cannot compute, no resume that silently changes the run, no panic on a value
//! read back from a run folder, and what needs no data refused before the data is read.

mod common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Tensor};
use common::selfsup;
use selfsup::eval::{accuracy, knn, linear_probe, rank_me, EvalConfig, Features};
use selfsup::models::{init_seeded, BackboneConfig, Pool, ResNetConfig, Stem, VitConfig};

fn dev() -> Device {
    Device::flex()
}

#[test]
fn a_tie_is_ranked_by_class_index_never_counted_for_every_class() {
    // Equal scores predict the lowest class, as torch.argmax: one of the two rows is right.
    let acc = accuracy(&[vec![1.0, 1.0], vec![1.0, 1.0]], &[0, 1]).unwrap();
    assert_eq!(acc.top1, 0.5);
    assert_eq!(acc.top5, 1.0);
    // Top-5 of 7 equal scores: classes 0-4 rank first, so labels 5 and 6 miss.
    let flat = vec![vec![0.0; 7]; 7];
    let acc = accuracy(&flat, &[0, 1, 2, 3, 4, 5, 6]).unwrap();
    assert_eq!((acc.top1, acc.top5), (1.0 / 7.0, 5.0 / 7.0));
    // A pretext task's accuracy on the device follows the same rule (burn's argmax, as torch's).
    let logits = Tensor::<2>::from_data(
        burn::tensor::TensorData::new(vec![1.0f32; 8], [2, 4]),
        &dev(),
    );
    let acc = selfsup::losses::accuracy(logits, &[0, 3]);
    assert_eq!(acc.into_data().try_to_vec::<f32>().unwrap(), [0.5]);
}

#[test]
fn knn_of_a_collapsed_encoder_is_chance_not_100_percent() {
    // An all-zero encoder on a balanced 2-class set: every vote ties.
    let zeros = common::features(&[[0.0, 0.0]; 4], &[0, 0, 1, 1]);
    let acc = knn(&zeros, &zeros, 2, 2, 0.1, &dev()).unwrap();
    assert_eq!(acc.top1, 0.5);
    // One image in both classes with identical features, k = 2.
    let bank = common::features(&[[1.0, 0.5], [1.0, 0.5]], &[0, 1]);
    let acc = knn(&bank, &bank, 2, 2, 0.1, &dev()).unwrap();
    assert_eq!(acc.top1, 0.5);
}

#[test]
fn rank_me_counts_the_dimensions_the_features_use() {
    let rows = |data: Vec<f32>, dim: usize| Features {
        labels: vec![0; data.len() / dim],
        data,
        dim,
    };
    // Every image on one line: rank 1; four orthogonal directions of equal weight: rank 4.
    let line = rows(
        (1..=5)
            .flat_map(|k| [k as f32, 2.0 * k as f32, -k as f32])
            .collect(),
        3,
    );
    assert!((rank_me(&line, &dev()).unwrap() - 1.0).abs() < 1e-4);
    let mut eye = vec![0f32; 16];
    (0..4).for_each(|i| eye[i * 5] = 2.0);
    assert!((rank_me(&rows(eye, 4), &dev()).unwrap() - 4.0).abs() < 1e-4);
    // numpy: σ = 3.891, 1.442, 1.016 -> exp(entropy of σ / Σσ + 1e-7) = 2.534485.
    let m = rows(
        vec![3.0, 1.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0],
        3,
    );
    assert!((rank_me(&m, &dev()).unwrap() - 2.534485).abs() < 1e-4);
    // Nothing to rank, or NaN features: an error, not a number.
    assert!(rank_me(&rows(vec![], 3), &dev()).is_err());
    assert!(rank_me(&rows(vec![1.0, f32::NAN], 2), &dev()).is_err());
}

#[test]
fn non_finite_features_are_refused_with_their_row_count() {
    let good = common::features(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], &[0, 1, 1]);
    let nan = common::features(
        &[[f32::NAN, 0.0], [0.0, 1.0], [f32::INFINITY, 1.0]],
        &[0, 1, 1],
    );
    let err = knn(&good, &nan, 2, 2, 0.1, &dev()).unwrap_err();
    assert!(format!("{err:#}").contains("2 of 3 rows"), "{err:#}");
    let err = knn(&nan, &good, 2, 2, 0.1, &dev()).unwrap_err();
    assert!(format!("{err:#}").contains("memory bank"), "{err:#}");
    let config = EvalConfig {
        linear_epochs: 1,
        ..EvalConfig::default()
    };
    let err = linear_probe(&nan, &good, 2, &config, &dev()).unwrap_err();
    assert!(format!("{err:#}").contains("NaN"), "{err:#}");
    let err = accuracy(&[vec![f32::NAN, 0.0]], &[1]).unwrap_err();
    assert!(format!("{err:#}").contains("1 of 1 rows"), "{err:#}");
}

/// `tests/fixtures/resnet18_cifar.safetensors` (a torchvision-named ResNet-18, CIFAR stem) with
/// the first value of tensor `name` replaced by `value`, written into `dir`.
fn spoiled_resnet(dir: &Path, name: &str, value: f32) -> PathBuf {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resnet18_cifar.safetensors");
    let mut bytes = std::fs::read(fixture).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[name]["dtype"], "F32");
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    let path = dir.join(format!("{name}.safetensors"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn weights_that_cannot_compute_are_refused_by_name_on_every_way_in() {
    let tmp = tempfile::tempdir().unwrap();
    let model = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 4.0 / 64.0,
        init: None,
        conv_init: Default::default(),
    });
    for (name, value, says) in [
        ("conv1.weight", f32::NAN, "NaN or infinite"),
        ("layer2.0.bn1.running_var", f32::INFINITY, "NaN or infinite"),
        ("bn1.running_var", -0.5, "negative variances"),
    ] {
        let file = spoiled_resnet(tmp.path(), name, value);
        // `selfsup import` ...
        let out = tmp.path().join(format!("imported-{name}"));
        let err = selfsup::run::import(&file, &out, &Default::default()).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains(says) && err.contains(name.split('.').next().unwrap()),
            "{err}"
        );
        // ... and `[model] init`.
        let err = selfsup::run::weights(&file, &model, &dev()).unwrap_err();
        assert!(format!("{err:#}").contains(says), "{err:#}");
    }
}

/// Sets every value of the first float tensor a module holds to NaN.
struct FirstToNan(bool);

impl ModuleMapper for FirstToNan {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if std::mem::replace(&mut self.0, true) {
            return param;
        }
        param.map(|t| t.mul_scalar(f32::NAN))
    }
}

#[test]
fn a_checkpoint_with_non_finite_weights_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let config = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    let backbone = init_seeded(&dev(), 0, || config.init(&dev())).map(&mut FirstToNan(false));
    let train: selfsup::train::TrainConfig = toml::from_str(
        "epochs = 1\nbatch_size = 2\noptimizer = \"sgd\"\nweight_decay = 0.0\nbase_lr = 0.1\n",
    )
    .unwrap();
    let (optim, aux) = (train.optim.init(), train.optim.init());
    let dir =
        selfsup::train::checkpoint::save(tmp.path(), &backbone, &optim, &aux, &Default::default())
            .unwrap();
    let fresh = init_seeded(&dev(), 0, || config.init(&dev()));
    let err = selfsup::train::checkpoint::load_model(&dir, fresh).unwrap_err();
    let err = format!("{err:#}");
    assert!(err.contains("conv1") && err.contains("NaN"), "{err}");
}

/// A ViT of `dim` channels in `heads` heads exported with timm's names.
fn timm_vit(dir: &Path, dim: usize, heads: usize) -> PathBuf {
    let config = BackboneConfig::Vit(VitConfig {
        image_size: 16,
        patch_size: 4,
        dim,
        depth: 1,
        heads,
        mlp_ratio: 2.0,
        pool: Pool::Cls,
        registers: 0,
        layer_scale: None,
        no_embed_class: false,
        init: None,
    });
    let vit = init_seeded(&dev(), 0, || config.init(&dev()));
    let path = dir.join(format!("vit{dim}.safetensors"));
    selfsup::weights::export(&vit, &path).unwrap();
    path
}

#[test]
fn a_vit_head_count_comes_from_the_published_sizes_or_is_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    // 3 heads of 16 channels: no published ViT is 48 wide, so the count is asked for ...
    let file = timm_vit(tmp.path(), 48, 3);
    let err =
        selfsup::run::import(&file, &tmp.path().join("guessed"), &Default::default()).unwrap_err();
    assert!(format!("{err:#}").contains("--heads"), "{err:#}");
    // ... and taken when given.
    let opts = selfsup::run::ImportOptions {
        heads: Some(3),
        ..Default::default()
    };
    let imported = selfsup::run::import(&file, &tmp.path().join("given"), &opts).unwrap();
    let BackboneConfig::Vit(vit) = imported.recipe.model else {
        panic!("a ViT")
    };
    assert_eq!(vit.heads, 3);
    // ViT-Ti's width: timm's 3 heads.
    let file = timm_vit(tmp.path(), 192, 3);
    let imported =
        selfsup::run::import(&file, &tmp.path().join("tiny"), &Default::default()).unwrap();
    let BackboneConfig::Vit(vit) = imported.recipe.model else {
        panic!("a ViT")
    };
    assert_eq!(vit.heads, 3);
}

#[test]
fn a_vit_without_blocks_is_refused_at_load_naming_the_key() {
    let err = selfsup::config::Recipe::parse(
        "[method]\nname = \"mae\"\n[model]\narch = \"vit\"\ndepth = 0\n",
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("model.depth = 0"), "{err:#}");
}

/// A SimCLR recipe small enough to train in seconds: a ResNet-18 of width 1/8 on batches of
/// `batch` images, `epochs` epochs, online kNN every epoch.
fn tiny_recipe(dir: &Path, batch: usize) -> PathBuf {
    let text = format!(
        "seed = 0\n[augment]\npipeline = \"simclr\"\nsize = 32\nblur = false\n\
         [method]\nname = \"simclr\"\nproj_hidden = 32\nproj_dim = 16\n\
         [model]\narch = \"resnet\"\ndepth = 18\nstem = \"cifar\"\nwidth = 0.125\n\
         [train]\nepochs = 2\nbatch_size = {batch}\noptimizer = \"adamw\"\nbase_lr = 0.001\n\
         weight_decay = 1e-6\nwarmup_epochs = 0\ncheckpoint_every = 1\nmonitor_every = 0\n\
         [eval]\nknn_k = 5\n"
    );
    let path = dir.join(format!("simclr_b{batch}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_resume_continues_its_run_or_names_every_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("cifar");
    common::write_cifar10(&data, 8);
    let run = tmp.path().join("run");
    // The first of two epochs, as a run killed after its first checkpoint leaves it.
    let (ok, _, err) =
        common::pretrain(&tiny_recipe(tmp.path(), 4), &data, &run, &["--epochs", "1"]);
    assert!(ok, "{err}");
    let saved = std::fs::read_to_string(run.join("recipe.toml")).unwrap();

    // The same recipe at batch 16: refused, naming the key, the run folder untouched.
    let (ok, _, err) = common::pretrain(&tiny_recipe(tmp.path(), 16), &data, &run, &[]);
    assert!(!ok && err.contains("train.batch_size: 4 → 16"), "{err}");
    assert!(err.contains("--change-recipe"), "{err}");
    assert_eq!(
        std::fs::read_to_string(run.join("recipe.toml")).unwrap(),
        saved
    );

    // More images than the run trained on: refused, naming the counts.
    common::write_cifar10(&data, 10);
    let (ok, _, err) = common::pretrain(&tiny_recipe(tmp.path(), 4), &data, &run, &[]);
    assert!(!ok && err.contains("the training images: 40 → 50"), "{err}");

    // Asked for on purpose, the run carries on under the new recipe.
    let (ok, out, err) = common::pretrain(
        &tiny_recipe(tmp.path(), 16),
        &data,
        &run,
        &["--change-recipe"],
    );
    assert!(ok && out.contains("kNN"), "{out}{err}");
    assert!(err.contains("train.batch_size: 4 → 16"), "{err}");
    let state = selfsup::train::checkpoint::state(
        &selfsup::train::checkpoint::latest(&run).unwrap().unwrap(),
    )
    .unwrap();
    assert_eq!((state.epoch, state.images), (2, 50));

    // A value given on the command line is checked as the recipe's.
    let (ok, _, err) = selfsup(&[
        "eval",
        "linear",
        "--quick",
        "--epochs",
        "0",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("eval.linear_epochs = 0"), "{err}");

    // A value hand-edited into the run folder's recipe is checked as a recipe's: named, no panic.
    let edited = std::fs::read_to_string(run.join("recipe.toml"))
        .unwrap()
        .replace("depth = 18", "depth = 20");
    std::fs::write(run.join("recipe.toml"), edited).unwrap();
    let (ok, _, err) = selfsup(&[
        "eval",
        "knn",
        "--checkpoint",
        run.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("model.depth = 20"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_device_this_build_lacks_is_refused_before_the_data_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tiny_recipe(tmp.path(), 4);
    let missing = tmp.path().join("no-such-data");
    let (ok, _, err) = common::pretrain(
        &recipe,
        &missing,
        &tmp.path().join("run"),
        &["--device", "cuda"],
    );
    assert!(!ok && err.contains("--features cuda"), "{err}");
    assert!(
        !err.contains("no-such-data"),
        "the data was looked at first: {err}"
    );
    // What the device and recipe flags take is in the help.
    let (ok, help, _) = selfsup(&["pretrain", "--help"]);
    assert!(ok);
    assert!(
        help.contains("cuda[:N]") && help.contains("selfsup recipe METHOD"),
        "{help}"
    );
}

#[test]
fn a_diverged_run_keeps_no_checkpoint_that_computes_non_finite_features() {
    use selfsup::train::{checkpoint, Method, Trainer};
    let tmp = tempfile::tempdir().unwrap();
    let images: Vec<_> = (0..8).map(common::pattern).collect();
    let split = selfsup::data::Split::new("train", images, Some(vec![0, 1, 0, 1, 0, 1, 0, 1]));
    let pipeline =
        selfsup::augment::Pipeline::preset("simclr", selfsup::augment::Sizes::small(32)).unwrap();
    let loader =
        selfsup::data::Loader::new(split.clone(), std::sync::Arc::new(pipeline.clone()), 8, 0)
            .unwrap();
    // AdamW at an absurd learning rate, one step an epoch: the weights grow by ~1e30 a step.
    let config: selfsup::train::TrainConfig = toml::from_str(
        "epochs = 3\nbatch_size = 8\noptimizer = \"adamw\"\nweight_decay = 0.0\nbase_lr = 1e30\n\
         lr_scaling = \"none\"\nwarmup_epochs = 0\ncheckpoint_every = 1\n",
    )
    .unwrap();
    let ad = dev().autodiff();
    let model = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    let simclr = selfsup::methods::SimclrConfig {
        proj_hidden: Some(32),
        proj_dim: 16,
        ..Default::default()
    };
    let method = init_seeded(&ad, 1, || simclr.init(&model, &ad));
    let mut trainer = Trainer::new(config, tmp.path(), ad.clone());
    trainer.progress = false;
    let err = trainer
        .run(method, &loader)
        .err()
        .expect("a diverged run stops");
    let err = format!("{err:#}");
    assert!(err.contains("last good checkpoint"), "{err}");
    // Whatever checkpoint it names computes finite features.
    if let Some(dir) = checkpoint::latest(tmp.path()).unwrap() {
        let fresh = init_seeded(&dev(), 1, || simclr.init(&model, &dev()));
        let kept = checkpoint::load_model(&dir, fresh);
        if let Ok(kept) = kept {
            let eval =
                selfsup::augment::Pipeline::preset("eval", selfsup::augment::Sizes::small(32))
                    .unwrap();
            let (f, _) =
                selfsup::eval::features(kept.backbone(), &split, &eval, 8, &dev()).unwrap();
            assert!(f.iter().all(|v| v.is_finite()), "{err}");
        }
    }
}

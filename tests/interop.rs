//! Weights in and out of PyTorch: the fixtures under tests/fixtures were written by timm and
//! torchvision (tools/pytorch_fixtures.py) with a fixed input and the features PyTorch computed.

mod common;

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use common::selfsup;
use selfsup::models::{BackboneConfig, ResNetConfig, Stem, VitConfig};
use selfsup::run::{self, ImportOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// `io.safetensors`'s tensor `name` on the CPU.
fn io<const D: usize>(name: &str) -> Tensor<D> {
    let bytes = std::fs::read(fixture("io.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = file.tensor(name).unwrap();
    let values: Vec<f32> = t
        .data()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Tensor::from_data(TensorData::new(values, t.shape().to_vec()), &Device::flex())
}

/// The fixtures' ViT has one head of 64 channels, a width no published ViT has: its head count
/// is given, as a user must.
fn one_head() -> ImportOptions {
    ImportOptions {
        heads: Some(1),
        ..ImportOptions::default()
    }
}

/// Largest difference between the features of run folder `run`'s encoder and PyTorch's for
/// fixture model `name`.
fn feature_error(run: &Path, name: &str) -> f32 {
    let (_, backbone, _) = run::encoder(run, None, &Device::flex()).unwrap();
    let ours = backbone.valid().forward(io::<4>(&format!("{name}.input")));
    let theirs = io::<2>(&format!("{name}.features"));
    assert_eq!(ours.dims(), theirs.dims());
    let err = (ours - theirs).abs().max().into_scalar();
    eprintln!("{name}: max feature error {err}");
    err
}

#[test]
fn a_timm_vit_imports_with_pytorchs_features_from_safetensors_and_a_dino_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    // timm's state dict, and a DINO full checkpoint ({"teacher": {"backbone.*", "head.*"}}):
    // the pickle path, a dictionary inside the file and a prefix.
    for file in ["vit_s16_layout.safetensors", "vit_s16_layout_dino_full.pth"] {
        let out = tmp.path().join(file);
        let imported = run::import(&fixture(file), &out, &one_head()).unwrap();
        let expected = BackboneConfig::Vit(VitConfig {
            image_size: 32,
            patch_size: 16,
            dim: 64,
            depth: 2,
            heads: 1,
            mlp_ratio: 4.0,
            pool: selfsup::models::Pool::Cls,
            registers: 0,
            layer_scale: None,
            no_embed_class: false,
            init: None,
        });
        assert_eq!(imported.recipe.model, expected, "{file}");
        assert_eq!(imported.tensors, 30, "{file}");
        assert!(
            imported.left_out.iter().all(|k| k.starts_with("head."))
                && imported.left_out.len() == 2,
            "{file}: {:?}",
            imported.left_out
        );
        let err = feature_error(&out, "vit");
        assert!(err < 1e-5, "{file}: features differ from timm's by {err}");
    }
}

#[test]
fn torchvision_resnets_import_with_pytorchs_features() {
    let tmp = tempfile::tempdir().unwrap();
    let r18 = tmp.path().join("r18");
    let imported = run::import(
        &fixture("resnet18_cifar.safetensors"),
        &r18,
        &ImportOptions::default(),
    )
    .unwrap();
    assert_eq!(
        imported.recipe.model,
        BackboneConfig::Resnet(ResNetConfig {
            depth: 18,
            stem: Stem::Cifar,
            width: 0.0625,
            init: None,
            conv_init: Default::default(),
        })
    );
    assert_eq!(imported.recipe.augment.size, 32);
    let err = feature_error(&r18, "resnet18");
    assert!(err < 1e-5, "ResNet-18 features differ by {err}");

    // MoCo's checkpoint holds the query and the key encoder: the user picks one.
    let moco = fixture("resnet50_moco.pth");
    let r50 = tmp.path().join("r50");
    let err = run::import(&moco, &r50, &ImportOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("'module.encoder_k.', 'module.encoder_q.'") && err.contains("--prefix"),
        "{err}"
    );
    let opts = ImportOptions {
        prefix: Some("module.encoder_q.".into()),
        ..ImportOptions::default()
    };
    let imported = run::import(&moco, &r50, &opts).unwrap();
    assert_eq!(
        imported.recipe.model,
        BackboneConfig::Resnet(ResNetConfig {
            depth: 50,
            stem: Stem::Imagenet,
            width: 0.0625,
            init: None,
            conv_init: Default::default(),
        })
    );
    assert_eq!(
        imported.recipe.augment.mean,
        Some(selfsup::augment::IMAGENET_MEAN)
    );
    assert!(imported.left_out.contains(&"module.queue".to_string()));
    assert!(imported
        .left_out
        .contains(&"module.encoder_q.fc.weight".to_string()));
    let err = feature_error(&r50, "resnet50");
    assert!(err < 1e-5, "ResNet-50 features differ by {err}");
}

#[test]
fn export_then_import_gives_the_same_features() {
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    run::import(
        &fixture("vit_s16_layout_dino_full.pth"),
        &first,
        &one_head(),
    )
    .unwrap();
    let file = tmp.path().join("exported.safetensors");
    let (ok, stdout, stderr) = selfsup(&[
        "export",
        "--checkpoint",
        first.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("the imported encoder of"), "{stdout}");
    let again = tmp.path().join("again");
    let (ok, stdout, stderr) = selfsup(&[
        "import",
        "--weights",
        file.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
        "--heads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("dim = 64"), "{stdout}");
    assert_eq!(
        common::safetensors_by_name(&first.join("backbone.safetensors")),
        common::safetensors_by_name(&again.join("backbone.safetensors")),
    );
    assert!(feature_error(&again, "vit") < 1e-5);
    // An imported run has one encoder.
    let (ok, _, stderr) = selfsup(&[
        "export",
        "--checkpoint",
        again.to_str().unwrap(),
        "--which",
        "teacher",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("no teacher"), "{stderr}");
}

#[test]
fn weights_that_do_not_fit_are_named_with_both_shapes() {
    let dev = Device::flex();
    let wider = BackboneConfig::Resnet(ResNetConfig {
        depth: 18,
        stem: Stem::Cifar,
        width: 0.125,
        init: None,
        conv_init: Default::default(),
    });
    let err = run::weights(&fixture("resnet18_cifar.safetensors"), &wider, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shape [4, 3, 3, 3] in the file, the model wants [8, 3, 3, 3]")
            && err.contains("conv1.weight"),
        "{err}"
    );
    let deeper = BackboneConfig::Resnet(ResNetConfig {
        depth: 34,
        stem: Stem::Cifar,
        width: 0.0625,
        init: None,
        conv_init: Default::default(),
    });
    let err = run::weights(&fixture("resnet18_cifar.safetensors"), &deeper, &dev)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("lacks") && err.contains("layer1.2."), "{err}");

    // Truncated and foreign files: an error naming the file, no panic.
    let tmp = tempfile::tempdir().unwrap();
    for name in ["resnet18_cifar.safetensors", "resnet50_moco.pth"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let cut = tmp.path().join(name);
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = run::import(&cut, &tmp.path().join("out"), &Default::default())
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains(name), "{err:#}");
    }
    let text = tmp.path().join("notes.pth");
    std::fs::write(&text, "not a checkpoint").unwrap();
    let err = run::import(&text, &tmp.path().join("out"), &Default::default())
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("notes.pth"), "{err:#}");
}

#[test]
fn a_recipe_starts_from_a_file_or_a_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let imported = tmp.path().join("imported");
    run::import(
        &fixture("resnet18_cifar.safetensors"),
        &imported,
        &Default::default(),
    )
    .unwrap();
    let dev = Device::flex();
    for init in [fixture("resnet18_cifar.safetensors"), imported] {
        let text = format!(
            "[model]\narch = \"resnet\"\ndepth = 18\nstem = \"cifar\"\nwidth = 0.0625\ninit = {:?}\n",
            init.to_str().unwrap()
        );
        let recipe = selfsup::config::Recipe::parse(&text).unwrap();
        let backbone = run::initial_backbone(&recipe, &dev).unwrap();
        let ours = backbone.valid().forward(io::<4>("resnet18.input"));
        let err: f32 = (ours - io::<2>("resnet18.features"))
            .abs()
            .max()
            .into_scalar();
        assert!(err < 1e-5, "{}: {err}", init.display());
    }
    let text = format!(
        "[model]\narch = \"resnet\"\ndepth = 18\nstem = \"cifar\"\nwidth = 0.125\ninit = {:?}\n",
        fixture("resnet18_cifar.safetensors").to_str().unwrap()
    );
    // On the training device the loaded weights are trainable.
    let recipe = selfsup::config::Recipe::parse(&text.replace("0.125", "0.0625")).unwrap();
    let ad = dev.clone().autodiff();
    let backbone = run::initial_backbone(&recipe, &ad).unwrap();
    let loss = backbone
        .forward(io::<4>("resnet18.input").to_device(&ad))
        .sum();
    let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &backbone);
    for (path, _, reached) in common::params_by_path(&backbone, Some(&grads)) {
        assert_eq!(reached, !path.contains("running_"), "gradient for {path}");
    }
    let recipe = selfsup::config::Recipe::parse(&text).unwrap();
    let err = run::initial_backbone(&recipe, &dev).err().unwrap();
    assert!(format!("{err:#}").contains("model.init"), "{err:#}");
}

#[test]
fn attention_draws_the_maps_of_an_imported_vit() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("vit");
    run::import(
        &fixture("vit_s16_layout.safetensors"),
        &run_dir,
        &one_head(),
    )
    .unwrap();
    let png = tmp.path().join("attn.png");
    let photo = common::test_data().join("photos/astronaut.png");
    let attention = |size: &str| {
        selfsup(&[
            "attention",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--image",
            photo.to_str().unwrap(),
            "--size",
            size,
            "--out",
            png.to_str().unwrap(),
        ])
    };
    let (ok, stdout, stderr) = attention("64");
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 rows"), "{stdout}");
    // image | 1 head | mean | mask, 64 px panels.
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (4 * 68 + 4, 68 + 4));
    // A size below one 16-px patch is refused, not rounded up to it.
    let (ok, _, stderr) = attention("8");
    assert!(!ok && stderr.contains("--size 8"), "{stderr}");
}

#[test]
fn dinov2_and_deit3_vits_import_with_pytorchs_features() {
    let tmp = tempfile::tempdir().unwrap();
    // (fixture, io name, registers, no_embed_class, image size, patch): DINOv2 as its hub
    // checkpoints and as timm has it with registers, DeiT-III as timm has it; all LayerScale.
    for (file, name, registers, no_embed_class, size, patch) in [
        ("vit_dinov2_layout.pth", "dinov2", 0, false, 42, 14),
        ("vit_dinov2_reg.pth", "dinov2_reg", 4, false, 42, 14),
        (
            "vit_dinov2_reg_timm.safetensors",
            "dinov2_reg",
            4,
            true,
            42,
            14,
        ),
        ("vit_deit3_layout.safetensors", "deit3", 0, true, 32, 16),
    ] {
        let out = tmp.path().join(file.replace('.', "_"));
        let imported = run::import(&fixture(file), &out, &one_head()).unwrap();
        let BackboneConfig::Vit(v) = &imported.recipe.model else {
            panic!("{file}: not a ViT")
        };
        assert_eq!(
            (v.registers, v.no_embed_class, v.image_size, v.patch_size),
            (registers, no_embed_class, size, patch),
            "{file}"
        );
        assert!(v.layer_scale.is_some(), "{file}");
        // DINOv2's mask token (for iBOT's masked patches) is no part of the encoder.
        if file.ends_with(".pth") {
            assert_eq!(imported.left_out, ["mask_token"], "{file}");
        }
        let err = feature_error(&out, name);
        assert!(err < 1e-5, "{file}: features differ from timm's by {err}");
    }
    // The class token attends to the patches, not the registers: one map a head.
    let png = tmp.path().join("attn.png");
    let (ok, stdout, stderr) = selfsup(&[
        "attention",
        "--checkpoint",
        tmp.path().join("vit_dinov2_reg_pth").to_str().unwrap(),
        "--image",
        common::test_data()
            .join("photos/astronaut.png")
            .to_str()
            .unwrap(),
        "--size",
        "42",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("1 rows"), "{stdout}");
}

#[test]
fn vit_layouts_selfsup_cannot_run_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture("vit_dinov2_reg_timm.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Rewrites the fixture with `edit` applied to its (name, shape, data) list.
    let rewrite = |path: &Path, edit: &dyn Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)| {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = file
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec()))
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, s, d)| {
                let view =
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d)
                        .unwrap();
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    };
    let refusal = |path: &Path| {
        let out = tmp.path().join("out");
        let _ = std::fs::remove_dir_all(&out);
        format!("{:#}", run::import(path, &out, &one_head()).unwrap_err())
    };
    // timm's registers with positions of their own (reg_tokens without no_embed_class).
    let positioned = tmp.path().join("positioned.safetensors");
    rewrite(&positioned, &|t| {
        let pos = t.iter_mut().find(|(n, _, _)| n == "pos_embed").unwrap();
        pos.1[1] += 5;
        pos.2.extend(vec![0u8; 5 * 64 * 4]);
    });
    let err = refusal(&positioned);
    assert!(
        err.contains("registers") && err.contains("pos_embed"),
        "{err}"
    );
    // DINOv2's ViT-g: SwiGLU MLPs.
    let swiglu = tmp.path().join("swiglu.safetensors");
    rewrite(&swiglu, &|t| {
        for (n, _, _) in t.iter_mut() {
            *n = n.replace("mlp.fc1", "mlp.w12");
        }
    });
    let err = refusal(&swiglu);
    assert!(err.contains("SwiGLU"), "{err}");
}

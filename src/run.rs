//! The run folder: what `pretrain` writes and every other command reads.
//!
//! ```text
//! RUN/recipe.toml            the whole recipe the run trained with
//! RUN/checkpoints/epoch-N/   model, optimiser and trainer state (written atomically)
//! RUN/backbone.safetensors   the released encoder, torchvision / timm names
//! RUN/metrics.jsonl, events.out.tfevents.*, views.png, summary.json
//! ```
//!
//! `import` writes a run folder from PyTorch weights: `recipe.toml` and `backbone.safetensors`,
//! no checkpoints. Every command that reads an encoder takes either kind.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::tensor::Device;

use crate::config::Recipe;
use crate::models::{init_seeded, Backbone, BackboneConfig, Stem};
use crate::train::{self, Method, Which};
use crate::weights::StateDict;

/// The recipe a run folder was trained (or imported) with.
pub fn recipe(run: &Path) -> Result<Recipe> {
    Recipe::load_saved(&run.join("recipe.toml"))
        .with_context(|| format!("{} is not a run folder", run.display()))
}

/// Where a run keeps its released encoder.
pub fn backbone_path(run: &Path) -> PathBuf {
    run.join("backbone.safetensors")
}

/// An encoder of a run folder, with the run's recipe and which encoder it is: `which`, or the one
/// the method releases (DINO's teacher; see [`Method::released`]). From the latest checkpoint;
/// an imported run (no checkpoints) has one encoder, its `backbone.safetensors`.
pub fn encoder(
    run: &Path,
    which: Option<Which>,
    device: &Device,
) -> Result<(Recipe, Backbone, Which)> {
    let recipe = recipe(run)?;
    let Some(dir) = train::checkpoint::latest(run)? else {
        let path = backbone_path(run);
        if !path.exists() {
            bail!(
                "{} holds no checkpoint and no backbone.safetensors",
                run.display()
            );
        }
        if which == Some(Which::Teacher) {
            bail!(
                "{} was imported: it holds one encoder, no teacher",
                run.display()
            );
        }
        let backbone = StateDict::read(&path, None, Some(""))?.load(&recipe.model, device)?;
        return Ok((recipe, backbone, Which::Imported));
    };
    struct Load<'a>(&'a Path, Option<Which>, &'static str);
    impl crate::methods::MethodUser<Result<(Backbone, Which)>> for Load<'_> {
        fn call<M: Method>(self, method: M) -> Result<(Backbone, Which)> {
            let method = train::checkpoint::load_model(self.0, method)?;
            let which = self.1.unwrap_or(method.released());
            match method.encoder(which) {
                Some(b) => Ok((b.clone(), which)),
                None => bail!("{} trains one encoder: there is no teacher", self.2),
            }
        }
    }
    let load = Load(&dir, which, recipe.method.name());
    let (backbone, which) = crate::methods::with_method(&recipe, None, device, load)
        .with_context(|| format!("cannot load the encoder of {}", run.display()))?;
    Ok((recipe, backbone, which))
}

/// `source`'s weights in a backbone of `model`'s architecture: a run folder (its released
/// encoder) or a PyTorch file (see [`StateDict::read`]). A tensor the model lacks or has in
/// another shape is named.
pub fn weights(source: &Path, model: &BackboneConfig, device: &Device) -> Result<Backbone> {
    let state = if source.is_dir() {
        let (_, backbone, which) = encoder(source, None, device)?;
        StateDict::of(
            &backbone,
            &format!("{} ({})", source.display(), which.name()),
        )
    } else {
        StateDict::read(source, None, None).map_err(|e| {
            anyhow::anyhow!(
                "{e:#} (a file that needs --key or --prefix: `selfsup import` it, then name the run folder)"
            )
        })?
    };
    state.load(model, device)
}

/// The recipe's backbone before training: seeded random weights, or `[model] init`'s.
pub fn initial_backbone(recipe: &Recipe, device: &Device) -> Result<Backbone> {
    match recipe.model.weights() {
        Some(source) => weights(source, &recipe.model, device)
            .with_context(|| format!("model.init = {}", source.display())),
        None => Ok(init_seeded(device, recipe.seed, || {
            recipe.model.init(device)
        })),
    }
}

/// What `import` needs beyond the file: see [`StateDict::read`] and
/// [`StateDict::architecture`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The dictionary inside a checkpoint that holds the weights.
    pub key: Option<String>,
    /// The backbone's key prefix.
    pub prefix: Option<String>,
    /// A ViT's attention heads (default: those of the published ViT of its width,
    /// [`crate::weights::VIT_HEADS`]).
    pub heads: Option<usize>,
    /// Evaluation image size (default: a ViT's `pos_embed` size, 224 px for an ImageNet-stem
    /// ResNet, 32 px for a CIFAR-stem one).
    pub size: Option<u32>,
}

/// What `import` did.
#[derive(Debug)]
pub struct Imported {
    /// The recipe written into the run folder (the inferred architecture).
    pub recipe: Recipe,
    /// Tensors of the backbone read.
    pub tensors: usize,
    /// Keys of the file that are not the backbone's.
    pub left_out: Vec<String>,
}

/// Writes a run folder `out` from the PyTorch weights in `file`: `recipe.toml` (the inferred
/// architecture; ImageNet's normalisation, CIFAR-10's for a CIFAR-stem ResNet) and
/// `backbone.safetensors`.
pub fn import(file: &Path, out: &Path, opts: &ImportOptions) -> Result<Imported> {
    let state = StateDict::read(file, opts.key.as_deref(), opts.prefix.as_deref())?;
    let model = state.architecture(opts.heads)?;
    let device = Device::flex();
    let backbone = state.load(&model, &device)?;
    // The method is not used (an imported run is evaluated, fine-tuned, drawn, exported, or a
    // recipe's `[model] init`): DINO's recipe for a ViT, SimCLR's for a ResNet.
    let (method, size, imagenet) = match &model {
        BackboneConfig::Vit(v) => ("dino", v.image_size as u32, true),
        BackboneConfig::Resnet(r) if r.stem == Stem::Imagenet => ("simclr", 224, true),
        BackboneConfig::Resnet(_) => ("simclr", 32, false),
    };
    let mut recipe = Recipe::defaults(method)?;
    recipe.model = model;
    recipe.augment.size = opts.size.unwrap_or(size);
    if imagenet {
        recipe.augment.mean = Some(crate::augment::IMAGENET_MEAN);
        recipe.augment.std = Some(crate::augment::IMAGENET_STD);
    }
    // DINO's local crops (unused, but checked): half the size, in whole patches.
    recipe.augment.local_size = match &recipe.model {
        BackboneConfig::Vit(v) => {
            let p = v.patch_size as u32;
            Some((recipe.augment.size / 2 / p).max(1) * p)
        }
        BackboneConfig::Resnet(_) => None,
    };
    recipe.model.check_input(recipe.augment.size, "--size")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if train::checkpoint::latest(out)?.is_some() {
        bail!(
            "{} holds a trained run: import into a new folder",
            out.display()
        );
    }
    std::fs::write(out.join("recipe.toml"), toml::to_string_pretty(&recipe)?)?;
    crate::weights::export(&backbone, &backbone_path(out))?;
    Ok(Imported {
        recipe,
        tensors: state.len(),
        left_out: state.left_out,
    })
}

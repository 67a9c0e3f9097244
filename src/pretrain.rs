//! A run from a recipe: data, views, the method, the trainer, evaluation, export. The CLI's
//! `pretrain` and `eval` commands are thin calls into this file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::augment::randaugment::RandAugment;
use crate::augment::{Pipeline, ViewSpec};
use crate::config::Recipe;
use crate::data::{check_eval_classes, Dataset, Loader, Split};
use crate::eval::{self, Accuracy, Features};
use crate::methods::{with_method, MethodConfig, MethodUser};
use crate::models::{init_seeded, Backbone};
use crate::train::{self, Method, Scalars, Trainer, Which};

/// The device named on the command line: `cpu` (burn's flex backend, always built),
/// `cuda[:N]` (an NVIDIA GPU; cargo feature `cuda`) or `vulkan[:N]` (any Vulkan GPU through wgpu,
/// N counting discrete GPUs; feature `wgpu`). A GPU named without N is the one of this process's
/// node-local rank (GPU r for the r-th process on a host under `mpirun`; GPU 0 alone). A device
/// this build lacks is named with the feature to build with.
pub fn device(name: &str) -> Result<Device> {
    let (kind, index) = match name.split_once(':') {
        Some((kind, i)) => match i.parse::<usize>() {
            Ok(i) => (kind, Some(i)),
            Err(_) => bail!("--device {name}: '{i}' is not a device index (cuda:0, vulkan:1, ...)"),
        },
        None => (name, None),
    };
    match kind {
        "cpu" if index.is_none() => Ok(Device::flex()),
        "cpu" => bail!("--device {name}: the CPU device takes no index"),
        "cuda" => gpu::cuda(index.unwrap_or_else(local_rank)),
        "vulkan" | "wgpu" => gpu::vulkan(index.unwrap_or_else(local_rank)),
        other => bail!("--device {name}: unknown device '{other}' (cpu, cuda[:N], vulkan[:N])"),
    }
}

/// This process's rank among the processes on its node.
fn local_rank() -> usize {
    crate::dist::world().local_rank()
}

/// The GPU devices, present only in builds with their cargo feature.
mod gpu {
    use anyhow::{bail, Result};
    use burn::tensor::Device;

    #[cfg(feature = "cuda")]
    pub fn cuda(index: usize) -> Result<Device> {
        cuda_driver_has(index)?;
        Ok(Device::cuda(index))
    }

    /// Asks the NVIDIA driver itself whether CUDA device `index` exists: burn, asked for a
    /// device the machine lacks, panics in its device thread instead of returning an error.
    #[cfg(feature = "cuda")]
    fn cuda_driver_has(index: usize) -> Result<()> {
        use libloading::{Library, Symbol};
        // SAFETY: loading the driver runs no code of ours; the two calls below follow the CUDA
        // driver API's signatures (CUresult cuInit(unsigned), cuDeviceGetCount(int *)).
        unsafe {
            let Some(driver) = ["libcuda.so.1", "libcuda.so"]
                .iter()
                .find_map(|name| Library::new(name).ok())
            else {
                bail!("--device cuda: the NVIDIA driver's libcuda.so.1 is not on this machine (install the driver, or add its folder to LD_LIBRARY_PATH)");
            };
            let init: Symbol<unsafe extern "C" fn(u32) -> i32> = driver.get(b"cuInit\0")?;
            let code = init(0);
            if code != 0 {
                bail!("--device cuda: the NVIDIA driver found no usable GPU (cuInit returned CUDA error {code})");
            }
            let count: Symbol<unsafe extern "C" fn(*mut i32) -> i32> =
                driver.get(b"cuDeviceGetCount\0")?;
            let mut n = 0i32;
            let code = count(&mut n);
            if code != 0 || index >= n.max(0) as usize {
                bail!("--device cuda:{index}: the NVIDIA driver reports {n} CUDA device(s)");
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    pub fn cuda(_: usize) -> Result<Device> {
        bail!("--device cuda needs a build with the `cuda` feature: cargo build --release --features cuda")
    }

    #[cfg(feature = "wgpu")]
    pub fn vulkan(index: usize) -> Result<Device> {
        let device = Device::vulkan(burn::tensor::DeviceKind::DiscreteGpu(index));
        first_use(&device).map_err(|why| {
            anyhow::anyhow!("--device vulkan:{index}: no usable Vulkan GPU ({why})")
        })?;
        Ok(device)
    }

    /// Makes one tensor on `device` in a thread of its own: burn, asked for a GPU the machine
    /// lacks, panics in its device threads instead of returning an error. The panic's message
    /// comes back as the error (and is not printed).
    #[cfg(feature = "wgpu")]
    fn first_use(device: &Device) -> std::result::Result<(), String> {
        use std::sync::{Arc, Mutex};
        let first: Arc<Mutex<Option<String>>> = Arc::default();
        let hook = std::panic::take_hook();
        let seen = first.clone();
        std::panic::set_hook(Box::new(move |info| {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.get_or_insert_with(|| info.payload_as_str().unwrap_or("a panic").to_string());
        }));
        let device = device.clone();
        let made = std::thread::spawn(move || {
            burn::tensor::Tensor::<1>::zeros([1], &device).into_data();
        })
        .join();
        std::panic::set_hook(hook);
        let why = first.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (made, why) {
            (Ok(()), None) => Ok(()),
            (_, why) => Err(why.unwrap_or_else(|| "its first use failed".into())),
        }
    }

    #[cfg(not(feature = "wgpu"))]
    pub fn vulkan(_: usize) -> Result<Device> {
        bail!("--device vulkan needs a build with the `wgpu` feature: cargo build --release --features wgpu")
    }
}

/// Opens the recipe's data, or `source` when given.
pub fn open_data(recipe: &Recipe, source: Option<&Path>) -> Result<Dataset> {
    let Some(path) = source.or(recipe.data.source.as_deref()) else {
        bail!("no data: pass --data or set data.source in the recipe");
    };
    Dataset::open(path, &recipe.data.load_options())
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub epochs: usize,
    /// Epochs this call trained: 0 when the run folder held a complete run already.
    #[serde(default)]
    pub trained: usize,
    pub final_loss: Option<f32>,
    /// The encoder evaluated and exported (see [`Method::released`]).
    #[serde(default)]
    pub released: Which,
    pub knn: Option<Accuracy>,
    pub checkpoint: PathBuf,
    pub backbone: PathBuf,
}

/// Pre-trains as the recipe says, writing into `out`, then reports kNN accuracy on the test
/// split and exports the backbone. A run folder that holds a run already is resumed exactly
/// where its checkpoint stopped, only under the same recipe ([`Recipe::changes_from`]: its
/// evaluation and `train.epochs` aside) and on as many training images; else the error names
/// every difference. `change_recipe` carries the run on under the new recipe instead: the
/// checkpoint's weights, optimiser state and step go on, and every schedule (learning rate,
/// momentum, temperatures) follows the new recipe from that step.
pub fn pretrain(
    recipe: &Recipe,
    dataset: &Dataset,
    out: &Path,
    device: &Device,
    change_recipe: bool,
) -> Result<Summary> {
    recipe.check()?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let saved = out.join("recipe.toml");
    let text = toml::to_string_pretty(recipe)?;
    let before = match saved.exists() {
        true => Some(Recipe::load_saved(&saved)?),
        false => None,
    };
    let classes = &dataset.classes;
    let full_train = dataset.split(&recipe.data.train_split)?;
    let train_split = full_train.limit(
        "data.train_limit",
        recipe.data.train_limit,
        recipe.seed,
        classes,
    )?;
    let latest = train::checkpoint::latest(out)?;
    let state = latest
        .as_deref()
        .map(train::checkpoint::state)
        .transpose()?;
    if let Some(before) = &before {
        check_resume(
            out,
            before,
            recipe,
            state.as_ref(),
            train_split.len(),
            change_recipe,
        )?;
    }
    // A complete run of this very recipe (epochs aside) is not trained or measured again: its
    // summary stands.
    let done = state.as_ref().map_or(0, |s| s.epoch);
    let unchanged = before.is_some_and(|mut b| {
        b.train.epochs = recipe.train.epochs;
        b == *recipe
    });
    let summary_path = out.join("summary.json");
    if unchanged && done >= recipe.train.epochs && summary_path.exists() {
        let json = std::fs::read_to_string(&summary_path)?;
        let mut summary: Summary =
            serde_json::from_str(&json).with_context(|| format!("{}", summary_path.display()))?;
        summary.trained = 0;
        return Ok(summary);
    }
    // Every rank has read the run folder; from here on rank 0 alone writes it.
    crate::dist::barrier();
    let main = crate::dist::is_main();
    if main {
        std::fs::write(&saved, text)?;
    }

    let test_split = dataset
        .split(&recipe.data.test_split)
        .ok()
        .filter(|s| s.labels.is_some())
        .cloned();
    let e = &recipe.eval;
    // The online kNN's bank and queries, a part of each split, and the final kNN's test split:
    // checked before training.
    let monitored = match &test_split {
        Some(test) if train_split.labels.is_some() => {
            check_eval_classes(full_train, test, classes)?;
            let seed = recipe.seed;
            Some((
                train_split.limit("eval.monitor_train", e.monitor_train, seed, classes)?,
                test.limit("eval.monitor_test", e.monitor_test, seed, classes)?,
            ))
        }
        _ => None,
    };
    let pipeline = recipe.augment.build()?;
    // The run's pictures, as PNG files and TensorBoard images: its views now (in TensorBoard,
    // once: a resumed run's earlier session showed them), and what MAE and inpainting paint at
    // the end.
    let pictures = match main {
        true => Some(train::session_events(out)?),
        false => None,
    };
    if let Some(pictures) = &pictures {
        let sample = train_split.subset(8, recipe.seed);
        let sample: Vec<&RgbImage> = sample.images.iter().collect();
        let views = crate::viz::views_grid(&sample, &pipeline, recipe.seed);
        crate::viz::save_png(&views, &out.join("views.png"))?;
        if latest.is_none() {
            pictures.image(0, "views", &views)?;
        }
    }
    let loader = Loader::new(
        train_split.clone(),
        recipe.method.augment(pipeline),
        recipe.train.batch_size,
        recipe.seed,
    )?;

    // Online kNN on a part of each split, and the RankMe of its test features
    // (`eval.monitor_test` of them): a cheap view of progress every few epochs.
    let monitor = |backbone: &Backbone| -> Result<Scalars> {
        let Some((bank, queries)) = &monitored else {
            return Ok(vec![]);
        };
        let (bank, queries) = features(recipe, backbone, bank, queries, classes, device)
            .context("the online kNN monitor")?;
        let acc =
            knn_of(recipe, &bank, &queries, classes, device).context("the online kNN monitor")?;
        let mut scalars = vec![("knn_top1", acc.top1)];
        match eval::rank_me(&queries, device) {
            Ok(rank) => scalars.push(("feature_rank", rank as f32)),
            Err(e) => tracing::warn!("feature_rank left out: {e:#}"),
        }
        Ok(scalars)
    };
    let ad = device.clone().autodiff();
    let mut trainer = Trainer::new(recipe.train.clone(), out, ad.clone());
    trainer.monitor = Some(&monitor);
    trainer.events = pictures.clone();

    struct Train<'a> {
        trainer: &'a Trainer<'a>,
        loader: &'a Loader,
    }
    impl MethodUser<Result<(Backbone, Which, train::Report)>> for Train<'_> {
        fn call<M: Method>(self, method: M) -> Result<(Backbone, Which, train::Report)> {
            let (method, report) = self.trainer.run(method, self.loader)?;
            let method = method.valid();
            Ok((train::released(&method).clone(), method.released(), report))
        }
    }
    // A fresh run starts from `[model] init` if the recipe names weights; a resumed one from its
    // checkpoint.
    let start = match recipe.model.weights() {
        Some(_) if latest.is_none() => Some(crate::run::initial_backbone(recipe, &ad)?),
        _ => None,
    };
    let (backbone, released, report) = with_method(
        recipe,
        start,
        &ad,
        Train {
            trainer: &trainer,
            loader: &loader,
        },
    )?;

    let backbone_path = crate::run::backbone_path(out);
    let Some(pictures) = pictures else {
        // Another rank: rank 0 evaluates, exports and reports.
        return Ok(Summary {
            epochs: report.state.epoch,
            trained: report.state.epoch - done,
            final_loss: report.state.epoch_losses.last().copied(),
            released,
            knn: None,
            checkpoint: PathBuf::new(),
            backbone: backbone_path,
        });
    };
    crate::weights::export(&backbone, &backbone_path)?;
    if let (MethodConfig::Mae(_) | MethodConfig::Inpainting(_), Some(test)) =
        (&recipe.method, &test_split)
    {
        let painted = reconstruct(out, test, 8, 0, device)?;
        crate::viz::save_png(&painted, &out.join("reconstructions.png"))?;
        pictures.image(report.state.step, "reconstructions", &painted)?;
    }
    // The memory bank is the whole labelled train split, whatever part was trained on.
    let knn = match &test_split {
        Some(test) => Some(
            knn_accuracy(recipe, &backbone, full_train, test, classes, device)
                .with_context(|| format!("the final kNN of the {}", released.name()))?,
        ),
        None => None,
    };
    let summary = Summary {
        epochs: report.state.epoch,
        trained: report.state.epoch - done,
        final_loss: report.state.epoch_losses.last().copied(),
        released,
        knn,
        checkpoint: train::checkpoint::latest(out)?.unwrap_or_default(),
        backbone: backbone_path,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

/// Whether `recipe` may resume the run in `out`, trained with `before` to `state` on `images`
/// training images: refused, naming every key that differs and a changed image count, unless
/// `change_recipe` (then each change is logged); a changed `train.epochs` is said.
fn check_resume(
    out: &Path,
    before: &Recipe,
    recipe: &Recipe,
    state: Option<&train::TrainState>,
    images: usize,
    change_recipe: bool,
) -> Result<()> {
    let mut changes = recipe.changes_from(before)?;
    if let Some(s) = state.filter(|s| s.images != 0 && s.images != images) {
        changes.push(format!("the training images: {} → {images}", s.images));
    }
    if !changes.is_empty() && !change_recipe {
        bail!(
            "{} holds a run of another recipe or data; resuming would change it:\n  {}\n\
             choose another --out (to start from its weights: [model] init = \"{}\"), or pass \
             --change-recipe to carry the run on under the new recipe from its checkpoint",
            out.display(),
            changes.join("\n  "),
            out.display()
        );
    }
    for change in &changes {
        tracing::warn!("--change-recipe: {change}");
    }
    if before.train.epochs != recipe.train.epochs && state.is_some() {
        tracing::warn!(
            "train.epochs: {} → {}: the learning-rate and momentum schedules now span {} epochs from the resumed step on",
            before.train.epochs,
            recipe.train.epochs,
            recipe.train.epochs
        );
    }
    Ok(())
}

/// Features of `train` and `test` through the recipe's deterministic eval view, once every
/// class of `test` is known to `train` ([`check_eval_classes`]).
fn features(
    recipe: &Recipe,
    backbone: &Backbone,
    train: &Split,
    test: &Split,
    classes: &[String],
    device: &Device,
) -> Result<(Features, Features)> {
    check_eval_classes(train, test, classes)?;
    let p = recipe.augment.eval_pipeline()?;
    let b = recipe.eval.batch_size;
    Ok((
        eval::extract(backbone, train, &p, b, device)?,
        eval::extract(backbone, test, &p, b, device)?,
    ))
}

/// kNN accuracy of `backbone` on `test`, with `train` as the memory bank (the recipe's k and T).
pub fn knn_accuracy(
    recipe: &Recipe,
    backbone: &Backbone,
    train: &Split,
    test: &Split,
    classes: &[String],
    device: &Device,
) -> Result<Accuracy> {
    let (tr, te) = features(recipe, backbone, train, test, classes, device)?;
    knn_of(recipe, &tr, &te, classes, device)
}

/// kNN accuracy of features `te` with `tr` as the memory bank (the recipe's k and T).
fn knn_of(
    recipe: &Recipe,
    tr: &Features,
    te: &Features,
    classes: &[String],
    device: &Device,
) -> Result<Accuracy> {
    eval::knn(
        tr,
        te,
        classes.len(),
        recipe.eval.knn_k,
        recipe.eval.knn_t,
        device,
    )
}

/// The quick linear probe's accuracy ([`eval::linear_probe`]): AdamW on fixed centre-crop
/// features of `train`, measured on `test`.
pub fn linear_accuracy(
    recipe: &Recipe,
    backbone: &Backbone,
    train: &Split,
    test: &Split,
    classes: &[String],
    device: &Device,
) -> Result<Accuracy> {
    let (tr, te) = features(recipe, backbone, train, test, classes, device)?;
    eval::linear_probe(&tr, &te, classes.len(), &recipe.eval, device)
}

/// The papers' linear evaluation of `backbone` (the recipe's `[linear_eval]`): a classifier
/// trained on random-resized crops and flips of `train` (`linear_eval.train_limit` of its
/// images, drawn per class) at `augment.size`, measured on `test`.
pub fn linear_eval_accuracy(
    recipe: &Recipe,
    backbone: &Backbone,
    train: &Split,
    test: &Split,
    classes: &[String],
    device: &Device,
) -> Result<Accuracy> {
    check_eval_classes(train, test, classes)?;
    let limit = recipe.linear_eval.train_limit;
    let train = train.limit("linear_eval.train_limit", limit, recipe.seed, classes)?;
    let augment = crop_flip_views(recipe, RandAugment::default())?;
    eval::linear_eval(
        backbone,
        &train,
        test,
        classes.len(),
        &augment,
        &recipe.augment.eval_pipeline()?,
        &recipe.linear_eval,
        device,
    )
}

/// The labelled views of linear evaluation and fine-tuning: random-resized crops (8-100% of the
/// image, the recipe's first view's filter) at `augment.size`, flips, and `rand_augment` (its
/// fill the normalisation mean, as timm's `img_mean`).
pub fn crop_flip_views(recipe: &Recipe, rand_augment: RandAugment) -> Result<Pipeline> {
    let built = recipe.augment.build()?;
    let fill = built
        .mean
        .map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8);
    Ok(Pipeline {
        views: vec![ViewSpec {
            size: recipe.augment.size,
            interpolation: built.views[0].interpolation,
            rand_augment: RandAugment {
                fill,
                ..rand_augment
            },
            ..ViewSpec::default()
        }],
        ..built
    })
}

/// Fine-tunes `backbone` (pre-trained, or random for the from-scratch baseline) with the
/// recipe's `[finetune]` settings on the labelled train split (crops, flips and RandAugment,
/// [`crop_flip_views`]), `finetune.train_limit` of its images drawn per class; reports accuracy
/// on the test split and how many labelled images were used.
pub fn finetune_accuracy(
    recipe: &Recipe,
    backbone: Backbone,
    dataset: &Dataset,
    device: &Device,
) -> Result<(Accuracy, usize)> {
    let classes = &dataset.classes;
    let train = dataset.split(&recipe.data.train_split)?;
    let test = dataset.split(&recipe.data.test_split)?;
    check_eval_classes(train, test, classes)?;
    let limit = recipe.finetune.train_limit;
    let train = train.limit("finetune.train_limit", limit, recipe.seed, classes)?;
    let augment = crop_flip_views(recipe, recipe.finetune.rand_augment)?;
    let tuned = eval::finetune::finetune(
        backbone,
        recipe.model.feature_dim(),
        &train,
        test,
        dataset.classes.len(),
        &augment,
        &recipe.augment.eval_pipeline()?,
        &recipe.finetune,
        device,
    )?;
    Ok((tuned.accuracy, tuned.labelled))
}

/// Pictures of what an inpainting or MAE run paints, one row per image of `count` of `split`
/// (drawn per class, [`Split::subset`]; images and masks drawn from `seed`): original | masked input | reconstruction, and for MAE also
/// the reconstruction with the visible patches pasted back.
pub fn reconstruct(
    run: &Path,
    split: &Split,
    count: usize,
    seed: u64,
    device: &Device,
) -> Result<RgbImage> {
    let recipe = crate::run::recipe(run)?;
    let Some(dir) = train::checkpoint::latest(run)? else {
        bail!("{} holds no checkpoint", run.display())
    };
    let size = recipe.augment.size as usize;
    let eval = recipe.augment.eval_pipeline()?;
    let (mean, std) = (eval.mean, eval.std);
    let seeded = |i: usize, k: u64| crate::augment::sample_rng(seed, k, i as u64);
    let shape = [1, 3, size, size];
    let tensor = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, shape), device);
    let pixels = |t: Tensor<4>| -> Result<RgbImage> {
        let v: Vec<f32> = t
            .into_data()
            .try_to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(crate::viz::denormalize(&v, size, size, mean, std))
    };
    let views: Vec<RgbImage> = split
        .subset(count, seed)
        .images
        .iter()
        .enumerate()
        .map(|(i, img)| eval.images(img, &mut seeded(i, 0)).remove(0))
        .collect();
    let mut rows = Vec::new();
    match &recipe.method {
        MethodConfig::Inpainting(c) => {
            let method = init_seeded(device, recipe.seed, || c.init(&recipe.model, size, device));
            let method = train::checkpoint::load_model(&dir, method)?.valid();
            for (i, view) in views.iter().enumerate() {
                let hidden = crate::augment::ops::inpainting_mask(
                    c.mask,
                    view.width(),
                    view.height(),
                    c.area,
                    &mut seeded(i, 1),
                );
                let m: Vec<f32> = hidden
                    .iter()
                    .map(|&h| h as u8 as f32)
                    .collect::<Vec<_>>()
                    .repeat(3);
                let x = crate::augment::normalize(view, mean, std).data;
                let completed = method.complete(tensor(x), tensor(m));
                rows.push(vec![
                    view.clone(),
                    crate::viz::hide(view, &hidden),
                    pixels(completed)?,
                ]);
            }
        }
        MethodConfig::Mae(c) => {
            let method = init_seeded(device, recipe.seed, || c.init(&recipe.model, device));
            let method = train::checkpoint::load_model(&dir, method)?.valid();
            let p = method.patch();
            let g = size / p;
            for (i, view) in views.iter().enumerate() {
                let masking = crate::methods::mae::random_masking(
                    1,
                    g * g,
                    method.mask_ratio(),
                    &mut seeded(i, 1),
                );
                let x = tensor(crate::augment::normalize(view, mean, std).data);
                let (pred, _) = method.predict(x.clone(), &masking);
                // norm_pix_loss predicts normalised patches: shown with the true patches' mean and
                // variance, as the official visualisation does.
                let pred = if method.norm_pix_loss() {
                    let raw = crate::methods::mae::patchify(x.clone(), p);
                    pred * (raw.clone().var(2) + 1e-6).sqrt() + raw.mean_dim(2)
                } else {
                    pred
                };
                let recon = crate::methods::mae::unpatchify(pred, p);
                let hidden: Vec<bool> = (0..size * size)
                    .map(|k| masking.mask[0][(k / size / p) * g + (k % size) / p] > 0.5)
                    .collect();
                let m: Vec<f32> = hidden
                    .iter()
                    .map(|&h| h as u8 as f32)
                    .collect::<Vec<_>>()
                    .repeat(3);
                let m = tensor(m);
                let pasted = recon.clone() * m.clone() + x * m.neg().add_scalar(1.0);
                rows.push(vec![
                    view.clone(),
                    crate::viz::hide(view, &hidden),
                    pixels(recon)?,
                    pixels(pasted)?,
                ]);
            }
        }
        other => bail!(
            "{} is a {} run: reconstruct needs an inpainting or MAE run",
            run.display(),
            other.name()
        ),
    }
    Ok(crate::viz::reconstruction_grid(&rows))
}

/// DINO-style attention pictures of a ViT run for `images`, each cut to its central square and
/// resized to `size` (rounded down to whole patches): see [`crate::viz::attention_row`].
pub fn attention(
    run: &Path,
    which: Option<Which>,
    images: &[PathBuf],
    size: u32,
    device: &Device,
) -> Result<RgbImage> {
    let (recipe, backbone, _) = crate::run::encoder(run, which, device)?;
    let Backbone::Vit(vit) = backbone.valid() else {
        bail!(
            "{} holds a ResNet: attention maps need a ViT",
            run.display()
        );
    };
    let p = vit.patch_size() as u32;
    if size < p {
        bail!("--size {size}: smaller than one of the ViT's {p}-px patches (use at least {p})");
    }
    let size = size / p * p;
    let g = (size / p) as usize;
    let eval = recipe.augment.eval_pipeline()?;
    let mut rows = Vec::new();
    for path in images {
        let img = std::fs::read(path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| crate::data::decode(&bytes, None))
            .with_context(|| format!("cannot read image {}", path.display()))?;
        let square = crate::augment::ops::center_square(img.width(), img.height());
        let view = crate::augment::ops::crop_resize(&img, square, size, size);
        let x = crate::augment::normalize(&view, eval.mean, eval.std).data;
        let x = Tensor::<4>::from_data(
            TensorData::new(x, [1, 3, size as usize, size as usize]),
            device,
        );
        let attn = vit.last_attention(x);
        let [_, heads, t, _] = attn.dims();
        // The class token's row, without its attention to itself and the registers:
        // [heads, g·g].
        let prefix = vit.prefix_tokens();
        let cls: Vec<f32> = attn
            .narrow(2, 0, 1)
            .narrow(3, prefix, t - prefix)
            .reshape([heads * (t - prefix)])
            .into_data()
            .try_to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let maps: Vec<Vec<f32>> = cls.chunks(g * g).map(|c| c.to_vec()).collect();
        rows.push(crate::viz::attention_row(&view, &maps, g, 0.6));
    }
    Ok(crate::viz::attention_grid(&rows))
}

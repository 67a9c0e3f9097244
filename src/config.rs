//! Recipes: TOML files that say what to train on and how. Every value is checked before work
//! starts, and an error names the file and the field at fault.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::augment::{Pipeline, Sizes, ViewSpec};
use crate::data::LoadOptions;
use crate::eval::finetune::FinetuneConfig;
use crate::eval::EvalConfig;
use crate::eval::LinearEvalConfig;
use crate::methods::{self, Feed, MethodConfig, METHODS};
use crate::models::{BackboneConfig, ResNetConfig, Stem};
use crate::train::{LrScaling, OptimConfig, OptimizerKind, TrainConfig};

/// `[data]`: where the images are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A folder or archive `Dataset::open` reads; the command line's `--data` overrides it.
    pub source: Option<PathBuf>,
    pub train_split: String,
    pub test_split: String,
    /// Train on this many images of the train split, spread over it (0: all): quick runs.
    pub train_limit: usize,
    pub load_size: Option<u32>,
    pub skip_bad: bool,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            source: None,
            train_split: "train".into(),
            test_split: "test".into(),
            train_limit: 0,
            load_size: None,
            skip_bad: false,
        }
    }
}

impl DataConfig {
    /// Refuses a `load_size` that would shrink every image to nothing.
    pub fn check(&self) -> Result<()> {
        if self.load_size == Some(0) {
            bail!("data.load_size = 0: must be at least 1 px (unset: images as they are)");
        }
        Ok(())
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            load_size: self.load_size,
            skip_bad: self.skip_bad,
        }
    }
}

/// `[augment]`: a named pipeline to start from, its sizes, and optionally every view spelled out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// One of `augment::PRESETS`.
    pub pipeline: String,
    pub size: u32,
    /// Local crop side and count for `dino` (default: half the size, 6 crops).
    pub local_size: Option<u32>,
    pub local_crops: Option<usize>,
    /// Replaces the preset's views entirely (`[[augment.views]]` tables).
    pub views: Option<Vec<ViewSpec>>,
    /// `false` turns Gaussian blur off in every view: the presets' σ (0.1-2 px) is made for
    /// 224 px images, and the CIFAR settings of SimCLR and solo-learn leave blur out.
    pub blur: bool,
    /// Normalisation (default: ImageNet's statistics).
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            pipeline: "simclr".into(),
            size: 32,
            local_size: None,
            local_crops: None,
            views: None,
            blur: true,
            mean: None,
            std: None,
        }
    }
}

impl AugmentConfig {
    /// The deterministic pipeline features are extracted with: the central square at `size`,
    /// normalised like the training views.
    pub fn eval_pipeline(&self) -> Result<Pipeline> {
        let train = self.build()?;
        let mut p = Pipeline::preset("eval", Sizes::small(self.size))?;
        (p.mean, p.std) = (train.mean, train.std);
        Ok(p)
    }

    pub fn build(&self) -> Result<Pipeline> {
        if self.size == 0 {
            bail!("augment.size = 0: a view needs at least one pixel");
        }
        let small = Sizes::small(self.size);
        let sizes = Sizes {
            size: self.size,
            local_size: self.local_size.unwrap_or(small.local_size),
            local_crops: self.local_crops.unwrap_or(small.local_crops),
        };
        let mut p = Pipeline::preset(&self.pipeline, sizes).context("augment.pipeline")?;
        if let Some(views) = &self.views {
            p.views = views.clone();
        }
        if !self.blur {
            p.views.iter_mut().for_each(|v| v.blur.p = 0.0);
        }
        p.mean = self.mean.unwrap_or(p.mean);
        p.std = self.std.unwrap_or(p.std);
        p.check()?;
        Ok(p)
    }
}

impl Default for BackboneConfig {
    fn default() -> Self {
        BackboneConfig::Resnet(ResNetConfig {
            depth: 18,
            stem: Stem::Cifar,
            width: 1.0,
            init: None,
            conv_init: Default::default(),
        })
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 100,
            batch_size: 256,
            accumulate: 1,
            optim: OptimConfig {
                optimizer: OptimizerKind::Lars,
                weight_decay: 1e-6,
                momentum: 0.9,
                betas: [0.9, 0.999],
                eta: 0.001,
                ..OptimConfig::default()
            },
            base_lr: 0.3,
            lr_scaling: LrScaling::Linear,
            warmup_epochs: 10.0,
            warmup_fraction: None,
            final_lr: 0.0,
            checkpoint_every: 10,
            monitor_every: 0,
            precision: Default::default(),
            loss_scale: None,
        }
    }
}

/// A whole recipe file: `seed` and the sections `[data]`, `[augment]`, `[method]`, `[model]`,
/// `[train]`, `[eval]`, `[linear_eval]`, `[finetune]`. A recipe file may leave out any key: it then takes the value
/// of its method's published recipe ([`Recipe::defaults`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    pub seed: u64,
    pub data: DataConfig,
    pub augment: AugmentConfig,
    pub method: MethodConfig,
    pub model: BackboneConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    #[serde(default)]
    pub linear_eval: LinearEvalConfig,
    #[serde(default)]
    pub finetune: FinetuneConfig,
}

/// The published recipe of `method` ([`MethodSpec::PUBLISHED`](crate::methods::MethodSpec)):
/// (file stem under recipes/, text). Its values are the defaults of every key a user's recipe
/// leaves out.
fn published(method: &str) -> Result<(&'static str, &'static str)> {
    methods::published(method)
        .with_context(|| format!("unknown method '{method}' (known: {})", METHODS.join(", ")))
}

/// The method a recipe without `[method] name` trains.
const DEFAULT_METHOD: &str = "simclr";

impl Recipe {
    /// The complete recipe of `method` (one of [`METHODS`]): its published recipe
    /// (`recipes/<method>_cifar10.toml`, MoCo v2 for `moco`) without a data source.
    pub fn defaults(method: &str) -> Result<Recipe> {
        let (_, text) = published(method)?;
        let mut recipe: Recipe =
            toml::from_str(text).with_context(|| format!("the published {method} recipe"))?;
        recipe.data.source = None;
        Ok(recipe)
    }

    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("recipe {}", path.display()))
    }

    /// Reads the `recipe.toml` that `pretrain` wrote whole into a run folder, as it is (a key
    /// unset there, `grad_clip`, stays unset rather than taking its method's default), and
    /// checks it as [`parse`](Self::parse) does: a hand-edited value is named, never reaches a
    /// constructor.
    pub fn load_saved(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe {}", path.display()))?;
        let recipe: Recipe =
            toml::from_str(&text).with_context(|| format!("recipe {}", path.display()))?;
        recipe
            .check()
            .with_context(|| format!("recipe {}", path.display()))?;
        Ok(recipe)
    }

    /// Reads a recipe, taking every key it leaves out from its method's [`defaults`](Self::defaults),
    /// and checks it.
    pub fn parse(text: &str) -> Result<Recipe> {
        let given: toml::Table = toml::from_str(text)?;
        let method = match given.get("method").and_then(|m| m.get("name")) {
            Some(toml::Value::String(name)) => name.as_str(),
            Some(other) => anyhow::bail!("method.name = {other}: must be a string"),
            None => DEFAULT_METHOD,
        };
        let mut full = toml::Table::try_from(Recipe::defaults(method).context("method.name")?)?;
        // A ViT's positional embeddings follow a new `augment.size` unless the recipe sets
        // `model.image_size` itself.
        let size = given.get("augment").and_then(|a| a.get("size")).cloned();
        let image_size_given = given
            .get("model")
            .is_some_and(|m| m.get("image_size").is_some());
        for (section, value) in given {
            match (full.get_mut(&section), value) {
                (Some(toml::Value::Table(defaults)), toml::Value::Table(table)) => {
                    forget_other_choices(&section, defaults, &table)?;
                    defaults.extend(table);
                }
                (_, value) => {
                    full.insert(section, value);
                }
            }
        }
        if let (Some(size), false) = (size, image_size_given) {
            if let Some(model) = full.get_mut("model").and_then(|m| m.as_table_mut()) {
                if model.get("arch").and_then(|a| a.as_str()) == Some("vit") {
                    model.insert("image_size".into(), size);
                }
            }
        }
        let recipe = complete(&full)?;
        recipe.check()?;
        Ok(recipe)
    }

    /// Checks every section, and that the method gets the views and batches it needs and the
    /// model every image size it will see; the error names the field at fault.
    pub fn check(&self) -> Result<()> {
        self.data.check()?;
        let pipeline = self.augment.build()?;
        self.model.check()?;
        self.train.check()?;
        self.eval.check()?;
        self.linear_eval.check()?;
        self.finetune.check()?;
        // Every size that reaches the model: the training views, and `augment.size` for
        // evaluation, fine-tuning and reconstructions.
        for (i, view) in pipeline.views.iter().enumerate() {
            let key = match &self.augment.views {
                Some(_) => format!("augment.views[{i}].size"),
                None if view.size == self.augment.size => "augment.size".into(),
                None => "augment.local_size".into(),
            };
            self.model.check_input(view.size, &key)?;
        }
        self.model.check_input(self.augment.size, "augment.size")?;
        crate::dist::check_batch("train.batch_size", self.train.batch_size)?;
        let world = crate::dist::world().size();
        self.method.check(&Feed {
            model: &self.model,
            view_sizes: pipeline.view_sizes(),
            size: self.augment.size,
            batch: self.train.batch_size,
            world,
        })
    }
}

/// Refuses `key = value` unless the value is a finite number above 0.
pub fn positive<T: Into<f64> + Display + Copy>(key: &str, value: T) -> Result<()> {
    let v: f64 = value.into();
    if !(v > 0.0 && v.is_finite()) {
        bail!("{key} = {value}: must be a positive number");
    }
    Ok(())
}

/// Refuses `key = value` unless the value is a finite number, 0 or above.
pub fn not_negative<T: Into<f64> + Display + Copy>(key: &str, value: T) -> Result<()> {
    let v: f64 = value.into();
    if !(v >= 0.0 && v.is_finite()) {
        bail!("{key} = {value}: must be a number, 0 or above");
    }
    Ok(())
}

/// Refuses `key = value` unless the value lies in [0, 1) (a rate, a momentum, a β).
pub fn fraction<T: Into<f64> + Display + Copy>(key: &str, value: T) -> Result<()> {
    if !(0.0..1.0).contains(&value.into()) {
        bail!("{key} = {value}: must lie in [0, 1)");
    }
    Ok(())
}

/// Refuses `key = value` unless the value lies in [0, 1].
pub fn probability<T: Into<f64> + Display + Copy>(key: &str, value: T) -> Result<()> {
    if !(0.0..=1.0).contains(&value.into()) {
        bail!("{key} = {value}: a probability must lie in [0, 1]");
    }
    Ok(())
}

/// Refuses `key = 0`: a count that must be at least 1.
/// Refuses an EMA momentum outside [0, 1], naming `key`.
pub fn momentum(key: &str, value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&value) {
        bail!("{key} = {value}: an EMA momentum lies in [0, 1]");
    }
    Ok(())
}

pub fn at_least_one(key: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{key} = 0: must be at least 1");
    }
    Ok(())
}

/// The keys (or whole sections) that a resumed run may change: they decide where the images
/// are read from (the images themselves are compared by count), how long the schedule runs, and
/// how the run is checkpointed, watched and evaluated, not what any step it continues computes.
const FREE_ON_RESUME: &[&str] = &[
    "data.source",
    "train.epochs",
    "train.checkpoint_every",
    "train.monitor_every",
    "eval",
    "linear_eval",
    "finetune",
];

impl Recipe {
    /// Every key whose value differs between `before` (a run folder's saved recipe) and this
    /// recipe, as `key: before → now`, leaving out [`FREE_ON_RESUME`]; a key set in one recipe
    /// only shows as `unset`.
    pub fn changes_from(&self, before: &Recipe) -> Result<Vec<String>> {
        let (mut old, mut new) = (vec![], vec![]);
        flatten("", &toml::Value::try_from(before)?, &mut old);
        flatten("", &toml::Value::try_from(self)?, &mut new);
        let mut keys: Vec<&String> = old.iter().chain(&new).map(|(k, _)| k).collect();
        keys.sort();
        keys.dedup();
        let value = |list: &[(String, String)], key: &str| {
            list.iter()
                .find(|(k, _)| k == key)
                .map_or("unset".to_string(), |(_, v)| v.clone())
        };
        Ok(keys
            .into_iter()
            .filter(|key| {
                !FREE_ON_RESUME
                    .iter()
                    .any(|free| *key == free || key.starts_with(&format!("{free}.")))
            })
            .filter_map(|key| {
                let (a, b) = (value(&old, key), value(&new, key));
                (a != b).then(|| format!("{key}: {a} → {b}"))
            })
            .collect())
    }
}

/// `value`'s leaves as (dotted key, TOML text): tables are walked, arrays (views) kept whole.
fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let key = match prefix {
                    "" => key.clone(),
                    p => format!("{p}.{key}"),
                };
                flatten(&key, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.to_string())),
    }
}

/// The recipe a complete table holds. A wrong value is named with its key: the table is read
/// back as TOML text, whose error points into that text.
fn complete(full: &toml::Table) -> Result<Recipe> {
    let text = toml::to_string(full)?;
    toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(0, |s| s.start).min(text.len());
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let line = text[line_start..].lines().next().unwrap_or("");
        let section = text[..line_start]
            .lines()
            .rev()
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']'));
        let place = match (line.starts_with('['), line.split_once(" = "), section) {
            (true, _, _) => line.trim_matches(|c| c == '[' || c == ']').to_string(),
            (false, Some((key, value)), Some(section)) => format!("{section}.{key} = {value}"),
            (false, Some((key, value)), None) => format!("{key} = {value}"),
            (false, None, _) => line.to_string(),
        };
        anyhow::anyhow!("{place}: {}", e.message().trim())
    })
}

/// Removes from a section's `defaults` what belongs to another choice than the one `given`
/// makes, so that a recipe choosing otherwise does not inherit it: the model of another `arch`
/// (replaced by that architecture's defaults), another optimiser's settings (DINO with SGD gets no
/// AdamW betas), the published warm-up in epochs where the recipe gives it as a fraction, and
/// with another pipeline or size the published recipe's spelled-out views and local-crop size
/// (then the pipeline's own, at that size).
fn forget_other_choices(
    section: &str,
    defaults: &mut toml::Table,
    given: &toml::Table,
) -> Result<()> {
    let differs = |key: &str| given.get(key).is_some_and(|v| defaults.get(key) != Some(v));
    let (arch, optimizer) = (differs("arch"), differs("optimizer"));
    let (pipeline, size) = (differs("pipeline"), differs("size"));
    let forget = |defaults: &mut toml::Table, keys: &[&str]| {
        keys.iter().for_each(|k| drop(defaults.remove(*k)));
    };
    match section {
        "model" if arch => {
            if let Some(model) = given["arch"].as_str().and_then(BackboneConfig::default_for) {
                *defaults = toml::Table::try_from(model)?;
            }
        }
        "train" => {
            if optimizer {
                forget(
                    defaults,
                    &["momentum", "betas", "eta", "final_weight_decay"],
                );
            }
            if given.contains_key("warmup_fraction") {
                forget(defaults, &["warmup_epochs"]);
            }
        }
        "augment" => {
            if pipeline {
                forget(defaults, &["local_crops"]);
            }
            if pipeline || size {
                forget(defaults, &["views", "local_size"]);
            }
        }
        _ => {}
    }
    Ok(())
}

/// One line of help for each recipe key, by `section.key` (views: `augment.views.key`), and for
/// the keys that may stay unset, an example shown commented out. `method.name`'s comes from the
/// registry ([`key_doc`]).
const KEYS: &[(&str, &str, Option<&str>)] = &[
    ("seed", "fixes every random draw: initialisation, shuffles, views, masks", None),
    ("data.source", "cifar10, cifar100, fashion-mnist (found in $SELFSUP_DATA or downloaded), or a path: a CIFAR binary release, idx files, an image folder / .tar(.gz) of one; --data overrides it", Some("\"cifar10\"")),
    ("data.train_split", "split to pre-train on", None),
    ("data.test_split", "labelled split the kNN is measured on", None),
    ("data.train_limit", "pre-train on this many images spread over the split (0: all)", None),
    ("data.load_size", "shrink images whose shorter side is longer, once, at load", Some("256")),
    ("data.skip_bad", "skip and count unreadable image files instead of stopping", None),
    ("augment.pipeline", "named views: simclr, moco_v1, moco_v2, byol, dino, mae, eval (`selfsup pipeline NAME` prints one)", None),
    ("augment.size", "side of the (global) views, and of evaluation views, in pixels", None),
    ("augment.local_size", "dino: side of the local crops (unset: half of size)", Some("16")),
    ("augment.local_crops", "dino: local crops per image (unset: 6)", Some("6")),
    ("augment.blur", "false: no Gaussian blur in any view (the presets' sigma is made for 224 px; CIFAR recipes turn it off)", None),
    ("augment.mean", "per-channel normalisation mean (the published recipes: CIFAR-10's; unset: ImageNet's)", Some("[0.485, 0.456, 0.406]")),
    ("augment.std", "per-channel normalisation std (the published recipes: CIFAR-10's; unset: ImageNet's)", Some("[0.229, 0.224, 0.225]")),
    ("augment.views.count", "how many views of this kind each image gets", None),
    ("augment.views.size", "view side in pixels", None),
    ("augment.views.scale", "RandomResizedCrop area fraction; [1, 1]: the central square, nothing random", None),
    ("augment.views.ratio", "RandomResizedCrop aspect-ratio range", None),
    ("augment.views.flip", "probability of a horizontal flip", None),
    ("augment.views.grayscale", "probability of turning the view grey", None),
    ("augment.views.solarize", "probability of solarizing", None),
    ("augment.views.interpolation", "filter resizing the crop: bilinear (SimCLR, MoCo) or bicubic (DINO, MAE)", None),
    ("augment.views.antialias", "widen the filter where the crop is shrunk (PIL's and torchvision's default); false: a grid_sample-like resize", None),
    ("augment.views.jitter.p", "probability of colour jitter", None),
    ("augment.views.jitter.brightness", "jitter strength (torchvision ColorJitter)", None),
    ("augment.views.jitter.contrast", "jitter strength", None),
    ("augment.views.jitter.saturation", "jitter strength", None),
    ("augment.views.jitter.hue", "jitter strength, in [0, 0.5]", None),
    ("augment.views.blur.p", "probability of a Gaussian blur", None),
    ("augment.views.blur.sigma", "blur sigma range, in pixels", None),
    ("augment.views.blur.kernel_frac", "blur kernel side as a fraction of the view side", None),
    ("method.temperature", "τ of the InfoNCE / NT-Xent softmax (swav: of the softmax over prototype scores)", None),
    ("method.proj_hidden", "hidden width of the projection head (moco: 0 gives v1's linear head; simclr unset: the encoder's feature width, as the official code)", Some("2048")),
    ("method.proj_layers", "linear layers of the projection head (simclr: 2 in SimCLR v1, 3 in v2)", None),
    ("method.pred_hidden", "byol, simsiam, moco_v3: hidden width of the predictor", None),
    ("method.fix_pred_lr", "simsiam: train the predictor at the peak learning rate, outside the schedule (the official --fix-pred-lr)", None),
    ("method.freeze_patch_embed", "moco_v3: a ViT's patch projection stays at its random init (the official --stop-grad-conv1)", None),
    ("method.lambda", "barlow_twins: λ, the weight of the off-diagonal (redundancy) terms", None),
    ("method.scale_loss", "barlow_twins: a factor on the whole loss", None),
    ("method.sim_coeff", "vicreg: λ, the weight of the invariance (MSE) term", None),
    ("method.std_coeff", "vicreg: μ, the weight of the variance (std hinge) term", None),
    ("method.cov_coeff", "vicreg: ν, the weight of the covariance term", None),
    ("method.proj_output_norm", "simclr: batch norm without shift on the head's output (the official head)", None),
    ("method.proj_dim", "output width of the projection head", None),
    ("method.momentum", "EMA momentum of the key encoder / teacher / target at the start", None),
    ("method.final_momentum", "EMA momentum at the end, reached by a cosine (equal to momentum: constant)", Some("1.0")),
    ("method.queue_size", "moco: K, negatives kept from earlier batches; swav: embeddings of earlier batches that join Sinkhorn's samples (0: none)", None),
    ("method.prototypes", "swav: K, the number of prototypes", None),
    ("method.epsilon", "swav: ε, Sinkhorn-Knopp's entropy regularisation (smaller: sharper codes)", None),
    ("method.sinkhorn_iterations", "swav: Sinkhorn-Knopp iterations", None),
    ("method.freeze_prototypes_epochs", "swav: epochs during which the prototypes do not learn", None),
    ("method.epoch_queue_starts", "swav: the epoch from which the queue fills (it joins the codes once full)", None),
    ("method.symmetric", "both views serve as queries and keys", None),
    ("method.bn_splits", "batch-norm groups (shuffle-BN on one device)", None),
    ("method.mask_ratio", "fraction of the patches hidden from the encoder", None),
    ("method.decoder_dim", "width of MAE's decoder", None),
    ("method.decoder_depth", "blocks of MAE's decoder", None),
    ("method.decoder_heads", "attention heads of MAE's decoder", None),
    ("method.norm_pix_loss", "predict each patch normalised by its own mean and std", None),
    ("method.out_dim", "K, dimensions of DINO's output softmax", None),
    ("method.hidden", "hidden width of the head", None),
    ("method.bottleneck", "width before DINO's weight-normalised last layer", None),
    ("method.norm_last_layer", "fix the norm of DINO's last layer weights", None),
    ("method.head_batch_norm", "batch norm in the DINO head's hidden layers", None),
    ("method.student_temp", "τs of the student softmax", None),
    ("method.teacher_temp", "τt after its warm-up", None),
    ("method.warmup_teacher_temp", "τt at the start", None),
    ("method.warmup_teacher_temp_epochs", "epochs over which τt rises linearly", None),
    ("method.center_momentum", "EMA momentum of the teacher's centre", None),
    ("method.freeze_last_layer", "epochs during which the head's last layer does not learn", None),
    ("method.selection", "jigsaw: permutations by largest mean (max_mean, Noroozi's script) or minimum (max_min) Hamming distance", None),
    ("method.tile_jitter", "jigsaw: each tile's channels shifted by up to this many grey levels (the PyTorch port's rgb_jittering; 0: off)", None),
    ("method.drop_path", "dino: stochastic depth of a ViT student, rising over the blocks to this rate (the teacher has none)", None),
    ("method.permutations", "P, jigsaw permutations (classes)", None),
    ("method.tile", "side of each jigsaw tile in pixels", None),
    ("method.mask", "inpainting region: central, random_block or random_region", None),
    ("method.area", "fraction of the image hidden", None),
    ("method.lambda_rec", "weight of the reconstruction loss", None),
    ("method.lambda_adv", "weight of the adversarial loss", None),
    ("method.width", "inpainting: channels of the decoder's last and the discriminator's first layer (doubling inwards)", None),
    ("method.bottleneck_layer", "inpainting: decoder start from the encoder's map: conv (the released code: a 4000-d code over the whole map), channel_wise (the paper's channel-wise fully connected layer) or pooled (its global mean)", None),
    ("method.bottleneck_dim", "inpainting: width of the conv bottleneck", None),
    ("method.overlap", "inpainting: band of visible pixels around the hole that L_rec weighs too, in px (train.lua: 4 at 128 px; the image side or more: the whole image, as train_random.lua)", None),
    ("method.overlap_weight", "inpainting: weight of that band in L_rec (hidden pixels weigh 1)", None),
    ("method.adversary", "inpainting: what D judges: output (the generator's raw painting, the paper and released code) or completed (real pixels outside the hole)", None),
    ("method.discriminator_lr", "inpainting: D's learning rate as a fraction of G's (the released code: 0.1)", None),
    ("model.arch", "resnet or vit", None),
    ("model.depth", "resnet: 18, 34 or 50; vit: transformer blocks", None),
    ("model.stem", "resnet: cifar (3x3, no max-pool) or imagenet (7x7 and max-pool)", None),
    ("model.width", "resnet: channel multiplier", None),
    ("model.conv_init", "resnet: random init of the convolutions: torchvision (the default; Kaiming normal, fan-out: the official MoCo, DINO and solo-learn code) or pytorch (nn.Conv2d's default, U(±1/√fan_in); the SimCLR and MoCo v2 CPU recipes use it, measured there: BENCHMARKS.md, issue 30's fourteenth round)", Some("\"pytorch\"")),
    ("model.image_size", "vit: the image side its positional embeddings are made for", None),
    ("model.patch_size", "vit: patch side; it must divide every view size", None),
    ("model.dim", "vit: token width", None),
    ("model.heads", "vit: attention heads", None),
    ("model.mlp_ratio", "vit: MLP width over token width", None),
    ("model.pool", "vit features: cls (class token) or mean (mean patch token)", None),
    ("model.registers", "vit: register tokens after the class token (DINOv2 with registers: 4)", None),
    ("model.layer_scale", "vit: LayerScale on each residual branch, γ starting at this value (DINOv2 1e-5, DeiT-III 1e-6; unset: none)", None),
    ("model.no_embed_class", "vit: position embeddings for the patches only, none for the class token (timm's no_embed_class: DeiT-III)", None),
    ("model.init", "start from these weights, not a random init: a run folder (its released encoder) or a PyTorch file (.safetensors, .pth) with torchvision / timm names; the architecture above must match it", Some("\"runs/imported\"")),
    ("train.epochs", "passes over the train split", None),
    ("train.batch_size", "images per forward pass", None),
    ("train.accumulate", "passes summed into one step; gives a contrastive loss no extra negatives", None),
    ("train.optimizer", "lars, sgd or adamw", None),
    ("train.weight_decay", "L2 / decoupled weight decay (not on biases and norms)", None),
    ("train.momentum", "sgd / lars momentum", None),
    ("train.betas", "adamw (β1, β2)", None),
    ("train.eta", "lars trust coefficient", None),
    ("train.grad_clip", "clip each parameter's gradient to this l2 norm (0: no clipping)", Some("3.0")),
    ("train.final_weight_decay", "adamw: weight decay at the end, by a cosine", Some("0.4")),
    ("train.base_lr", "peak learning rate before scaling by the batch", None),
    ("train.lr_scaling", "linear (× batch / 256), sqrt (× √batch) or none", None),
    ("train.warmup_epochs", "linear warm-up before the cosine decay", None),
    ("train.warmup_fraction", "the warm-up as a fraction of the run's steps instead of warmup_epochs (which it replaces), kept when --epochs changes the run", Some("0.1")),
    ("train.final_lr", "learning rate at the end of the cosine (absolute; at most the peak lr)", None),
    ("train.checkpoint_every", "epochs between checkpoints (and always at the end)", None),
    ("train.monitor_every", "epochs between online kNN checks (0: never)", None),
    ("train.precision", "dtype of matmuls and convolutions: f32, bf16 or f16 (autocast; weights, optimiser state, norms, softmax and losses stay f32; bf16 on a CPU with Intel AMX or AVX-512 BF16 (Zen 4) runs on it, faster than f32)", Some("\"bf16\"")),
    ("train.loss_scale", "f16: starting loss scale (GradScaler's init_scale; unset: 65536), halved on a step with inf/NaN gradients, which is skipped", Some("1024.0")),
    ("eval.knn_k", "neighbours of the weighted kNN vote", None),
    ("eval.knn_t", "temperature of the vote weights exp(s / T)", None),
    ("eval.monitor_train", "train images of the online kNN bank (0: all)", None),
    ("eval.monitor_test", "test images of the online kNN (0: all)", None),
    ("eval.linear_epochs", "epochs of the quick linear probe (AdamW on fixed centre-crop features, `eval linear --quick`)", None),
    ("eval.linear_lr", "learning rate of the quick linear probe", None),
    ("eval.batch_size", "images per pass when extracting features", None),
    ("linear_eval.epochs", "epochs of the papers' linear evaluation (`selfsup eval linear`)", None),
    ("linear_eval.batch_size", "images per step", None),
    ("linear_eval.optimizer", "sgd (momentum 0.9: DINO, MoCo, SimCLR) or lars (MAE)", None),
    ("linear_eval.base_lr", "peak lr before × batch / 256", None),
    ("linear_eval.weight_decay", "weight decay of the classifier", None),
    ("linear_eval.warmup_epochs", "linear warm-up (MAE: 10)", None),
    ("linear_eval.schedule", "cosine (per step: SimCLR, MAE), epoch_cosine (once an epoch: DINO) or step (x0.1 at each milestone: MoCo)", None),
    ("linear_eval.milestones", "epochs from which the step schedule multiplies the lr by 0.1 (MoCo: 60, 80)", None),
    ("linear_eval.last_blocks", "vit: class tokens of the last N blocks, concatenated (DINO ViT-S: 4; 1: the encoder's features)", None),
    ("linear_eval.stage", "resnet: the stage (1-4) whose pooled output is classified (4: the encoder's features; RotNet prefers an intermediate one)", None),
    ("linear_eval.batch_norm", "batch norm without affine parameters before the classifier (MAE)", None),
    ("linear_eval.train_limit", "labelled images used (0: all)", None),
    ("finetune.epochs", "fine-tuning epochs", None),
    ("finetune.batch_size", "images per step", None),
    ("finetune.base_lr", "peak lr before × batch / 256", None),
    ("finetune.layer_decay", "lr scale per layer from the top (ViT)", None),
    ("finetune.weight_decay", "AdamW weight decay", None),
    ("finetune.warmup_epochs", "linear warm-up", None),
    ("finetune.train_limit", "labelled images used (0: all)", None),
    ("finetune.drop_path", "stochastic depth rate of a ViT's blocks (MAE: 0.1)", None),
    ("finetune.label_smoothing", "label smoothing of the cross-entropy (MAE: 0.1)", None),
    ("finetune.mixup", "mixup's Beta(α, α) over the batch (MAE: 0.8; 0: off)", None),
    ("finetune.cutmix", "CutMix's Beta(α, α) (MAE: 1.0; 0: off)", None),
    ("finetune.mixup_switch_prob", "with both on, the chance a batch takes CutMix (0.5)", None),
    ("finetune.random_erasing", "chance of erasing a random rectangle of each image (MAE: 0.25)", None),
    ("finetune.rand_augment.n", "RandAugment operations per fine-tuning view (MAE: 2; 0: off)", None),
    ("finetune.rand_augment.m", "their magnitude, of 10 (MAE: 9)", None),
    ("finetune.rand_augment.mstd", "the spread of that magnitude (MAE: 0.5)", None),
    ("augment.views.rand_augment.n", "RandAugment operations after the flip (0: off)", None),
    ("augment.views.rand_augment.m", "their magnitude, of 10", None),
    ("augment.views.rand_augment.mstd", "the spread of that magnitude", None),
];

/// The complete recipe of `method` ([`Recipe::defaults`]) as TOML with a comment on every key;
/// the keys that are unset by default close their section, commented out.
pub fn commented_defaults(method: &str) -> Result<String> {
    let (file, _) = published(method)?;
    let mut table = toml::Table::try_from(Recipe::defaults(method)?)?;
    table.iter_mut().for_each(|(_, v)| shortest_floats(v));
    let text = toml::to_string(&table)?;
    let mut out = format!(
        "# The {method} recipe with every key at its default: the values of recipes/{file}.toml\n\
         # (the paper's settings at CIFAR-10 scale), without its data source.\n\
         # A recipe may leave out any key: it then takes the value shown here.\n"
    );
    let mut section = String::new();
    let mut seen: Vec<String> = vec![];
    // Whether this recipe takes `key` at `example` (`method.*` keys belong to one method or
    // another; `final_weight_decay` to AdamW).
    let takes = |key: &str, example: &str| -> bool {
        let (Some((section, name)), Ok(value)) = (
            key.split_once('.'),
            toml::from_str::<toml::Table>(&format!("v = {example}")),
        ) else {
            return false;
        };
        let mut with = table.clone();
        match with.get_mut(section).and_then(|s| s.as_table_mut()) {
            Some(s) if !name.contains('.') => drop(s.insert(name.into(), value["v"].clone())),
            _ => return true,
        }
        complete(&with).and_then(|r| r.check()).is_ok()
    };
    // The keys of `section` that may stay unset and were not printed, commented out.
    let close = |section: &str, seen: &mut Vec<String>, out: &mut String| {
        for (key, doc, example) in KEYS {
            let in_section = key.rsplit_once('.').map_or("", |(s, _)| s) == section;
            let offered = in_section && !seen.iter().any(|s| s == key);
            if let Some(example) = example.filter(|e| offered && takes(key, e)) {
                let name = key.rsplit('.').next().unwrap_or(key);
                out.push_str(&format!(
                    "# {doc} (unset by default)\n# {name} = {example}\n"
                ));
                seen.push(key.to_string());
            }
        }
    };
    for line in text.lines() {
        if line.is_empty() || line.starts_with('[') {
            close(&section, &mut seen, &mut out);
        }
        if line.starts_with('[') {
            section = line.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if let Some((key, _)) = line.split_once(" = ") {
            let full = match section.as_str() {
                "" => key.to_string(),
                s => format!("{s}.{key}"),
            };
            let doc = key_doc(&full).unwrap_or_else(|| "(undocumented)".into());
            out.push_str(&format!("# {doc}\n"));
            seen.push(full);
        }
        out.push_str(line);
        out.push('\n');
    }
    close(&section, &mut seen, &mut out);
    Ok(out)
}

/// The help line of recipe key `key` ([`KEYS`]; `method.name`: the registry's methods).
fn key_doc(key: &str) -> Option<String> {
    match key {
        "method.name" => Some(methods::names_listed()),
        _ => KEYS
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, doc, _)| doc.to_string()),
    }
}

/// Floats that are `f32` settings written as their shortest `f32` decimal (0.4914, not
/// 0.49140000343322754): the same value once read back.
fn shortest_floats(value: &mut toml::Value) {
    match value {
        toml::Value::Float(v) if (*v as f32) as f64 == *v => {
            *v = (*v as f32).to_string().parse().unwrap_or(*v);
        }
        toml::Value::Array(items) => items.iter_mut().for_each(shortest_floats),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| shortest_floats(v)),
        _ => {}
    }
}

//! Self-supervised methods, one file each, each reading like its paper.
//!
//! The registry below (`methods!`) lists them, one line a method, as solo-learn's `METHODS`
//! dictionary does: everything that lists or dispatches on methods reads it ([`MethodConfig`],
//! [`METHODS`], [`published`], [`with_method`]): recipes and their defaults, key help, the CLI,
//! the tests, training, loading a run.
//!
//! To add a method `NAME`:
//! - `methods/NAME.rs`: its settings (`NameConfig`: serde, `deny_unknown_fields`, defaults), its
//!   module and its [`Method`] impl, and [`MethodSpec`] for its settings (published recipe,
//!   checks, views, encoder names, constructor from an [`InitContext`]);
//! - `recipes/NAME_cifar10.toml`: its published recipe, the default of every key;
//! - here: `pub mod NAME;`, its `pub use`, and its line in `methods!`;
//! - `config.rs`'s `KEYS`: one line of help for each of its recipe keys that no other method has.

pub mod barlow_twins;
pub mod byol;
pub mod dino;
pub mod inpainting;
pub mod jigsaw;
pub mod mae;
pub mod moco;
pub mod moco_v3;
pub mod rotation;
pub mod simclr;
pub mod simsiam;
pub mod swav;
pub mod vicreg;

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::augment::{Augment, Pipeline};
use crate::config::Recipe;
use crate::models::{init_seeded, Backbone, BackboneConfig};
use crate::train::{Method, Which};
pub use barlow_twins::{BarlowTwins, BarlowTwinsConfig};
pub use byol::{Byol, ByolConfig};
pub use dino::{Dino, DinoConfig};
pub use inpainting::{Inpainting, InpaintingConfig};
pub use jigsaw::{Jigsaw, JigsawConfig};
pub use mae::{Mae, MaeConfig};
pub use moco::{Moco, MocoConfig};
pub use moco_v3::{MocoV3, MocoV3Config};
pub use rotation::{Rotation, RotationConfig};
pub use simclr::{SimClr, SimclrConfig};
pub use simsiam::{SimSiam, SimsiamConfig};
pub use swav::{Swav, SwavConfig};
pub use vicreg::{Vicreg, VicregConfig};

/// A method's settings (the `[method]` of a recipe), as the registry uses them. Each method's
/// config keeps its own `check`, `augment` and `init` with the arguments it needs (tests and
/// tools call them directly); its impl of this trait passes them on in one signature.
pub trait MethodSpec {
    /// The module it trains.
    type Method: Method;
    /// Its published recipe (the paper's settings at CIFAR-10 scale, citing its source):
    /// (file stem under `recipes/`, text), made by `recipe_file!("STEM")`.
    const PUBLISHED: (&'static str, &'static str);
    /// A momentum encoder beside the trained one: their names in the paper's terms (trained,
    /// momentum), as messages say them. `None`: one encoder.
    const ENCODERS: Option<[&'static str; 2]> = None;

    /// Checks the settings, and what the loss and layers need of every forward pass (views per
    /// image, their sizes, images per batch and per batch-norm group), against `feed`. The error
    /// names the recipe key at fault and why the method needs it.
    fn check(&self, feed: &Feed) -> Result<()>;

    /// What turns an image into the method's views: the recipe's pipeline itself (the
    /// joint-embedding methods), or built upon its first view (the pretext tasks).
    fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
        Arc::new(base)
    }

    /// The method, freshly initialised on `ctx.device` (the caller seeds burn's generator).
    fn init(&self, ctx: &InitContext) -> Self::Method;
}

/// `(file stem, text)` of the published recipe `recipes/STEM.toml`, for [`MethodSpec::PUBLISHED`].
macro_rules! recipe_file {
    ($stem:literal) => {
        (
            $stem,
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/recipes/",
                $stem,
                ".toml"
            )),
        )
    };
}
pub(crate) use recipe_file;

/// What any method's constructor may need, from the recipe: [`MethodSpec::init`].
pub struct InitContext<'a> {
    pub model: &'a BackboneConfig,
    /// The recipe's `seed` (Jigsaw draws its permutation set from it).
    pub seed: u64,
    /// `augment.size`: the side of the views (Inpainting's decoder and discriminator).
    pub size: usize,
    pub device: &'a Device,
}

impl<'a> InitContext<'a> {
    /// The context of `recipe` on `device`.
    pub fn of(recipe: &'a Recipe, device: &'a Device) -> Self {
        InitContext {
            model: &recipe.model,
            seed: recipe.seed,
            size: recipe.augment.size as usize,
            device,
        }
    }
}

/// The registry: one line a method, `"name" => Variant(Config)`, `name` as recipes spell it and
/// `Config` its [`MethodSpec`]. Makes [`MethodConfig`], [`METHODS`], and the `match`es that
/// dispatch on the method.
macro_rules! methods {
    ($($name:literal => $variant:ident($config:ty),)*) => {
        /// `[method]` of a recipe: `name` picks the method, the other keys are its settings.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "name")]
        pub enum MethodConfig {
            $(#[serde(rename = $name)] $variant($config),)*
        }

        /// Every method's `name`, in the registry's order.
        pub const METHODS: &[&str] = &[$($name),*];

        /// The published recipe of the method called `name`: (file stem under `recipes/`, text).
        pub fn published(name: &str) -> Option<(&'static str, &'static str)> {
            match name {
                $($name => Some(<$config as MethodSpec>::PUBLISHED),)*
                _ => None,
            }
        }

        impl MethodConfig {
            /// The `name` of the recipe's `[method]`.
            pub fn name(&self) -> &'static str {
                match self {
                    $(MethodConfig::$variant(_) => $name,)*
                }
            }

            /// See [`MethodSpec::check`].
            pub fn check(&self, feed: &Feed) -> Result<()> {
                match self {
                    $(MethodConfig::$variant(c) => MethodSpec::check(c, feed),)*
                }
            }

            /// See [`MethodSpec::augment`].
            pub fn augment(&self, base: Pipeline) -> Arc<dyn Augment> {
                match self {
                    $(MethodConfig::$variant(c) => MethodSpec::augment(c, base),)*
                }
            }

            /// See [`MethodSpec::ENCODERS`].
            fn encoders(&self) -> Option<[&'static str; 2]> {
                match self {
                    $(MethodConfig::$variant(_) => <$config as MethodSpec>::ENCODERS,)*
                }
            }
        }

        /// The recipe's method, freshly initialised (seeded by the recipe) on `device`, its
        /// encoder replaced by `start` if given (see [`Method::start_from`]). `f` receives it:
        /// methods are distinct types, so each caller is generic over [`Method`].
        pub fn with_method<R>(
            recipe: &Recipe,
            start: Option<Backbone>,
            device: &Device,
            f: impl MethodUser<R>,
        ) -> R {
            let ctx = InitContext::of(recipe, device);
            match &recipe.method {
                $(MethodConfig::$variant(c) => f.call(started(
                    init_seeded(device, ctx.seed, || MethodSpec::init(c, &ctx)),
                    start,
                )),)*
            }
        }
    };
}

methods! {
    "simclr" => Simclr(SimclrConfig),
    "moco" => Moco(MocoConfig),
    "mae" => Mae(MaeConfig),
    "dino" => Dino(DinoConfig),
    "rotation" => Rotation(RotationConfig),
    "jigsaw" => Jigsaw(JigsawConfig),
    "inpainting" => Inpainting(InpaintingConfig),
    "byol" => Byol(ByolConfig),
    "simsiam" => Simsiam(SimsiamConfig),
    "barlow_twins" => BarlowTwins(BarlowTwinsConfig),
    "vicreg" => Vicreg(VicregConfig),
    "moco_v3" => MocoV3(MocoV3Config),
    "swav" => Swav(SwavConfig),
}

impl MethodConfig {
    /// Whether the method keeps a momentum encoder beside the trained one (DINO, MoCo, BYOL).
    pub fn has_teacher(&self) -> bool {
        self.encoders().is_some()
    }

    /// How messages name encoder `which` of a run of this method: MoCo's query or key encoder,
    /// DINO's student or teacher ([`MethodSpec::ENCODERS`]), the one encoder of other methods,
    /// an imported one.
    pub fn encoder_name(&self, which: Which) -> &'static str {
        match (self.encoders(), which) {
            (_, Which::Imported) => which.name(),
            (Some([_, momentum]), Which::Teacher) => momentum,
            (Some([trained, _]), _) => trained,
            (None, _) => "encoder",
        }
    }
}

impl Default for MethodConfig {
    fn default() -> Self {
        MethodConfig::Simclr(SimclrConfig::default())
    }
}

/// The registry's names as a phrase: "simclr, moco, … or inpainting".
pub fn names_listed() -> String {
    match METHODS.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// `method`, its encoder replaced by `start` if given.
fn started<M: Method>(method: M, start: Option<Backbone>) -> M {
    match start {
        Some(weights) => method.start_from(weights),
        None => method,
    }
}

/// A caller of [`with_method`].
pub trait MethodUser<R> {
    fn call<M: Method>(self, method: M) -> R;
}

/// What a recipe feeds its method in one forward pass, for [`MethodConfig::check`].
pub struct Feed<'a> {
    pub model: &'a BackboneConfig,
    /// The side of each view of an image, in the order of the loss's `views`.
    pub view_sizes: Vec<u32>,
    /// `augment.size`: the side of the views of evaluation, fine-tuning and pictures.
    pub size: u32,
    /// `train.batch_size`: images per forward pass, over all ranks.
    pub batch: usize,
    /// The ranks that share each batch (1 in a lone process; see [`crate::dist`]).
    pub world: usize,
}

impl Feed<'_> {
    /// Refuses a pipeline that does not make exactly `n` views of each image.
    pub fn views(&self, method: &str, n: usize, why: &str) -> anyhow::Result<()> {
        let made = self.view_sizes.len();
        if made != n {
            bail!("augment: method {method} needs {n} view(s) of each image ({why}); this pipeline makes {made} (set augment.pipeline or [[augment.views]])");
        }
        Ok(())
    }

    /// Refuses views `range` of differing sizes (they go through the network as one batch).
    pub fn same_size(&self, method: &str, range: std::ops::Range<usize>) -> anyhow::Result<()> {
        let sizes = &self.view_sizes[range.clone()];
        if sizes.windows(2).any(|w| w[0] != w[1]) {
            bail!("augment: method {method} batches views {}..{} together, so they need one size; they are {sizes:?} px", range.start, range.end);
        }
        Ok(())
    }

    /// The checks of the two-view methods without negatives (BYOL, SimSiam, Barlow Twins,
    /// VICReg, MoCo v3): two views of one size, and two images or more for batch norm.
    pub fn pair(&self, method: &str) -> anyhow::Result<()> {
        self.views(method, 2, "one view predicts or matches the other")?;
        self.same_size(method, 0..2)?;
        self.min_batch(method, 2, "batch norm normalises over the batch")
    }

    /// Refuses a batch smaller than `n` images.
    pub fn min_batch(&self, method: &str, n: usize, why: &str) -> anyhow::Result<()> {
        if self.batch < n {
            bail!(
                "train.batch_size = {}: method {method} needs at least {n} images per batch ({why})",
                self.batch
            );
        }
        Ok(())
    }
}

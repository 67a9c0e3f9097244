//! Encoders (backbones) and the heads that methods put on them.

mod context;
mod ema;
mod heads;
mod resnet;
mod vit;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use context::{
    Bottleneck, ContextDecoder, ContextDecoderConfig, Discriminator, DiscriminatorConfig,
};
pub use ema::{ema_update, momentum_copy};
pub use heads::{
    plain_batch_norm, DinoHead, DinoHeadConfig, OutputNorm, ProjectionHead, ProjectionHeadConfig,
};
pub use resnet::{ConvInit, ResNet, ResNetConfig, Stem};
pub(crate) use vit::zero_bias_linear;
pub(crate) use vit::{block as vit_block, linear as vit_linear, xavier_linear};
pub use vit::{drop_path_masks, resize_positions, Pool, Vit, VitBlock, VitConfig, LAYER_NORM_EPS};

/// `[model]` of a recipe: which encoder to learn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum BackboneConfig {
    Resnet(ResNetConfig),
    Vit(VitConfig),
}

impl BackboneConfig {
    /// The CIFAR-scale model of an `arch` that a recipe names without its settings: ResNet-18
    /// with the CIFAR stem, or ViT-Tiny with 4-px patches at 32 px (timm's `vit_tiny` widths).
    pub fn default_for(arch: &str) -> Option<BackboneConfig> {
        match arch {
            "resnet" => Some(BackboneConfig::default()),
            "vit" => VitConfig::preset("tiny", 32, 4)
                .ok()
                .map(BackboneConfig::Vit),
            _ => None,
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        match self {
            BackboneConfig::Resnet(c) => c.check(),
            BackboneConfig::Vit(c) => c.check(),
        }
    }

    /// Refuses images of `size` px that the model would not see whole: a ViT cuts images into
    /// patches and would silently drop the border that no whole patch covers. `key` is the
    /// recipe key the size comes from. (Other sizes than `image_size` are fine: the positional
    /// embeddings are resized to the patch grid, as in DINO.)
    pub fn check_input(&self, size: u32, key: &str) -> anyhow::Result<()> {
        if let BackboneConfig::Vit(v) = self {
            let p = v.patch_size as u32;
            if size < p || size % p != 0 {
                anyhow::bail!(
                    "{key} = {size}: the ViT's {p}-px patches (model.patch_size) must tile it exactly; \
                     the last {} px of each row and column would be dropped (use a multiple of {p})",
                    size % p
                );
            }
        }
        Ok(())
    }

    /// `[model] init`: the weights training starts from instead of a random init, a run folder
    /// (its released encoder) or a PyTorch file (`.safetensors`, `.pth`) with torchvision / timm
    /// names, read by [`crate::run::weights`].
    pub fn weights(&self) -> Option<&std::path::Path> {
        match self {
            BackboneConfig::Resnet(c) => c.init.as_deref(),
            BackboneConfig::Vit(c) => c.init.as_deref(),
        }
    }

    /// Width of the features the backbone returns.
    pub fn feature_dim(&self) -> usize {
        match self {
            BackboneConfig::Resnet(c) => c.feature_dim(),
            BackboneConfig::Vit(c) => c.dim,
        }
    }

    /// Side of the square map [`Backbone::feature_map`] gives for `size`-px images: a ResNet
    /// halves the side (rounding up) at each stride-2 stage (3 with the CIFAR stem, 5 with the
    /// ImageNet one), a ViT has one position per patch.
    pub fn feature_grid(&self, size: usize) -> usize {
        match self {
            BackboneConfig::Resnet(c) => {
                let halvings = match c.stem {
                    Stem::Cifar => 3,
                    Stem::Imagenet => 5,
                };
                (0..halvings).fold(size, |side, _| side.div_ceil(2))
            }
            BackboneConfig::Vit(c) => size / c.patch_size,
        }
    }

    pub fn init(&self, device: &Device) -> Backbone {
        match self {
            BackboneConfig::Resnet(c) => Backbone::ResNet(c.init(device)),
            BackboneConfig::Vit(c) => Backbone::Vit(c.init(device)),
        }
    }
}

/// The encoder that is learned, evaluated and exported.
#[derive(Module, Debug)]
pub enum Backbone {
    ResNet(ResNet),
    Vit(Vit),
}

impl Backbone {
    /// Features `[n, feature_dim]`: globally pooled (ResNet) or the class token (ViT).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        match self {
            Backbone::ResNet(m) => m.forward(x),
            Backbone::Vit(m) => m.forward(x),
        }
    }

    /// The spatial features before pooling, `[n, feature_dim, g, g]` (g from
    /// [`BackboneConfig::feature_grid`]): a ResNet's last stage, a ViT's normalised patch tokens
    /// on their grid.
    pub fn feature_map(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Backbone::ResNet(m) => m.feature_map(x, 1),
            Backbone::Vit(m) => m.feature_map(x),
        }
    }

    /// [`forward`](Self::forward) with a ResNet's training-mode batch statistics per group of
    /// images `i ≡ g (mod bn_splits)` ([`ResNet::forward_split_bn`]); a ViT has no batch norm.
    pub fn forward_split_bn(&self, x: Tensor<4>, bn_splits: usize) -> Tensor<2> {
        match self {
            Backbone::ResNet(m) => m.forward_split_bn(x, bn_splits),
            Backbone::Vit(m) => m.forward(x),
        }
    }

    /// [`forward`](Self::forward) in training with a ViT's stochastic depth at `rate`, masks
    /// from `rng` ([`Vit::forward_drop_path`]); a ResNet has none (as in DINO).
    pub fn forward_drop_path(
        &self,
        x: Tensor<4>,
        rate: f64,
        rng: &mut impl rand::Rng,
    ) -> Tensor<2> {
        match self {
            Backbone::ResNet(m) => m.forward(x),
            Backbone::Vit(m) => m.forward_drop_path(x, rate, rng),
        }
    }
}

/// `module` on `device`. On an autodiff device its parameters are tracked for gradients again:
/// burn keeps a moved module's tensors untracked until `Module::train()` applies its configured
/// training state (frozen ones, a teacher's, stay frozen).
pub fn to_device<M: Module>(module: M, device: &Device) -> M {
    let module = module.to_device(device);
    match device.is_autodiff() {
        true => module.train(),
        false => module,
    }
}

/// Refuses weights that no trainable model holds: a NaN or infinite value in any parameter or
/// buffer, or a negative batch-norm running variance (it takes a square root in evaluation).
/// The error names `origin` and the tensor by its module path (`ResNet.bn1.running_var`).
pub fn check_weights<M: Module>(module: &M, origin: &str) -> anyhow::Result<()> {
    #[derive(Default)]
    struct Check {
        path: Vec<String>,
        fault: Option<String>,
    }
    impl ModuleVisitor for Check {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if self.fault.is_some() {
                return;
            }
            let name = self.path.join(".");
            let values = match param.val().try_into_vec_as::<f32>() {
                Ok(v) => v,
                Err(e) => return self.fault = Some(format!("{name} cannot be read ({e})")),
            };
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            let negative = values.iter().filter(|&&v| v < 0.0).count();
            if bad > 0 {
                self.fault = Some(format!(
                    "{name} holds {bad} NaN or infinite values of {}",
                    values.len()
                ));
            } else if name.ends_with("running_var") && negative > 0 {
                self.fault = Some(format!(
                    "{name} holds {negative} negative variances of {}",
                    values.len()
                ));
            }
        }
    }
    let mut check = Check::default();
    module.visit(&mut check);
    match check.fault {
        Some(fault) => anyhow::bail!("{origin}: {fault}: these weights cannot compute features"),
        None => Ok(()),
    }
}

/// Initialises a module from `seed`. burn's CPU generator is global and its parameters are
/// drawn lazily, on first use: so seeding and drawing every parameter happen under one lock, and
/// the same seed gives the same weights whatever runs beside it.
pub fn init_seeded<T: Module>(device: &Device, seed: u64, init: impl FnOnce() -> T) -> T {
    struct Touch;
    impl ModuleVisitor for Touch {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let _ = param.val();
        }
    }
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    let module = init();
    module.visit(&mut Touch);
    module
}

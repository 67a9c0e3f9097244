//! PyTorch weights in and out. Export writes a backbone as safetensors with torchvision's
//! (ResNet) and timm's (ViT) parameter names and layouts; import reads such a file, or a
//! `.pth` / `.pt` state dict, from timm, torchvision, the official DINO, MAE and MoCo releases,
//! solo-learn or lightly: it finds the backbone's keys under their prefix (`module.`,
//! `backbone.`, `encoder_q.`, ...; a file with several backbones, as MoCo's query and key
//! encoders, needs the prefix named), infers the architecture from the shapes, and leaves out
//! what the backbone does not have (classifier and projection heads, MAE's decoder, the other
//! encoder and MoCo's queue), saying so.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::{Module, ModuleMapper, Param};
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    BurnToPyTorchAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore,
    SafetensorsStore,
};
use burn::tensor::{DType, Device, Tensor};

use crate::models::{init_seeded, Backbone, BackboneConfig, Pool, ResNetConfig, Stem, VitConfig};

/// Writes the backbone as safetensors with torchvision / timm parameter names and layouts, so
/// `model.load_state_dict(safetensors.torch.load_file(path), strict=False)` takes it in PyTorch
/// (strict=True once the classifier `fc` / `head` is removed).
pub fn export(backbone: &Backbone, path: &Path) -> Result<()> {
    let mut store = SafetensorsStore::from_file(path)
        .skip_enum_variants(true)
        .with_to_adapter(BurnToPyTorchAdapter)
        .with_key_remapping(r"downsample\.conv\.", "downsample.0.")
        .with_key_remapping(r"downsample\.bn\.", "downsample.1.")
        .overwrite(true);
    backbone
        .save_into(&mut store)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
}

/// The key of a backbone's first layer, whose prefix is the backbone's: a ViT's patch
/// projection, or a ResNet's stem conv (the only conv that takes 3 channels).
fn stem_prefix(name: &str, shape: &[usize]) -> Option<String> {
    if let Some(p) = name.strip_suffix("patch_embed.proj.weight") {
        return Some(p.to_string());
    }
    let p = name.strip_suffix("conv1.weight")?;
    let stem = shape.len() == 4 && shape[1] == 3 && (p.is_empty() || p.ends_with('.'));
    let in_block = p.split('.').any(|s| s.starts_with("layer"));
    (stem && !in_block).then(|| p.to_string())
}

/// Keys under the backbone's prefix that are not the backbone's: classifier heads (torchvision's
/// `fc`, timm's `head`) and MAE's decoder (which shares the encoder's dictionary). Any other
/// key the model lacks is an error, not silently dropped.
fn not_backbone(name: &str) -> bool {
    ["fc.", "head.", "decoder", "mask_token"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A backbone's tensors read from a PyTorch file, named as in torchvision / timm, with the
/// architecture their shapes describe.
pub struct StateDict {
    /// Where they came from, for messages.
    origin: String,
    tensors: BTreeMap<String, PackTensor>,
    /// Keys of the file that are not the backbone's (heads, decoders, other encoders).
    pub left_out: Vec<String>,
}

impl StateDict {
    /// Reads `path`: `.safetensors`, or a pickled state dict (`.pth`, `.pt`, `.bin`, `.tar`).
    /// `key` picks a dictionary inside a checkpoint (`teacher` in DINO's full checkpoints,
    /// `model` in MAE's, `state_dict` in MoCo's); without it, common ones are tried.
    /// `prefix` is the backbone's key prefix (`module.encoder_q.`); without it, the one in front
    /// of the stem's key, which must be unique.
    pub fn read(path: &Path, key: Option<&str>, prefix: Option<&str>) -> Result<StateDict> {
        let origin = path.display().to_string();
        if !path.is_file() {
            bail!("{origin}: no such file");
        }
        let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
        let all: BTreeMap<String, PackTensor> = if is_safetensors {
            if key.is_some() {
                bail!("--key applies to pickled checkpoints; {origin} is safetensors");
            }
            SafetensorsStore::from_file(path)
                .get_all_tensors()
                .map_err(|e| anyhow::anyhow!("{origin}: not a readable safetensors file: {e}"))?
                .clone()
        } else {
            read_pickle(path, key)?
        };
        let stems: Vec<String> = all
            .values()
            .filter_map(|t| stem_prefix(&t.name, &t.shape))
            .collect();
        let prefix = match (prefix, stems.as_slice()) {
            (Some(p), _) => {
                let p = match p.is_empty() || p.ends_with('.') {
                    true => p.to_string(),
                    false => format!("{p}."),
                };
                if !all.keys().any(|k| k.starts_with(&p)) {
                    bail!("{origin}: no key starts with the prefix '{p}'");
                }
                p
            }
            (None, []) => {
                let mut heads: Vec<&str> = all
                    .keys()
                    .map(|k| k.split('.').next().unwrap_or(k))
                    .collect();
                heads.dedup();
                bail!(
                    "{origin}: no ResNet stem (conv1.weight taking 3 channels) or ViT patch \
                     projection (patch_embed.proj.weight) among its {} tensors, whose keys start \
                     with: {}{}",
                    all.len(),
                    heads
                        .iter()
                        .take(12)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if key.is_none() {
                        " (pick a dictionary of a checkpoint with --key)"
                    } else {
                        ""
                    }
                )
            }
            (None, [one]) => one.clone(),
            (None, several) => bail!(
                "{origin} holds several backbones, under the prefixes {}: pick one with --prefix",
                several
                    .iter()
                    .map(|p| format!("'{p}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let (mut tensors, mut left_out) = (BTreeMap::new(), Vec::new());
        for (name, mut t) in all {
            if name.ends_with("num_batches_tracked") {
                continue; // batch norm's step counter: no part of the model's function
            }
            match name.strip_prefix(prefix.as_str()) {
                Some(rest) if !not_backbone(rest) => {
                    // torchvision's downsample Sequential; DINOv2's own name for timm's
                    // `reg_token`.
                    let rest = rest
                        .replace("downsample.0.", "downsample.conv.")
                        .replace("downsample.1.", "downsample.bn.")
                        .replace("register_tokens", "reg_token");
                    t.name = rest.clone();
                    tensors.insert(rest, t);
                }
                _ => left_out.push(name),
            }
        }
        Ok(StateDict {
            origin,
            tensors,
            left_out,
        })
    }

    /// The tensors of a backbone (a run's encoder), to load into another of the same
    /// architecture.
    pub fn of(backbone: &Backbone, origin: &str) -> StateDict {
        let tensors = backbone
            .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        StateDict {
            origin: origin.to_string(),
            tensors,
            left_out: vec![],
        }
    }

    /// Number of the backbone's tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether no tensor of the file is the backbone's.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| &t.shape[..])
    }

    fn count(&self, f: impl Fn(usize) -> String) -> usize {
        (0..)
            .take_while(|&i| self.tensors.contains_key(&f(i)))
            .count()
    }

    /// The architecture the shapes describe. A ViT's head count is not in its weights: `heads`,
    /// else that of the published ViT of the same width ([`VIT_HEADS`]); a width none has is
    /// refused, asking for `--heads`. The image size is the one `pos_embed` was trained at; its
    /// rows tell whether the class token has one (a square number of rows: timm's
    /// `no_embed_class`); `reg_token` gives the registers, `ls1.gamma` LayerScale.
    pub fn architecture(&self, heads: Option<usize>) -> Result<BackboneConfig> {
        let origin = &self.origin;
        if let Some(w) = self.shape("patch_embed.proj.weight") {
            let (dim, patch) = (w[0], w[2]);
            let depth = self.count(|i| format!("blocks.{i}.norm1.weight"));
            let tokens = match self.shape("pos_embed") {
                Some(&[1, t, _]) if t >= 1 => t,
                Some(other) => {
                    bail!("{origin}: pos_embed has shape {other:?}, not [1, tokens, dim]")
                }
                None => bail!("{origin}: a ViT without pos_embed"),
            };
            if self.shape("cls_token").is_none() {
                bail!("{origin}: a ViT without cls_token; selfsup's ViT has a class token");
            }
            if self.tensors.contains_key("blocks.0.mlp.w12.weight") {
                bail!("{origin}: a ViT with SwiGLU MLPs (blocks.N.mlp.w12: DINOv2's ViT-g); selfsup's blocks have a GELU MLP (fc1, fc2)");
            }
            let registers = match self.shape("reg_token") {
                Some(&[1, r, d]) if d == dim => r,
                Some(other) => {
                    bail!("{origin}: reg_token has shape {other:?}, not [1, registers, {dim}]")
                }
                None => 0,
            };
            let square = |t: usize| {
                let g = (t as f64).sqrt().round() as usize;
                (g > 0 && g * g == t).then_some(g)
            };
            let (grid, no_embed_class) = match (square(tokens), square(tokens - 1)) {
                (Some(g), _) => (g, true),
                (None, Some(g)) => (g, false),
                _ if registers > 0 && tokens.checked_sub(1 + registers).and_then(square).is_some() => {
                    bail!("{origin}: pos_embed has rows for the {registers} registers too (timm's reg_tokens without no_embed_class); selfsup's registers have no position, as DINOv2's")
                }
                _ => bail!("{origin}: pos_embed has {tokens} rows: neither a square grid of patches nor a class token and one"),
            };
            // The weights hold γ; its starting value (DINOv2's) only names LayerScale on.
            let layer_scale = self
                .tensors
                .contains_key("blocks.0.ls1.gamma")
                .then_some(1e-5);
            let hidden = self
                .shape("blocks.0.mlp.fc1.weight")
                .map_or(4 * dim, |s| s[0]);
            let heads = match heads {
                Some(h) => h,
                None => published_heads(dim)
                    .with_context(|| format!("{origin}: a ViT of width {dim}"))?,
            };
            let config = VitConfig {
                image_size: grid * patch,
                patch_size: patch,
                dim,
                depth,
                heads,
                mlp_ratio: hidden as f32 / dim as f32,
                pool: Pool::Cls,
                registers,
                layer_scale,
                no_embed_class,
                init: None,
            };
            config
                .check()
                .with_context(|| format!("{origin} with {heads} heads"))?;
            return Ok(BackboneConfig::Vit(config));
        }
        let Some(w) = self.shape("conv1.weight") else {
            bail!("{origin}: neither a ResNet nor a ViT");
        };
        let stem = match w[2] {
            3 => Stem::Cifar,
            7 => Stem::Imagenet,
            k => bail!("{origin}: conv1.weight is a {k}×{k} conv; a ResNet stem is 7×7 (ImageNet) or 3×3 (CIFAR)"),
        };
        let stages: Vec<usize> = (1..=4)
            .map(|l| self.count(|i| format!("layer{l}.{i}.conv1.weight")))
            .collect();
        let bottleneck = self.tensors.contains_key("layer1.0.conv3.weight");
        let depth = match (stages.as_slice(), bottleneck) {
            ([2, 2, 2, 2], false) => 18,
            ([3, 4, 6, 3], false) => 34,
            ([3, 4, 6, 3], true) => 50,
            (s, b) => bail!(
                "{origin}: a ResNet with {s:?} {} blocks per stage; selfsup builds ResNet-18, 34 and 50",
                if b { "bottleneck" } else { "basic" }
            ),
        };
        Ok(BackboneConfig::Resnet(ResNetConfig {
            depth,
            stem,
            width: w[0] as f32 / 64.0,
            init: None,
            conv_init: Default::default(),
        }))
    }

    /// A backbone of `config` holding these weights, in float32, on `device` (on an autodiff
    /// device, trainable). Every parameter and buffer of the backbone must be in the file with
    /// its shape: a missing key or a wrong shape is named.
    pub fn load(&self, config: &BackboneConfig, device: &Device) -> Result<Backbone> {
        let origin = &self.origin;
        // Loaded and cast on the plain device, then moved.
        let cpu = Device::flex();
        let mut backbone = init_seeded(&cpu, 0, || config.init(&cpu));
        let result = backbone.apply(
            self.tensors.values().cloned().collect(),
            None,
            Some(Box::new(PyTorchToBurnAdapter)),
            true,
        );
        if let Some(e) = result.errors.first() {
            bail!(
                "{origin} does not fit the model ({} errors); the first: {}",
                result.errors.len(),
                match e {
                    burn::store::ApplyError::ShapeMismatch {
                        path,
                        expected,
                        found,
                    } => format!(
                        "{path} has shape {:?} in the file, the model wants {:?}",
                        found.as_slice(),
                        expected.as_slice()
                    ),
                    other => other.to_string(),
                }
            );
        }
        if !result.missing.is_empty() {
            let missing: Vec<&str> = result.missing.iter().map(|(p, _)| p.as_str()).collect();
            bail!(
                "{origin} lacks {} tensors of the model: {}{}",
                missing.len(),
                missing
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if missing.len() > 8 { ", ..." } else { "" }
            );
        }
        if !result.unused.is_empty() {
            bail!(
                "{origin} has tensors the model lacks: {} (is the architecture right?)",
                result
                    .unused
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let backbone = backbone.map(&mut ToF32);
        crate::models::check_weights(&backbone, origin)?;
        Ok(crate::models::to_device(backbone, device))
    }
}

/// The published ViTs by token width: (name, width, attention heads), from timm's
/// `vision_transformer.py` (tiny to gigantic; ViT-H/14 is MAE's largest release) and DINOv2's
/// `vit_giant2`. Most have 64 channels a head, but not all (ViT-H: 80, DINOv2's giant: 64 of
/// 1536 in 24), so a head count is looked up, never computed from the width.
pub const VIT_HEADS: &[(&str, usize, usize)] = &[
    ("ViT-Ti", 192, 3),
    ("ViT-S", 384, 6),
    ("ViT-M", 512, 8),
    ("ViT-B", 768, 12),
    ("ViT-L", 1024, 16),
    ("ViT-H", 1280, 16),
    ("ViT-g", 1408, 16),
    ("DINOv2 ViT-g", 1536, 24),
    ("ViT-G", 1664, 16),
];

/// The head count of the published ViT of width `dim` ([`VIT_HEADS`]).
fn published_heads(dim: usize) -> Result<usize> {
    match VIT_HEADS.iter().find(|(_, d, _)| *d == dim) {
        Some((_, _, heads)) => Ok(*heads),
        None => {
            let known: Vec<String> = VIT_HEADS
                .iter()
                .map(|(name, d, h)| format!("{name} {d}/{h}"))
                .collect();
            bail!("no published ViT has this width, so its attention heads cannot be known (width/heads: {}): pass --heads N", known.join(", "))
        }
    }
}

/// A pickled PyTorch checkpoint's tensors, from dictionary `key` if given, else from the first
/// of the usual dictionaries that has tensors, else from the top level.
fn read_pickle(path: &Path, key: Option<&str>) -> Result<BTreeMap<String, PackTensor>> {
    let read = |key: Option<&str>| -> Result<BTreeMap<String, PackTensor>> {
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        if let Some(k) = key {
            store = store.with_top_level_key(k);
        }
        Ok(store
            .get_all_tensors()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .clone())
    };
    let origin = path.display();
    match key {
        Some(k) => read(Some(k)).with_context(|| format!("{origin}: cannot read dictionary '{k}'")),
        None => {
            for k in ["state_dict", "model", "teacher", "model_state_dict"] {
                if let Ok(t) = read(Some(k)) {
                    if !t.is_empty() {
                        return Ok(t);
                    }
                }
            }
            read(None).with_context(|| format!("{origin}: not a readable PyTorch checkpoint"))
        }
    }
}

/// Casts float parameters to float32 (checkpoints in float16 or bfloat16 keep their type when
/// applied).
struct ToF32;

impl ModuleMapper for ToF32 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| match t.dtype() {
            DType::F32 => t,
            _ => t.cast(DType::F32),
        })
    }
}

//! View pipelines: the random views each method asks of an image, with the papers' defaults.

use anyhow::{bail, Result};
use image::RgbImage;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::ops::{self, Interpolation};
use super::randaugment::RandAugment;
use crate::config::{not_negative, probability};

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
pub const CIFAR_MEAN: [f32; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR_STD: [f32; 3] = [0.2470, 0.2435, 0.2616];

/// torchvision's `ColorJitter` (strengths as its arguments), applied with probability `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Jitter {
    pub p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

impl Default for Jitter {
    fn default() -> Self {
        Jitter {
            p: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
        }
    }
}

impl Jitter {
    fn new(p: f32, [brightness, contrast, saturation, hue]: [f32; 4]) -> Self {
        Jitter {
            p,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    /// The four adjustments with factors drawn as torchvision does, in a random order.
    pub fn apply(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        let mut order = [0usize, 1, 2, 3];
        order.shuffle(rng);
        let mut factor = |s: f32| rng.random_range((1.0 - s).max(0.0)..=1.0 + s);
        let factors = [
            factor(self.brightness),
            factor(self.contrast),
            factor(self.saturation),
        ];
        let hue = rng.random_range(-self.hue..=self.hue);
        for op in order {
            match op {
                0 if self.brightness > 0.0 => ops::adjust_brightness(img, factors[0]),
                1 if self.contrast > 0.0 => ops::adjust_contrast(img, factors[1]),
                2 if self.saturation > 0.0 => ops::adjust_saturation(img, factors[2]),
                3 if self.hue > 0.0 => ops::adjust_hue(img, hue),
                _ => {}
            }
        }
    }
}

/// The smallest blur σ, in pixels: below it the kernel's weights underflow (a σ of 0.001 px
/// already leaves a pixel as it is).
const MIN_SIGMA: f32 = 1e-3;

/// Gaussian blur with σ uniform in `sigma`, kernel `kernel_frac` of the side (SimCLR: 10%).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Blur {
    pub p: f32,
    pub sigma: [f32; 2],
    pub kernel_frac: f32,
}

impl Default for Blur {
    fn default() -> Self {
        Blur {
            p: 0.0,
            sigma: [0.1, 2.0],
            kernel_frac: 0.1,
        }
    }
}

/// One kind of view: `count` views of `size`×`size` pixels drawn with these operations, in the
/// order of the SimCLR/MoCo/DINO code: crop, flip, jitter, grayscale, blur, solarize.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViewSpec {
    pub count: usize,
    pub size: u32,
    /// RandomResizedCrop's area fraction; `[1, 1]` takes the central square instead
    /// (torchvision's Resize + CenterCrop), with nothing random.
    pub scale: [f32; 2],
    pub ratio: [f32; 2],
    pub flip: f32,
    pub jitter: Jitter,
    pub grayscale: f32,
    pub blur: Blur,
    pub solarize: f32,
    /// The filter that resizes the crop: bilinear (SimCLR, MoCo) or bicubic (DINO, MAE).
    pub interpolation: Interpolation,
    /// Whether the filter widens where the crop is shrunk, as PIL's and torchvision's
    /// RandomResizedCrop (`antialias=True`); false reads the crop at the filter's own support,
    /// as a batched `grid_sample` crop does (sharper, with aliasing).
    pub antialias: bool,
    /// RandAugment after the flip (MAE's fine-tuning views; off unless `n` > 0).
    #[serde(skip_serializing_if = "RandAugment::is_off")]
    pub rand_augment: RandAugment,
}

impl Default for ViewSpec {
    fn default() -> Self {
        ViewSpec {
            count: 1,
            size: 32,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: 0.5,
            jitter: Jitter::default(),
            grayscale: 0.0,
            blur: Blur::default(),
            solarize: 0.0,
            interpolation: Interpolation::Bilinear,
            antialias: true,
            rand_augment: RandAugment::default(),
        }
    }
}

impl ViewSpec {
    /// One random view of `img`.
    pub fn view(&self, img: &RgbImage, rng: &mut impl Rng) -> RgbImage {
        let crop = if self.scale[0] >= 1.0 {
            ops::center_square(img.width(), img.height())
        } else {
            ops::random_resized_crop_box(img.width(), img.height(), self.scale, self.ratio, rng)
        };
        let mut v = ops::crop_resize_with(
            img,
            crop,
            self.size,
            self.size,
            self.interpolation,
            self.antialias,
        );
        if rng.random::<f32>() < self.flip {
            ops::flip_horizontal(&mut v);
        }
        if self.rand_augment.n > 0 {
            self.rand_augment.apply(&mut v, rng);
        }
        if rng.random::<f32>() < self.jitter.p {
            self.jitter.apply(&mut v, rng);
        }
        if rng.random::<f32>() < self.grayscale {
            ops::grayscale(&mut v);
        }
        if rng.random::<f32>() < self.blur.p {
            let sigma = rng.random_range(self.blur.sigma[0]..=self.blur.sigma[1]);
            ops::gaussian_blur(
                &mut v,
                (self.blur.kernel_frac * self.size as f32).round() as u32,
                sigma,
            );
        }
        if rng.random::<f32>() < self.solarize {
            ops::solarize(&mut v, 128);
        }
        v
    }

    fn check(&self, i: usize) -> Result<()> {
        let field = |name: &str| format!("augment.views[{i}].{name}");
        if self.count == 0 {
            // A pretext task takes the first view, made or not.
            bail!(
                "{} = 0: a kind of view makes at least one (leave it out instead)",
                field("count")
            );
        }
        if self.size == 0 {
            bail!("{} = 0: a view needs at least one pixel", field("size"));
        }
        if !(self.scale[0] > 0.0 && self.scale[0] <= self.scale[1] && self.scale[1] <= 1.0) {
            bail!(
                "{} = {:?}: need 0 < min <= max <= 1",
                field("scale"),
                self.scale
            );
        }
        if !(self.ratio[0] > 0.0 && self.ratio[0] <= self.ratio[1] && self.ratio[1].is_finite()) {
            bail!(
                "{} = {:?}: need 0 < min <= max, finite",
                field("ratio"),
                self.ratio
            );
        }
        if !(0.0..=0.5).contains(&self.jitter.hue) {
            bail!(
                "{} = {}: hue strength must lie in [0, 0.5]",
                field("jitter.hue"),
                self.jitter.hue
            );
        }
        for (name, s) in [
            ("jitter.brightness", self.jitter.brightness),
            ("jitter.contrast", self.jitter.contrast),
            ("jitter.saturation", self.jitter.saturation),
        ] {
            not_negative(&field(name), s)?;
        }
        let [lo, hi] = self.blur.sigma;
        if !(lo >= MIN_SIGMA && lo <= hi && hi.is_finite()) {
            bail!(
                "{} = {:?}: need {MIN_SIGMA} <= min <= max, finite (in pixels; a smaller σ blurs nothing)",
                field("blur.sigma"),
                self.blur.sigma
            );
        }
        if !(self.blur.kernel_frac > 0.0 && self.blur.kernel_frac <= 1.0) {
            bail!(
                "{} = {}: the kernel's side, a fraction of the view's, must lie in (0, 1]",
                field("blur.kernel_frac"),
                self.blur.kernel_frac
            );
        }
        probability(&field("flip"), self.flip)?;
        probability(&field("jitter.p"), self.jitter.p)?;
        probability(&field("grayscale"), self.grayscale)?;
        probability(&field("blur.p"), self.blur.p)?;
        probability(&field("solarize"), self.solarize)?;
        self.rand_augment.check(&field("rand_augment"))
    }
}

/// BYOL's two views of `v`: the first always blurred, the second rarely blurred and sometimes
/// solarised.
fn asymmetric_pair(v: ViewSpec) -> [ViewSpec; 2] {
    [
        ViewSpec {
            blur: Blur {
                p: 1.0,
                ..Blur::default()
            },
            ..v.clone()
        },
        ViewSpec {
            blur: Blur {
                p: 0.1,
                ..Blur::default()
            },
            solarize: 0.2,
            ..v
        },
    ]
}

/// The views of one image, in order, and how they are normalised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub views: Vec<ViewSpec>,
    #[serde(default = "imagenet_mean")]
    pub mean: [f32; 3],
    #[serde(default = "imagenet_std")]
    pub std: [f32; 3],
}

fn imagenet_mean() -> [f32; 3] {
    IMAGENET_MEAN
}
fn imagenet_std() -> [f32; 3] {
    IMAGENET_STD
}

/// The sizes a preset is built for: the global view side, and for `dino` the local crops.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub size: u32,
    pub local_size: u32,
    pub local_crops: usize,
}

impl Sizes {
    /// 32 px data (CIFAR): global 32, local 16 (the common DINO setting on CIFAR), 6 local crops.
    pub fn small(size: u32) -> Self {
        Sizes {
            size,
            local_size: (size / 2).max(1),
            local_crops: 6,
        }
    }
}

pub const PRESETS: [&str; 7] = [
    "simclr", "moco_v1", "moco_v2", "byol", "dino", "mae", "eval",
];

impl Pipeline {
    /// A named pipeline with the defaults of ../shared/docs/recipes.md (torchvision semantics).
    pub fn preset(name: &str, sizes: Sizes) -> Result<Pipeline> {
        let size = sizes.size;
        let base = ViewSpec {
            size,
            ..ViewSpec::default()
        };
        let mut views = match name {
            // SimCLR: crop 0.08-1, flip, jitter (0.8s,0.8s,0.8s,0.2s) p 0.8 with s=1, gray 0.2,
            // blur p 0.5 (10% kernel), two identical views.
            "simclr" => vec![ViewSpec {
                count: 2,
                jitter: Jitter::new(0.8, [0.8, 0.8, 0.8, 0.2]),
                grayscale: 0.2,
                blur: Blur {
                    p: 0.5,
                    ..Blur::default()
                },
                ..base
            }],
            // MoCo v1: crop 0.2-1, gray 0.2, jitter 0.4 on all four (always), flip.
            "moco_v1" => vec![ViewSpec {
                count: 2,
                scale: [0.2, 1.0],
                jitter: Jitter::new(1.0, [0.4, 0.4, 0.4, 0.4]),
                grayscale: 0.2,
                ..base
            }],
            // MoCo v2 "aug-plus": crop 0.2-1, jitter (0.4,0.4,0.4,0.1) p 0.8, gray 0.2, blur p 0.5.
            "moco_v2" => vec![ViewSpec {
                count: 2,
                scale: [0.2, 1.0],
                jitter: Jitter::new(0.8, [0.4, 0.4, 0.4, 0.1]),
                grayscale: 0.2,
                blur: Blur {
                    p: 0.5,
                    ..Blur::default()
                },
                ..base
            }],
            // BYOL: asymmetric blur and solarize between the two views.
            "byol" => {
                let v = ViewSpec {
                    jitter: Jitter::new(0.8, [0.4, 0.4, 0.2, 0.1]),
                    grayscale: 0.2,
                    ..base
                };
                asymmetric_pair(v).to_vec()
            }
            // DINO multi-crop: 2 global crops (0.4-1) as BYOL's two views, L local crops (0.05-0.4).
            "dino" => {
                let g = ViewSpec {
                    scale: [0.4, 1.0],
                    jitter: Jitter::new(0.8, [0.4, 0.4, 0.2, 0.1]),
                    grayscale: 0.2,
                    interpolation: Interpolation::Bicubic,
                    ..base
                };
                let local = ViewSpec {
                    count: sizes.local_crops,
                    size: sizes.local_size,
                    scale: [0.05, 0.4],
                    blur: Blur {
                        p: 0.5,
                        ..Blur::default()
                    },
                    ..g.clone()
                };
                let [g1, g2] = asymmetric_pair(g);
                vec![g1, g2, local]
            }
            // MAE: crop 0.2-1 (bicubic) and flip only.
            "mae" => vec![ViewSpec {
                scale: [0.2, 1.0],
                interpolation: Interpolation::Bicubic,
                ..base
            }],
            // Evaluation: the central square, resized; nothing random.
            "eval" => vec![ViewSpec {
                scale: [1.0, 1.0],
                flip: 0.0,
                ..base
            }],
            other => bail!("unknown pipeline '{other}' (known: {})", PRESETS.join(", ")),
        };
        // A kind that makes no view (DINO without local crops) is left out.
        views.retain(|v| v.count > 0);
        Ok(Pipeline {
            views,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        })
    }

    /// Checks every value; the error names the field.
    pub fn check(&self) -> Result<()> {
        if self.views.iter().map(|v| v.count).sum::<usize>() == 0 {
            bail!("augment.views: the pipeline makes no view");
        }
        for (i, v) in self.views.iter().enumerate() {
            v.check(i)?;
        }
        if self.mean.iter().any(|m| !m.is_finite()) {
            bail!("augment.mean = {:?}: must be finite numbers", self.mean);
        }
        if let Some(s) = self.std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            bail!(
                "augment.std = {:?}: {s} is not a positive standard deviation",
                self.std
            );
        }
        Ok(())
    }

    /// The number of views per image.
    pub fn num_views(&self) -> usize {
        self.views.iter().map(|v| v.count).sum()
    }

    /// The side of each view of an image, in order (`[32, 32, 16, 16, ...]` for DINO).
    pub fn view_sizes(&self) -> Vec<u32> {
        self.views
            .iter()
            .flat_map(|v| std::iter::repeat_n(v.size, v.count))
            .collect()
    }

    /// The random views of one image, as 8-bit images (before normalisation).
    pub fn images(&self, img: &RgbImage, rng: &mut impl Rng) -> Vec<RgbImage> {
        self.views
            .iter()
            .flat_map(|spec| {
                (0..spec.count)
                    .map(|_| spec.view(img, rng))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

//! Augmentation: operations on 8-bit RGB images, the view pipelines of each method, and the
//! normalisation into f32 NCHW batches (the one place here that touches burn tensors).
//!
//! Every sample draws from its own RNG, seeded by (seed, epoch, index), so views do not depend on
//! the number of threads or on the order in which samples are processed.

pub mod mix;
pub mod ops;
mod pipeline;
pub mod pretext;
pub mod randaugment;

use anyhow::{bail, Result};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rand::SeedableRng;

pub use pipeline::{
    Blur, Jitter, Pipeline, Sizes, ViewSpec, CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD,
    PRESETS,
};

/// The RNG of one sample.
pub type SampleRng = rand_chacha::ChaCha8Rng;

/// The RNG of sample `index` in `epoch` of a run seeded with `seed`.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> SampleRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    SampleRng::from_seed(key)
}

/// One view, normalised, channels first: `data.len() == 3 * h * w`.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

/// What turns one image into its views. Every image must give views of the same sizes in the
/// same order, so that view `v` of a batch stacks into one tensor.
pub trait Augment: Send + Sync {
    fn views(&self, img: &RgbImage, rng: &mut SampleRng) -> Vec<View>;
}

impl Augment for Pipeline {
    fn views(&self, img: &RgbImage, rng: &mut SampleRng) -> Vec<View> {
        self.images(img, rng)
            .iter()
            .map(|v| normalize(v, self.mean, self.std))
            .collect()
    }
}

/// `(x / 255 − mean) / std` per channel, channels first.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> View {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            data[c * w * h + i] = (p.0[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    View {
        data,
        height: h,
        width: w,
    }
}

/// Views of the same kind from several images, stacked as `[n, 3, h, w]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBatch {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

impl ImageBatch {
    pub fn stack(views: &[&View]) -> Result<ImageBatch> {
        let Some(first) = views.first() else {
            bail!("cannot stack an empty batch")
        };
        let (h, w) = (first.height, first.width);
        if let Some(odd) = views.iter().find(|v| (v.height, v.width) != (h, w)) {
            bail!(
                "views of one batch differ in size: {h}x{w} and {}x{}",
                odd.height,
                odd.width
            );
        }
        let mut data = Vec::with_capacity(views.len() * 3 * h * w);
        for v in views {
            data.extend_from_slice(&v.data);
        }
        Ok(ImageBatch {
            data,
            shape: [views.len(), 3, h, w],
        })
    }

    pub fn to_tensor(&self, device: &Device) -> Tensor<4> {
        Tensor::from_data(TensorData::new(self.data.clone(), self.shape), device)
    }
}

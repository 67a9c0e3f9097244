//! The views of the pretext tasks, each built on one view of a base pipeline (crop, flip, ...):
//! an image in its four rotations, jigsaw tiles, an image with its inpainting mask.

use std::sync::Arc;

use image::RgbImage;
use rand::Rng;

use super::ops::{self, MaskKind};
use super::{normalize, Augment, Pipeline, SampleRng, View};

/// The first view of `base` for one image.
fn base_view(base: &Pipeline, img: &RgbImage, rng: &mut SampleRng) -> RgbImage {
    base.views[0].view(img, rng)
}

/// Rotation prediction (Gidaris et al. 2018): one view in its four rotations; view r is turned
/// r quarter turns counter-clockwise, so r is its label.
pub struct Rotations(pub Arc<Pipeline>);

impl Augment for Rotations {
    fn views(&self, img: &RgbImage, rng: &mut SampleRng) -> Vec<View> {
        let v = base_view(&self.0, img, rng);
        (0..4)
            .map(|r| normalize(&ops::rotate90(&v, r), self.0.mean, self.0.std))
            .collect()
    }
}

/// Jigsaw (Noroozi & Favaro 2016): the `grid`×`grid` tiles of one view, cut with gaps and
/// random jitter (`ops::jigsaw_tiles`), in row-major order; each tile's channels shifted by up
/// to `jitter` grey levels (`ops::shift_channels`), then normalised on its own (per channel),
/// so that tiles cannot be matched by their brightness or colour statistics.
pub struct JigsawTiles {
    pub base: Arc<Pipeline>,
    pub grid: u32,
    pub tile: u32,
    pub jitter: u8,
}

impl Augment for JigsawTiles {
    fn views(&self, img: &RgbImage, rng: &mut SampleRng) -> Vec<View> {
        let v = base_view(&self.base, img, rng);
        let n = self.jitter as i16;
        ops::jigsaw_tiles(&v, self.grid, self.tile, rng)
            .into_iter()
            .map(|mut tile| {
                if n > 0 {
                    let shifts = [(); 3].map(|_| rng.random_range(-n..n));
                    ops::shift_channels(&mut tile, shifts);
                }
                standardize(&tile)
            })
            .collect()
    }
}

/// Per-channel zero mean and unit variance over the tile.
fn standardize(tile: &RgbImage) -> View {
    let mut v = normalize(tile, [0.0; 3], [1.0; 3]);
    let plane = v.width * v.height;
    for c in v.data.chunks_mut(plane) {
        let mean = c.iter().sum::<f32>() / plane as f32;
        let var = c.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / plane as f32;
        let std = var.sqrt().max(1e-3);
        c.iter_mut().for_each(|x| *x = (*x - mean) / std);
    }
    v
}

/// Context encoders (Pathak et al. 2016): view 0 is one view of the image, view 1 its mask M
/// (1 where hidden, on all three channels), covering `area` of the image.
pub struct MaskedViews {
    pub base: Arc<Pipeline>,
    pub kind: MaskKind,
    pub area: f32,
}

impl Augment for MaskedViews {
    fn views(&self, img: &RgbImage, rng: &mut SampleRng) -> Vec<View> {
        let v = base_view(&self.base, img, rng);
        let (w, h) = (v.width(), v.height());
        let mask = ops::inpainting_mask(self.kind, w, h, self.area, rng);
        let plane: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
        vec![
            normalize(&v, self.base.mean, self.base.std),
            View {
                data: plane.repeat(3),
                height: h as usize,
                width: w as usize,
            },
        ]
    }
}

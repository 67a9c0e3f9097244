//! What a pipeline does to real images: one row per image, the original then its views.

use image::RgbImage;

use crate::augment::{ops, sample_rng, Pipeline};

/// Views are shown at their true relative size (a 16 px local crop is half as wide as a 32 px
/// global one), enlarged by a whole factor with nearest-neighbour so that pixels stay visible.
pub fn views_grid(images: &[&RgbImage], pipeline: &Pipeline, seed: u64) -> RgbImage {
    let largest = pipeline.views.iter().map(|v| v.size).max().unwrap_or(32);
    let zoom = 96u32.div_ceil(largest).max(1);
    let cell = largest * zoom;
    let rows: Vec<Vec<RgbImage>> = images
        .iter()
        .enumerate()
        .map(|(i, img)| {
            let scale = cell as f32 / img.width().max(img.height()) as f32;
            let (w, h) = (
                ((img.width() as f32 * scale).round() as u32).max(1),
                ((img.height() as f32 * scale).round() as u32).max(1),
            );
            let original = if scale >= 1.0 {
                ops::resize_nearest(img, w, h)
            } else {
                ops::resize(img, w, h)
            };
            let mut row = vec![original];
            let views = pipeline.images(img, &mut sample_rng(seed, 0, i as u64));
            row.extend(
                views
                    .iter()
                    .map(|v| ops::resize_nearest(v, v.width() * zoom, v.height() * zoom)),
            );
            row
        })
        .collect();
    super::grid(&rows, cell, 4)
}

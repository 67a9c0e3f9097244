//! Rows of original | masked input | reconstruction, enlarged so that pixels stay visible.

use image::RgbImage;

use super::grid;
use crate::augment::ops;

/// A normalised CHW image back to 8-bit RGB: x·std + mean, clamped.
pub fn denormalize(
    data: &[f32],
    height: usize,
    width: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> RgbImage {
    let plane = height * width;
    RgbImage::from_fn(width as u32, height as u32, |x, y| {
        let i = y as usize * width + x as usize;
        image::Rgb(std::array::from_fn(|c| {
            ((data[c * plane + i] * std[c] + mean[c]) * 255.0)
                .round()
                .clamp(0.0, 255.0) as u8
        }))
    })
}

/// `img` with the pixels where `hidden` is true painted mid-gray.
pub fn hide(img: &RgbImage, hidden: &[bool]) -> RgbImage {
    let mut out = img.clone();
    for (p, &h) in out.pixels_mut().zip(hidden) {
        if h {
            *p = image::Rgb([128, 128, 128]);
        }
    }
    out
}

/// One row per image, each image enlarged to about 96 px with nearest-neighbour.
pub fn reconstruction_grid(rows: &[Vec<RgbImage>]) -> RgbImage {
    let side = rows
        .iter()
        .flatten()
        .map(|i| i.width().max(i.height()))
        .max()
        .unwrap_or(32);
    let zoom = 96u32.div_ceil(side).max(1);
    let big: Vec<Vec<RgbImage>> = rows
        .iter()
        .map(|r| {
            r.iter()
                .map(|i| ops::resize_nearest(i, i.width() * zoom, i.height() * zoom))
                .collect()
        })
        .collect();
    grid(&big, side * zoom, 4)
}

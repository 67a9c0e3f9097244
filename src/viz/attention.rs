//! DINO's attention pictures: the last block's class-token attention to the patches, one map per
//! head and their mean, upsampled and laid over the image with a colour map, and the mask that
//! keeps the most-attended patches holding 60% of the mean attention (the official
//! visualize_attention.py threshold).

use image::{Rgb, RgbImage};

use super::grid;
use crate::augment::ops;

/// One row: the image, one overlay per head, the overlay of the mean map, and the image with
/// everything outside the mean map's `mass` mask dimmed. `attention` is the class token's
/// attention to the `g`×`g` patches, `[heads][g·g]`.
pub fn attention_row(img: &RgbImage, attention: &[Vec<f32>], g: usize, mass: f32) -> Vec<RgbImage> {
    let heads = attention.len().max(1);
    let mean: Vec<f32> = (0..g * g)
        .map(|i| attention.iter().map(|a| a[i]).sum::<f32>() / heads as f32)
        .collect();
    let mut row = vec![img.clone()];
    row.extend(attention.iter().map(|a| overlay(img, a, g)));
    row.push(overlay(img, &mean, g));
    let keep = mass_mask(&mean, mass);
    let (w, h) = img.dimensions();
    let mut masked = img.clone();
    for (x, y, p) in masked.enumerate_pixels_mut() {
        let cell = (y as usize * g / h as usize) * g + x as usize * g / w as usize;
        if !keep[cell] {
            *p = Rgb(p.0.map(|c| c / 4));
        }
    }
    row.push(masked);
    row
}

/// The patches, most attended first, whose attention sums to `mass` of the total.
pub fn mass_mask(attention: &[f32], mass: f32) -> Vec<bool> {
    let total: f32 = attention.iter().sum();
    let mut order: Vec<usize> = (0..attention.len()).collect();
    order.sort_by(|&a, &b| attention[b].total_cmp(&attention[a]));
    let mut keep = vec![false; attention.len()];
    let mut sum = 0.0;
    for i in order {
        if sum >= mass * total {
            break;
        }
        keep[i] = true;
        sum += attention[i];
    }
    keep
}

/// The map scaled to [0, 1], bilinearly upsampled to the image, coloured, blended half and half.
fn overlay(img: &RgbImage, map: &[f32], g: usize) -> RgbImage {
    let (lo, hi) = map
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let scaled: Vec<u8> = map
        .iter()
        .map(|v| (255.0 * (v - lo) / (hi - lo).max(1e-12)).round() as u8)
        .collect();
    let small = RgbImage::from_fn(g as u32, g as u32, |x, y| {
        let v = scaled[y as usize * g + x as usize];
        Rgb([v, v, v])
    });
    let big = ops::resize(&small, img.width(), img.height());
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let c = inferno(big.get_pixel(x, y).0[0] as f32 / 255.0);
        let p = img.get_pixel(x, y).0;
        Rgb(std::array::from_fn(|k| {
            ((p[k] as u16 + c[k] as u16) / 2) as u8
        }))
    })
}

/// A dark-to-bright colour map (after matplotlib's inferno), by linear steps between five stops.
fn inferno(t: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [0.0, 0.0, 4.0],
        [87.0, 16.0, 110.0],
        [188.0, 55.0, 84.0],
        [249.0, 142.0, 9.0],
        [252.0, 255.0, 164.0],
    ];
    let x = t.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    std::array::from_fn(|k| (STOPS[i][k] * (1.0 - f) + STOPS[i + 1][k] * f).round() as u8)
}

/// Rows of attention pictures on one sheet.
pub fn attention_grid(rows: &[Vec<RgbImage>]) -> RgbImage {
    let side = rows
        .iter()
        .flatten()
        .map(|i| i.width())
        .max()
        .unwrap_or(224);
    grid(rows, side, 4)
}

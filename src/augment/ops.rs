//! Image operations on 8-bit RGB images, with torchvision's sampling and PIL's pixel semantics.

use fast_image_resize as fr;
use image::{Rgb, RgbImage};
use rand::Rng;

/// A crop box in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crop {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Crop {
    /// The whole of `img`.
    pub fn whole(img: &RgbImage) -> Crop {
        Crop {
            x: 0,
            y: 0,
            w: img.width(),
            h: img.height(),
        }
    }
}

/// torchvision's `RandomResizedCrop.get_params`: ten tries at an area fraction drawn from
/// `scale` and a log-uniform aspect ratio from `ratio`, then the central crop clamped to `ratio`.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: [f32; 2],
    ratio: [f32; 2],
    rng: &mut impl Rng,
) -> Crop {
    let (wf, hf) = (width as f64, height as f64);
    let area = wf * hf;
    let (log_lo, log_hi) = ((ratio[0] as f64).ln(), (ratio[1] as f64).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0] as f64..=scale[1] as f64);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as u32;
        let h = (target / aspect).sqrt().round() as u32;
        if w > 0 && h > 0 && w <= width && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return Crop { x, y, w, h };
        }
    }
    let in_ratio = wf / hf;
    let (w, h) = if in_ratio < ratio[0] as f64 {
        (
            width,
            ((wf / ratio[0] as f64).round() as u32).clamp(1, height),
        )
    } else if in_ratio > ratio[1] as f64 {
        (
            ((hf * ratio[1] as f64).round() as u32).clamp(1, width),
            height,
        )
    } else {
        (width, height)
    };
    Crop {
        x: (width - w) / 2,
        y: (height - h) / 2,
        w,
        h,
    }
}

/// The largest central square.
pub fn center_square(width: u32, height: u32) -> Crop {
    let side = width.min(height);
    Crop {
        x: (width - side) / 2,
        y: (height - side) / 2,
        w: side,
        h: side,
    }
}

/// How a crop is resized to its view's size (antialiased as PIL's filters, unless the view's
/// `antialias` is false).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    /// torchvision's default, as SimCLR and MoCo crop.
    #[default]
    Bilinear,
    /// PIL's bicubic (Catmull-Rom, a = −0.5), as DINO's and MAE's crops (`interpolation=3`).
    Bicubic,
}

/// Antialiased resize of the `crop` of `img` to `w`×`h` (PIL's bilinear filter).
pub fn crop_resize(img: &RgbImage, crop: Crop, w: u32, h: u32) -> RgbImage {
    crop_resize_with(img, crop, w, h, Interpolation::Bilinear, true)
}

/// Resize of the `crop` of `img` to `w`×`h` with the given filter: `antialias`, the filter
/// widened by the shrink factor where the crop is shrunk (PIL's, and torchvision's
/// `antialias=True`), else the filter's own support (`grid_sample`'s and OpenCV's bilinear).
pub fn crop_resize_with(
    img: &RgbImage,
    crop: Crop,
    w: u32,
    h: u32,
    interpolation: Interpolation,
    antialias: bool,
) -> RgbImage {
    let filter = match interpolation {
        Interpolation::Bilinear => fr::FilterType::Bilinear,
        Interpolation::Bicubic => fr::FilterType::CatmullRom,
    };
    let mut dst = RgbImage::new(w, h);
    let opts = fr::ResizeOptions::new()
        .resize_alg(match antialias {
            true => fr::ResizeAlg::Convolution(filter),
            false => fr::ResizeAlg::Interpolation(filter),
        })
        .crop(crop.x as f64, crop.y as f64, crop.w as f64, crop.h as f64);
    fr::Resizer::new()
        .resize(img, &mut dst, &opts)
        .expect("u8x3 to u8x3 resize");
    dst
}

/// Antialiased bilinear resize of the whole image.
pub fn resize(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    crop_resize(img, Crop::whole(img), w, h)
}

/// Nearest-neighbour resize: shows pixels as they are (pictures of small views).
pub fn resize_nearest(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    let mut dst = RgbImage::new(w, h);
    let opts = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Nearest);
    fr::Resizer::new()
        .resize(img, &mut dst, &opts)
        .expect("u8x3 to u8x3 resize");
    dst
}

pub fn flip_horizontal(img: &mut RgbImage) {
    image::imageops::flip_horizontal_in_place(img);
}

/// Rotation counter-clockwise by `quarters` × 90° (torchvision's `rotate(img, 90 * quarters)`).
pub fn rotate90(img: &RgbImage, quarters: u32) -> RgbImage {
    match quarters % 4 {
        0 => img.clone(),
        1 => image::imageops::rotate270(img), // image's rotate270 is clockwise 270 = ccw 90
        2 => image::imageops::rotate180(img),
        _ => image::imageops::rotate90(img),
    }
}

/// PIL's luma ("L" mode): (299 R + 587 G + 114 B) / 1000, in PIL's fixed-point form.
pub fn luma(p: &Rgb<u8>) -> u8 {
    ((p.0[0] as u32 * 19595 + p.0[1] as u32 * 38470 + p.0[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Grayscale with three equal channels.
pub fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let l = luma(p);
        p.0 = [l, l, l];
    }
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// `factor · img + (1 − factor) · other`, PIL's `Image.blend(other, img, factor)`.
fn blend_with(img: &mut RgbImage, factor: f32, other: impl Fn(&Rgb<u8>) -> [f32; 3]) {
    for p in img.pixels_mut() {
        let o = other(p);
        for c in 0..3 {
            p.0[c] = to_u8(factor * p.0[c] as f32 + (1.0 - factor) * o[c]);
        }
    }
}

/// Brightness: blends with black.
pub fn adjust_brightness(img: &mut RgbImage, factor: f32) {
    blend_with(img, factor, |_| [0.0; 3]);
}

/// Contrast: blends with the mean gray level of the image.
pub fn adjust_contrast(img: &mut RgbImage, factor: f32) {
    let n = (img.width() * img.height()).max(1) as f32;
    let mean = (img.pixels().map(|p| luma(p) as f32).sum::<f32>() / n).round();
    blend_with(img, factor, |_| [mean; 3]);
}

/// Saturation: blends with the image's own grayscale.
pub fn adjust_saturation(img: &mut RgbImage, factor: f32) {
    blend_with(img, factor, |p| [luma(p) as f32; 3]);
}

/// Hue: rotates the hue by `shift` turns (in [−0.5, 0.5]) in HSV space.
pub fn adjust_hue(img: &mut RgbImage, shift: f32) {
    for p in img.pixels_mut() {
        let [r, g, b] = p.0.map(|v| v as f32 / 255.0);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta == 0.0 {
            continue; // gray: hue has no effect
        }
        let h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let h = (h + shift).rem_euclid(1.0) * 6.0;
        let (s, v) = (delta / max, max);
        let i = h.floor();
        let f = h - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let rgb = match i as i32 % 6 {
            0 => [v, t, pp],
            1 => [q, v, pp],
            2 => [pp, v, t],
            3 => [pp, q, v],
            4 => [t, pp, v],
            _ => [v, pp, q],
        };
        p.0 = rgb.map(|c| to_u8(c * 255.0));
    }
}

/// PIL's `ImageOps.solarize(img, 128)`: values at or above the threshold are inverted.
pub fn solarize(img: &mut RgbImage, threshold: u8) {
    for v in img.iter_mut() {
        if *v >= threshold {
            *v = 255 - *v;
        }
    }
}

/// Separable Gaussian blur with reflected borders (torchvision's `gaussian_blur`).
pub fn gaussian_blur(img: &mut RgbImage, kernel_size: u32, sigma: f32) {
    let k = (kernel_size | 1).max(3) as i64; // odd
    let half = k / 2;
    let weights: Vec<f32> = (-half..=half)
        .map(|x| (-(x * x) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    let (w, h) = (img.width() as i64, img.height() as i64);
    let reflect = |i: i64, n: i64| -> usize {
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - m }) as usize
    };
    let src: Vec<f32> = img.iter().map(|&v| v as f32).collect();
    let mut tmp = vec![0f32; src.len()];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc = 0.0;
                for (t, wt) in weights.iter().enumerate() {
                    let xx = reflect(x + t as i64 - half, w);
                    acc += wt * src[(y as usize * w as usize + xx) * 3 + c];
                }
                tmp[(y * w + x) as usize * 3 + c] = acc;
            }
        }
    }
    let out: &mut [u8] = img;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let mut acc = 0.0;
                for (t, wt) in weights.iter().enumerate() {
                    let yy = reflect(y + t as i64 - half, h);
                    acc += wt * tmp[(yy * w as usize + x as usize) * 3 + c];
                }
                out[(y * w + x) as usize * 3 + c] = to_u8(acc);
            }
        }
    }
}

/// Jigsaw tiles (Noroozi & Favaro): the image is cut into a `grid`×`grid` array of cells and a
/// `tile`×`tile` square is taken from each at a random offset, so that tiles are separated by
/// gaps of random width and their edges do not line up (no shortcut through edge continuity).
/// Tiles come in row-major order.
pub fn jigsaw_tiles(img: &RgbImage, grid: u32, tile: u32, rng: &mut impl Rng) -> Vec<RgbImage> {
    let (cw, ch) = (img.width() / grid, img.height() / grid);
    let tile = tile.min(cw).min(ch);
    let mut out = Vec::with_capacity((grid * grid) as usize);
    for gy in 0..grid {
        for gx in 0..grid {
            let x = gx * cw + rng.random_range(0..=cw - tile);
            let y = gy * ch + rng.random_range(0..=ch - tile);
            out.push(image::imageops::crop_imm(img, x, y, tile, tile).to_image());
        }
    }
    out
}

/// Adds `shifts[c]` grey levels to channel c of every pixel, clipped to 0..=255.
pub fn shift_channels(img: &mut RgbImage, shifts: [i16; 3]) {
    for pixel in img.pixels_mut() {
        for (v, s) in pixel.0.iter_mut().zip(shifts) {
            *v = (*v as i16 + s).clamp(0, 255) as u8;
        }
    }
}

/// The region an inpainting mask hides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskKind {
    /// One square in the middle.
    Central,
    /// Squares at random places until the area is covered.
    RandomBlocks,
    /// A random blob: smooth noise thresholded to the asked area.
    RandomRegion,
}

/// A `w`×`h` inpainting mask M, row-major: true where pixels are hidden (M = 1).
pub fn inpainting_mask(kind: MaskKind, w: u32, h: u32, area: f32, rng: &mut impl Rng) -> Vec<bool> {
    let (wu, hu) = (w as usize, h as usize);
    let n = wu * hu;
    let target = ((area.clamp(0.0, 1.0) * n as f32).round() as usize).min(n);
    let mut mask = vec![false; n];
    let fill = |mask: &mut Vec<bool>, x0: usize, y0: usize, sw: usize, sh: usize| {
        for y in y0..(y0 + sh).min(hu) {
            for x in x0..(x0 + sw).min(wu) {
                mask[y * wu + x] = true;
            }
        }
    };
    match kind {
        MaskKind::Central => {
            let side_w = ((area.sqrt() * w as f32).round() as usize).min(wu);
            let side_h = ((area.sqrt() * h as f32).round() as usize).min(hu);
            fill(
                &mut mask,
                (wu - side_w) / 2,
                (hu - side_h) / 2,
                side_w,
                side_h,
            );
        }
        MaskKind::RandomBlocks => {
            let side = ((wu.min(hu) as f32 / 4.0).round() as usize).max(1);
            while mask.iter().filter(|&&m| m).count() < target {
                let x = rng.random_range(0..=wu - side.min(wu));
                let y = rng.random_range(0..=hu - side.min(hu));
                fill(&mut mask, x, y, side, side);
            }
        }
        MaskKind::RandomRegion => {
            // 4x4 uniform noise, bilinearly upsampled: a smooth field whose top `target` pixels
            // form a few connected blobs of random shape.
            let g = 4usize;
            let noise: Vec<f32> = (0..g * g).map(|_| rng.random::<f32>()).collect();
            let sample = |fx: f32, fy: f32| -> f32 {
                let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(g - 1), (y0 + 1).min(g - 1));
                let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
                let at = |x: usize, y: usize| noise[y * g + x];
                (at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx) * (1.0 - ty)
                    + (at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx) * ty
            };
            let field: Vec<f32> = (0..n)
                .map(|i| {
                    let (x, y) = (i % wu, i / wu);
                    sample(
                        x as f32 / wu as f32 * (g - 1) as f32,
                        y as f32 / hu as f32 * (g - 1) as f32,
                    )
                })
                .collect();
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| field[b].total_cmp(&field[a]));
            for &i in &order[..target] {
                mask[i] = true;
            }
        }
    }
    mask
}

//! RandAugment (Cubuk et al. 2020) as timm's `rand_augment_transform` runs it for MAE's
//! fine-tuning (`rand-m9-mstd0.5-inc1`): `n` operations drawn uniformly with replacement from
//! the fifteen "increasing" ones, each applied with probability ½ at a magnitude drawn from
//! N(m, mstd) clipped to [0, 10]. Geometric operations resample bicubically and fill with the
//! dataset mean, as timm's `img_mean` hparam. Every operation follows PIL's (`ImageOps`,
//! `ImageEnhance`, `Image.transform`), on 8-bit RGB.

use image::{Rgb, RgbImage};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::ops;

/// `n` operations at magnitude `m` (of 10) with spread `mstd`; `n` = 0 is off.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandAugment {
    pub n: usize,
    pub m: f32,
    pub mstd: f32,
    /// What geometric operations leave behind: timm's `img_mean` (the normalisation mean as
    /// 8-bit values) where a pipeline sets it, else its mid grey.
    #[serde(skip)]
    pub fill: [u8; 3],
}

impl Default for RandAugment {
    /// Off; MAE's fine-tuning takes n 2, m 9, mstd 0.5.
    fn default() -> Self {
        RandAugment {
            n: 0,
            m: 9.0,
            mstd: 0.5,
            fill: [128; 3],
        }
    }
}

/// timm's `_RAND_INCREASING_TRANSFORMS`: stronger with the magnitude, every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

pub const OPS: [Op; 15] = [
    Op::AutoContrast,
    Op::Equalize,
    Op::Invert,
    Op::Rotate,
    Op::Posterize,
    Op::Solarize,
    Op::SolarizeAdd,
    Op::Color,
    Op::Contrast,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
];

impl RandAugment {
    pub fn is_off(&self) -> bool {
        self.n == 0
    }

    /// Refuses a magnitude or spread that is negative or not finite (`key` names the recipe
    /// key).
    pub fn check(&self, key: &str) -> anyhow::Result<()> {
        crate::config::not_negative(&format!("{key}.m"), self.m)?;
        crate::config::not_negative(&format!("{key}.mstd"), self.mstd)
    }

    /// `img` through `n` random operations.
    pub fn apply(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        let spread = Normal::new(self.m as f64, self.mstd.max(0.0) as f64).ok();
        for _ in 0..self.n {
            let op = OPS[rng.random_range(0..OPS.len())];
            if rng.random::<f64>() > 0.5 {
                continue;
            }
            let m = match (self.mstd > 0.0, &spread) {
                (true, Some(d)) => d.sample(rng),
                _ => self.m as f64,
            };
            let level = m.clamp(0.0, 10.0) / 10.0;
            let sign = if rng.random::<f64>() > 0.5 { -1.0 } else { 1.0 };
            apply_op(img, op, level, sign, self.fill);
        }
    }
}

/// One operation at `level` (magnitude / 10) with `sign` (±1) for the signed ones, as timm's
/// level-to-argument functions map it.
pub fn apply_op(img: &mut RgbImage, op: Op, level: f64, sign: f64, fill: [u8; 3]) {
    let enhance = (1.0 + sign * level * 0.9).max(0.1) as f32;
    let (w, h) = (img.width() as f64, img.height() as f64);
    match op {
        Op::AutoContrast => auto_contrast(img),
        Op::Equalize => equalize(img),
        Op::Invert => map_values(img, |v| 255 - v),
        Op::Posterize => posterize(img, 4 - (level * 4.0) as u32),
        Op::Solarize => solarize(img, 256 - (level * 256.0) as u32),
        Op::SolarizeAdd => {
            let add = (level * 110.0) as u32;
            map_values(img, |v| {
                if v < 128 {
                    (v as u32 + add).min(255) as u8
                } else {
                    v
                }
            })
        }
        Op::Color => ops::adjust_saturation(img, enhance),
        Op::Contrast => ops::adjust_contrast(img, enhance),
        Op::Brightness => ops::adjust_brightness(img, enhance),
        Op::Sharpness => sharpness(img, enhance),
        Op::Rotate => {
            // PIL's rotate(θ): counter-clockwise about the centre c; output p samples the
            // input at R·(p − c) + c, R = [[cos θ, −sin θ], [sin θ, cos θ]] (y down).
            let t = (sign * level * 30.0).to_radians();
            let (c, s) = (t.cos(), t.sin());
            let (cx, cy) = (w / 2.0, h / 2.0);
            *img = affine(
                img,
                [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy],
                fill,
            );
        }
        Op::ShearX => *img = affine(img, [1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0], fill),
        Op::ShearY => *img = affine(img, [1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0], fill),
        Op::TranslateX => {
            *img = affine(
                img,
                [1.0, 0.0, sign * level * 0.45 * w, 0.0, 1.0, 0.0],
                fill,
            )
        }
        Op::TranslateY => {
            *img = affine(
                img,
                [1.0, 0.0, 0.0, 0.0, 1.0, sign * level * 0.45 * h],
                fill,
            )
        }
    }
}

fn map_values(img: &mut RgbImage, f: impl Fn(u8) -> u8) {
    for v in img.iter_mut() {
        *v = f(*v);
    }
}

/// PIL's `ImageOps.posterize`: keeps the top `bits` bits of every value.
pub fn posterize(img: &mut RgbImage, bits: u32) {
    if bits >= 8 {
        return;
    }
    let mask = !((1u32 << (8 - bits)) - 1) as u8;
    map_values(img, |v| v & mask);
}

/// PIL's `ImageOps.solarize`: values at or above `threshold` inverted.
pub fn solarize(img: &mut RgbImage, threshold: u32) {
    map_values(img, |v| if (v as u32) < threshold { v } else { 255 - v });
}

/// A channel's 256-bin histogram.
fn histogram(img: &RgbImage, ch: usize) -> [u32; 256] {
    let mut h = [0u32; 256];
    for p in img.pixels() {
        h[p.0[ch] as usize] += 1;
    }
    h
}

fn apply_luts(img: &mut RgbImage, luts: &[[u8; 256]; 3]) {
    for p in img.pixels_mut() {
        for (ch, v) in p.0.iter_mut().enumerate() {
            *v = luts[ch][*v as usize];
        }
    }
}

/// PIL's `ImageOps.autocontrast` (no cutoff): each channel stretched from its min and max to
/// 0-255.
pub fn auto_contrast(img: &mut RgbImage) {
    let luts = [0, 1, 2].map(|ch| {
        let h = histogram(img, ch);
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(255);
        let mut lut = [0u8; 256];
        for (i, v) in lut.iter_mut().enumerate() {
            *v = if hi <= lo {
                i as u8
            } else {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                (i as f64 * scale + offset).clamp(0.0, 255.0) as u8
            };
        }
        lut
    });
    apply_luts(img, &luts);
}

/// PIL's `ImageOps.equalize`: each channel's values mapped by its cumulative histogram (the
/// last occupied bin left out, PIL's step rule).
pub fn equalize(img: &mut RgbImage) {
    let luts = [0, 1, 2].map(|ch| {
        let h = histogram(img, ch);
        let used: Vec<u32> = h.iter().copied().filter(|&n| n > 0).collect();
        let mut lut = [0u8; 256];
        for (i, v) in lut.iter_mut().enumerate() {
            *v = i as u8;
        }
        if used.len() <= 1 {
            return lut;
        }
        let step = (used.iter().sum::<u32>() - used[used.len() - 1]) / 255;
        if step == 0 {
            return lut;
        }
        let mut n = step / 2;
        for (i, v) in lut.iter_mut().enumerate() {
            *v = (n / step).min(255) as u8;
            n += h[i];
        }
        lut
    });
    apply_luts(img, &luts);
}

/// PIL's `ImageEnhance.Sharpness`: blends with the image smoothed by [[1 1 1] [1 5 1] [1 1 1]]/13
/// (border pixels kept), by `factor` (1: unchanged).
pub fn sharpness(img: &mut RgbImage, factor: f32) {
    let (w, h) = img.dimensions();
    let mut smooth = img.clone();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            let mut sum = [0u32; 3];
            for dy in 0..3 {
                for dx in 0..3 {
                    let weight = if dx == 1 && dy == 1 { 5 } else { 1 };
                    let p = img.get_pixel(x + dx - 1, y + dy - 1);
                    for ch in 0..3 {
                        sum[ch] += weight * p.0[ch] as u32;
                    }
                }
            }
            smooth.put_pixel(x, y, Rgb(sum.map(|s| ((s + 6) / 13) as u8)));
        }
    }
    for (p, s) in img.pixels_mut().zip(smooth.pixels()) {
        for ch in 0..3 {
            let v = s.0[ch] as f32 + factor * (p.0[ch] as f32 - s.0[ch] as f32);
            p.0[ch] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// PIL's `Image.transform(AFFINE, (a, b, c, d, e, f), BICUBIC, fillcolor)`: output pixel (x, y)
/// (its centre at x + ½) samples the input at (a·x + b·y + c, d·x + e·y + f); outside the
/// input, `fill`.
pub fn affine(img: &RgbImage, [a, b, c, d, e, f]: [f64; 6], fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let at = |x: i64, y: i64, ch: usize| {
        let (x, y) = (x.clamp(0, w as i64 - 1), y.clamp(0, h as i64 - 1));
        img.get_pixel(x as u32, y as u32).0[ch] as f64
    };
    RgbImage::from_fn(w, h, |x, y| {
        let (xo, yo) = (x as f64 + 0.5, y as f64 + 0.5);
        let (xi, yi) = (a * xo + b * yo + c, d * xo + e * yo + f);
        if xi < 0.0 || yi < 0.0 || xi >= w as f64 || yi >= h as f64 {
            return Rgb(fill);
        }
        // Bicubic (a = −0.5) around the sample point, in pixel-centre coordinates.
        let (sx, sy) = (xi - 0.5, yi - 0.5);
        let (x0, y0) = (sx.floor(), sy.floor());
        let (tx, ty) = (sx - x0, sy - y0);
        let (wx, wy) = (cubic_weights(tx), cubic_weights(ty));
        Rgb([0, 1, 2].map(|ch| {
            let mut v = 0.0;
            for (j, wyj) in wy.iter().enumerate() {
                for (i, wxi) in wx.iter().enumerate() {
                    v += wyj * wxi * at(x0 as i64 + i as i64 - 1, y0 as i64 + j as i64 - 1, ch);
                }
            }
            v.round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// Keys' cubic convolution weights (a = −0.5) of the 4 taps around a point `t` ∈ [0, 1) past
/// the second.
fn cubic_weights(t: f64) -> [f64; 4] {
    let k = |x: f64| {
        let x = x.abs();
        let a = -0.5;
        if x < 1.0 {
            ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
        } else {
            0.0
        }
    };
    [k(1.0 + t), k(t), k(1.0 - t), k(2.0 - t)]
}

//! The regularising augmentations of fine-tuning, as MAE's `main_finetune.py` takes them from
//! timm: mixup and CutMix over the batch (`timm.data.Mixup`: mixup α 0.8, CutMix α 1.0, one of
//! the two per batch, CutMix with probability ½, λ corrected to the pasted area, labels smoothed
//! by 0.1) and random erasing of single images (`timm.data.RandomErasing`: probability 0.25, a
//! rectangle of 2%–⅓ of the image with aspect 0.3–3.3, filled with N(0, 1) noise per pixel
//! after normalisation).

use std::ops::Range;

use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_distr::{Beta, Distribution, StandardNormal};

/// How one batch is mixed with its reverse (image i with image n−1−i, timm's `mode='batch'`).
#[derive(Debug, Clone, PartialEq)]
pub enum Mix {
    /// x ← λ·x + (1−λ)·x_reversed.
    Mixup { lam: f64 },
    /// The box `rows` × `cols` pasted from the reversed batch; λ is the area left.
    Cutmix {
        lam: f64,
        rows: Range<usize>,
        cols: Range<usize>,
    },
}

impl Mix {
    /// The mixing of one batch of `h`×`w` images: CutMix with probability `switch_prob` when
    /// both α are positive, λ ~ Beta(α, α) of the one chosen; `None` when both α are 0.
    pub fn draw(
        mixup_alpha: f64,
        cutmix_alpha: f64,
        switch_prob: f64,
        [h, w]: [usize; 2],
        rng: &mut impl Rng,
    ) -> Option<Mix> {
        let cutmix = match (mixup_alpha > 0.0, cutmix_alpha > 0.0) {
            (false, false) => return None,
            (true, true) => rng.random::<f64>() < switch_prob,
            (_, only_cutmix) => only_cutmix,
        };
        if !cutmix {
            return Some(Mix::Mixup {
                lam: beta(mixup_alpha, rng),
            });
        }
        let lam = beta(cutmix_alpha, rng);
        let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
        let (rows, cols) = cutmix_box([h, w], lam, [cy, cx]);
        let lam = 1.0 - (rows.len() * cols.len()) as f64 / (h * w) as f64;
        Some(Mix::Cutmix { lam, rows, cols })
    }

    /// The weight of each image's own label.
    pub fn lam(&self) -> f64 {
        match self {
            Mix::Mixup { lam } | Mix::Cutmix { lam, .. } => *lam,
        }
    }

    /// The targets `[n, classes]` of the mixed batch from those of the batch, `t`:
    /// λ·t + (1−λ)·t_reversed (timm's `mixup_target`).
    pub fn apply_targets(&self, t: Tensor<2>) -> Tensor<2> {
        let lam = self.lam();
        t.clone().mul_scalar(lam) + t.flip([0]).mul_scalar(1.0 - lam)
    }

    /// The mixed batch of `x` (`[n, c, h, w]`).
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let reversed = x.clone().flip([0]);
        match self {
            Mix::Mixup { lam } => x.mul_scalar(*lam) + reversed.mul_scalar(1.0 - lam),
            Mix::Cutmix { rows, cols, .. } => {
                let [_, _, h, w] = x.dims();
                let inside: Vec<f32> = (0..h * w)
                    .map(|i| (rows.contains(&(i / w)) && cols.contains(&(i % w))) as u8 as f32)
                    .collect();
                let m = Tensor::<4>::from_data(TensorData::new(inside, [1, 1, h, w]), &x.device());
                x * m.clone().neg().add_scalar(1.0) + reversed * m
            }
        }
    }
}

/// λ ~ Beta(α, α) (α > 0).
fn beta(alpha: f64, rng: &mut impl Rng) -> f64 {
    Beta::new(alpha, alpha).map_or(1.0, |b| b.sample(rng))
}

/// CutMix's box for λ around the centre (cy, cx): each side √(1−λ) of the image's (truncated),
/// half on either side of the centre, clipped to the image (timm's `rand_bbox`).
pub fn cutmix_box(
    [h, w]: [usize; 2],
    lam: f64,
    [cy, cx]: [usize; 2],
) -> (Range<usize>, Range<usize>) {
    let ratio = (1.0 - lam).max(0.0).sqrt();
    let (cut_h, cut_w) = ((h as f64 * ratio) as usize, (w as f64 * ratio) as usize);
    let span = |c: usize, cut: usize, len: usize| c.saturating_sub(cut / 2)..(c + cut / 2).min(len);
    (span(cy, cut_h, h), span(cx, cut_w, w))
}

/// The label-smoothed targets `[n, classes]` of `labels`: 1 − ε + ε/K on the label, ε/K
/// elsewhere (timm's `one_hot(.., on_value, off_value)`).
pub fn smoothed_targets(
    labels: &[usize],
    classes: usize,
    smoothing: f64,
    device: &Device,
) -> Tensor<2> {
    let n = labels.len();
    let off = smoothing / classes as f64;
    let mut t = vec![off as f32; n * classes];
    for (row, &y) in t.chunks_mut(classes).zip(labels) {
        row[y] = (1.0 - smoothing + off) as f32;
    }
    Tensor::from_data(TensorData::new(t, [n, classes]), device)
}

/// Soft targets `[n, classes]` of a batch mixed with weight `lam` (timm's `mixup_target`): each
/// label smoothed ([`smoothed_targets`]), weighted λ, plus the reversed batch's weighted 1 − λ.
pub fn mixup_targets(
    labels: &[usize],
    classes: usize,
    lam: f64,
    smoothing: f64,
    device: &Device,
) -> Tensor<2> {
    Mix::Mixup { lam }.apply_targets(smoothed_targets(labels, classes, smoothing, device))
}

/// Random erasing of one normalised `[c, h, w]` image in place, with probability `p`: up to 10
/// tries for a rectangle of 2%–⅓ of the area and log-uniform aspect in [0.3, 1/0.3] that fits,
/// filled with N(0, 1) per value (timm's `RandomErasing(mode='pixel')`). Returns whether it
/// erased.
pub fn random_erase(image: &mut [f32], [c, h, w]: [usize; 3], p: f64, rng: &mut impl Rng) -> bool {
    if p <= 0.0 || rng.random::<f64>() > p {
        return false;
    }
    let area = (h * w) as f64;
    let log_aspect = (0.3f64.ln(), (1.0 / 0.3f64).ln());
    for _ in 0..10 {
        let target = rng.random_range(0.02..1.0 / 3.0) * area;
        let aspect = rng.random_range(log_aspect.0..log_aspect.1).exp();
        let eh = (target * aspect).sqrt().round() as usize;
        let ew = (target / aspect).sqrt().round() as usize;
        if ew < w && eh < h {
            let (top, left) = (rng.random_range(0..=h - eh), rng.random_range(0..=w - ew));
            for ch in 0..c {
                for y in top..top + eh {
                    for v in &mut image[(ch * h + y) * w + left..(ch * h + y) * w + left + ew] {
                        *v = StandardNormal.sample(rng);
                    }
                }
            }
            return true;
        }
    }
    false
}

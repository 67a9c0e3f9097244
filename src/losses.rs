//! Losses, each written once with its formula.

use burn::tensor::activation::relu;
use burn::tensor::{Int, Tensor, TensorData};

use crate::kernels;

/// Rows scaled to unit l2 norm (ε keeps a zero row finite).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Cosine similarities of every row of `a` with every row of `b`, divided by τ: `[n_a, n_b]`.
pub fn cosine_logits(a: Tensor<2>, b: Tensor<2>, tau: f64) -> Tensor<2> {
    l2_normalize(a)
        .matmul(l2_normalize(b).transpose())
        .div_scalar(tau)
}

/// Cross-entropy of `logits` `[n, c]` against class indices: mean over rows of
/// −log softmax(logits)[target].
pub fn cross_entropy(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    let [n, _] = logits.dims();
    let device = logits.device();
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let idx = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &device);
    kernels::log_softmax(logits).gather(1, idx).mean().neg()
}

/// Cross-entropy against labels smoothed by ε (Szegedy et al. 2016; timm's
/// `LabelSmoothingCrossEntropy`, which MAE's fine-tuning uses with ε = 0.1): the target puts
/// 1 − ε on the label and ε spread evenly over all classes, so
/// L = (1 − ε)·(−log p_y) + ε·mean_c(−log p_c), averaged over the batch. ε = 0 is
/// [`cross_entropy`].
pub fn cross_entropy_smoothed(logits: Tensor<2>, targets: &[usize], epsilon: f64) -> Tensor<1> {
    if epsilon == 0.0 {
        return cross_entropy(logits, targets);
    }
    let uniform = kernels::log_softmax(logits.clone()).mean().neg();
    cross_entropy(logits, targets).mul_scalar(1.0 - epsilon) + uniform.mul_scalar(epsilon)
}

/// Cross-entropy against soft targets `[n, classes]` (rows summing to 1): mean over the batch
/// of −Σ_c t_c·log p_c, timm's `SoftTargetCrossEntropy` for mixup and CutMix.
pub fn soft_cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    let [n, _] = logits.dims();
    (kernels::log_softmax(logits) * targets)
        .sum()
        .div_scalar(n as f64)
        .neg()
}

/// InfoNCE (van den Oord et al. 2018), over logits s(q, k)/τ:
///
///   L = −log( exp(s(q,k+)/τ) / (exp(s(q,k+)/τ) + Σ_j exp(s(q,k_j−)/τ)) )
///
/// Row i of `logits` holds query i against its candidates; `positives[i]` is the column of its
/// positive key, every other column is a negative. Columns to ignore (a view against itself)
/// must be masked to −∞ beforehand. SimCLR passes in-batch similarities (2N views, 2N−2
/// negatives each), MoCo the positive at column 0 followed by its queue.
pub fn info_nce(logits: Tensor<2>, positives: &[usize]) -> Tensor<1> {
    cross_entropy(logits, positives)
}

/// SimCLR's NT-Xent: InfoNCE over the 2N views of N images, with z1[i] and z2[i] positives of
/// each other and every other view in the batch a negative; symmetric by construction.
pub fn nt_xent(z1: Tensor<2>, z2: Tensor<2>, tau: f64) -> Tensor<1> {
    let [n, _] = z1.dims();
    let device = z1.device();
    let z = Tensor::cat(vec![z1, z2], 0);
    let self_mask = Tensor::<2>::eye(2 * n, &device).mul_scalar(1e9);
    let logits = cosine_logits(z.clone(), z, tau) - self_mask;
    let positives: Vec<usize> = (0..2 * n).map(|i| (i + n) % (2 * n)).collect();
    info_nce(logits, &positives)
}

/// Mean over dimensions of the standard deviation of l2-normalised embeddings: about 1/√d for
/// spread-out embeddings, 0 when they collapse to one point (SimSiam's collapse monitor); `[1]`,
/// on z's device, no gradient.
pub fn embedding_std(z: Tensor<2>) -> Tensor<1> {
    let z = l2_normalize(z.detach());
    let [n, _] = z.dims();
    let mean = z.clone().mean_dim(0);
    let var = (z - mean)
        .square()
        .sum_dim(0)
        .div_scalar((n.max(2) - 1) as f64);
    var.sqrt().mean()
}

/// Fraction of rows whose largest logit is at the target class (a pretext task's accuracy): `[1]`,
/// on the logits' device, no gradient.
pub fn accuracy(logits: Tensor<2>, targets: &[usize]) -> Tensor<1> {
    let [n, _] = logits.dims();
    let idx: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
    let targets = Tensor::<2, Int>::from_data(TensorData::new(idx, [n, 1]), &logits.device());
    logits.detach().argmax(1).equal(targets).float().mean()
}

/// DINO's cross-entropy between the teacher's distributions over the global crops and the
/// student's over every crop, averaged over the pairs (i, j) with j ≠ i:
///
///   L = 1/|pairs| Σ_{i ∈ global} Σ_{j ≠ i} mean_batch( −Σ_k P_t,i(k) · log softmax(s_j / τs)(k) ).
///
/// `teacher` holds P_t,i = softmax((t_i − c) / τt) (centred, sharpened, no gradient); crop i of
/// the teacher and crop i of `student` are the same view.
pub fn dino_loss(teacher: &[Tensor<2>], student: &[Tensor<2>], student_temp: f64) -> Tensor<1> {
    let logs: Vec<Tensor<2>> = student
        .iter()
        .map(|s| kernels::log_softmax(s.clone().div_scalar(student_temp)))
        .collect();
    let mut pairs = Vec::new();
    for (i, p) in teacher.iter().enumerate() {
        for (j, log_q) in logs.iter().enumerate() {
            if i != j {
                pairs.push((p.clone() * log_q.clone()).sum_dim(1).mean().neg());
            }
        }
    }
    assert!(!pairs.is_empty(), "DINO needs two crops or more");
    Tensor::cat(pairs, 0).mean()
}

/// SwAV's swapped prediction (Caron et al. 2020, eq. 1 with the multi-crop sum): the code q_i of
/// each crop i that has one (`assignments`, no gradient) is predicted from every other crop
/// j ≠ i by the softmax of its prototype scores over τ (`scores`, crop i of each list the same
/// view), averaged over the pairs (`main_swav.py`: the mean over the other crops, then over
/// the crops with codes):
///
///   L = 1/|pairs| Σ_{i ∈ coded} Σ_{j ≠ i} mean_batch( −Σ_k q_i(k) · log softmax(s_j / τ)(k) ).
///
/// The same cross-entropy as DINO's, with Sinkhorn codes in place of the teacher's outputs.
pub fn swav_loss(assignments: &[Tensor<2>], scores: &[Tensor<2>], tau: f64) -> Tensor<1> {
    dino_loss(assignments, scores, tau)
}

/// Sinkhorn-Knopp (Cuturi 2013) as SwAV computes its codes (`distributed_sinkhorn` in
/// `main_swav.py`): from prototype scores `[B, K]` (B samples, K prototypes), Q = exp(s/ε)
/// scaled to sum 1, then `iterations` times each prototype's column scaled to total 1/K and each
/// sample's row to 1/B; returned ×B, so each row is a sample's soft assignment (sums to 1) and the
/// prototypes share the samples equally. `[B, K]`, no gradient. Computed on log Q (each scaling a
/// subtraction of a log-sum-exp), the same numbers without exp(s/ε)'s overflow or underflow at
/// small ε: in f32, exp(1/ε) overflows below ε = 0.0114, and a prototype whose every entry
/// underflows would divide 0 by 0.
pub fn sinkhorn(scores: Tensor<2>, epsilon: f64, iterations: usize) -> Tensor<2> {
    let [b, k] = scores.dims();
    let log_q = scores.detach().div_scalar(epsilon);
    let mut log_q = log_q.clone() - log_sum_exp(log_q.reshape([1, b * k]), 1).reshape([1, 1]);
    for _ in 0..iterations {
        log_q = log_q.clone() - log_sum_exp(log_q, 0).add_scalar((k as f64).ln());
        log_q = log_q.clone() - log_sum_exp(log_q, 1).add_scalar((b as f64).ln());
    }
    log_q.add_scalar((b as f64).ln()).exp()
}

/// log Σ exp(x) along `dim`, kept as a size-1 dimension; the maximum taken out first.
fn log_sum_exp(x: Tensor<2>, dim: usize) -> Tensor<2> {
    let max = x.clone().max_dim(dim);
    (x - max.clone()).exp().sum_dim(dim).log() + max
}

/// Mean over rows of the entropy −Σ p log p of each row's distribution: `[1]`, no gradient.
pub fn mean_entropy(p: Tensor<2>) -> Tensor<1> {
    let p = p.detach();
    (p.clone() * p.clamp_min(1e-12).log())
        .sum_dim(1)
        .mean()
        .neg()
}

/// SimSiam's D(p, z) = −cos(p, stopgrad(z)), the mean over rows of the cosine between row i of
/// the prediction `p` and row i of `z` (Chen & He 2021, eq. 1; `nn.CosineSimilarity` in
/// `main_simsiam.py`). `z` gets no gradient. `[1]`.
pub fn negative_cosine(p: Tensor<2>, z: Tensor<2>) -> Tensor<1> {
    (l2_normalize(p) * l2_normalize(z.detach()))
        .sum_dim(1)
        .mean()
        .neg()
}

/// BYOL's regression loss (Grill et al. 2020, eq. 2; `regression_loss` of deepmind-research's
/// `byol/utils/helpers.py`): the mean over rows of ‖p̄ − z̄‖² = 2 − 2·cos(p, z), p̄ and z̄
/// l2-normalised, `z` the target network's projection (no gradient). `[1]`.
pub fn byol_loss(p: Tensor<2>, z: Tensor<2>) -> Tensor<1> {
    negative_cosine(p, z).mul_scalar(2.0).add_scalar(2.0)
}

/// Barlow Twins' loss (Zbontar et al. 2021, eq. 1) on the cross-correlation `c` `[d, d]` of the
/// two views' batch-standardised embeddings: Σ_i (1 − C_ii)² + λ·Σ_{i≠j} C_ij². `[1]`.
pub fn barlow_twins_loss(c: Tensor<2>, lambda: f64) -> Tensor<1> {
    let [d, _] = c.dims();
    let eye = Tensor::<2>::eye(d, &c.device());
    let weight = eye.clone().mul_scalar(1.0 - lambda).add_scalar(lambda);
    ((c - eye).square() * weight).sum()
}

/// VICReg's variance term (Bardes et al. 2022, eq. 1; `main_vicreg.py`): the mean over the d
/// dimensions of max(0, 1 − √(Var(z_j) + 1e-4)), the variance unbiased over the n ≥ 2 rows of
/// `z` `[n, d]`. `[1]`.
pub fn vicreg_variance(z: Tensor<2>) -> Tensor<1> {
    let [n, _] = z.dims();
    let centred = z.clone() - z.mean_dim(0);
    let var = centred.square().sum_dim(0).div_scalar((n - 1) as f64);
    relu(var.add_scalar(1e-4).sqrt().neg().add_scalar(1.0)).mean()
}

/// VICReg's covariance term (eq. 4): Σ_{i≠j} C_ij² / d for the covariance C = z̃ᵀz̃/(n − 1) of
/// the centred rows z̃ of `z` `[n, d]`. `[1]`.
pub fn vicreg_covariance(z: Tensor<2>) -> Tensor<1> {
    let [n, d] = z.dims();
    let centred = z.clone() - z.mean_dim(0);
    let cov = centred
        .clone()
        .transpose()
        .matmul(centred)
        .div_scalar((n - 1) as f64);
    let off = Tensor::<2>::eye(d, &cov.device()).neg().add_scalar(1.0);
    (cov.square() * off).sum().div_scalar(d as f64)
}

/// MoCo v3's contrastive loss (Chen, Xie & He 2021; `contrastive_loss` of moco-v3's
/// `builder.py`): InfoNCE of each query against every key of the global batch, the key of its
/// own image the positive (`positives[i]` for row i), scaled by 2τ:
/// L = 2τ · CE(q̄·k̄ᵀ / τ, positives), q̄ and k̄ l2-normalised; the keys get no gradient. `[1]`.
pub fn moco_v3_loss(q: Tensor<2>, k: Tensor<2>, positives: &[usize], tau: f64) -> Tensor<1> {
    info_nce(cosine_logits(q, k.detach(), tau), positives).mul_scalar(2.0 * tau)
}

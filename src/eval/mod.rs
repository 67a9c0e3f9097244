//! Evaluation of a frozen backbone: feature extraction, weighted kNN, and linear evaluation
//! ([`linear`]); fine-tuning ([`finetune`]) and features for other tools ([`embed`]). The
//! classifiers train through one supervised epoch ([`supervised`]).

pub mod embed;
pub mod finetune;
pub mod linear;
mod supervised;

pub use linear::{linear_eval, linear_probe, LinearEvalConfig, LinearSchedule};

use std::sync::Arc;

use anyhow::{bail, Result};
use burn::module::Module;
use burn::nn::{Initializer, Linear};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::augment::Pipeline;
use crate::config::{at_least_one, positive};
use crate::data::{Loader, Split};
use crate::losses::l2_normalize;
use crate::models::{init_seeded, zero_bias_linear, Backbone};

/// `[eval]` of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// kNN neighbours and temperature of the weighted vote exp(s/T): k = 200, T = 0.1 as InstDisc
    /// and solo-learn; DINO's `eval_knn.py` uses T = 0.07 and reports k = 20.
    pub knn_k: usize,
    pub knn_t: f32,
    /// Images of the train and test splits the online monitor uses (0: all).
    pub monitor_train: usize,
    pub monitor_test: usize,
    pub linear_epochs: usize,
    pub linear_lr: f64,
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            knn_k: 200,
            knn_t: 0.1,
            monitor_train: 10_000,
            monitor_test: 2_000,
            linear_epochs: 100,
            linear_lr: 1e-3,
            batch_size: 256,
        }
    }
}

impl EvalConfig {
    /// Checks every value of `[eval]`; the error names the key.
    pub fn check(&self) -> Result<()> {
        at_least_one("eval.knn_k", self.knn_k)?;
        positive("eval.knn_t", self.knn_t)?;
        at_least_one("eval.linear_epochs", self.linear_epochs)?;
        positive("eval.linear_lr", self.linear_lr)?;
        at_least_one("eval.batch_size", self.batch_size)
    }
}

/// Features of a split, row-major `[n, dim]`, with its labels.
pub struct Features {
    pub data: Vec<f32>,
    pub dim: usize,
    pub labels: Vec<u32>,
}

impl Features {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The features row by row.
    pub fn rows(&self) -> std::slice::Chunks<'_, f32> {
        self.data.chunks(self.dim.max(1))
    }

    fn tensor(&self, device: &Device) -> Tensor<2> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), [self.len(), self.dim]),
            device,
        )
    }
}

/// Features of the frozen backbone (batch norm in evaluation mode, no gradients) for every
/// image of a labelled `split`, drawn through the deterministic `eval` pipeline (`pipeline`
/// must have one view).
pub fn extract(
    backbone: &Backbone,
    split: &Split,
    pipeline: &Pipeline,
    batch_size: usize,
    device: &Device,
) -> Result<Features> {
    let Some(labels) = split.labels.as_ref() else {
        bail!("split '{}' has no labels to evaluate against", split.name)
    };
    let (data, dim) = features(backbone, split, pipeline, batch_size, device)?;
    Ok(Features {
        data,
        dim,
        labels: labels.to_vec(),
    })
}

/// Features `[n, dim]` (row-major, with `dim`) of every image of `split`, labelled or not, as
/// [`extract`] draws them.
pub fn features(
    backbone: &Backbone,
    split: &Split,
    pipeline: &Pipeline,
    batch_size: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    let backbone = backbone.valid().to_device(device);
    features_of(&backbone, split, pipeline, batch_size, device, |b, x| {
        b.forward(x)
    })
}

/// Top-1/top-5 of the classifier `logits(images)` on every image of the labelled `split`
/// (views from `pipeline`, in batches of `batch_size`).
pub(crate) fn classify(
    split: &Split,
    pipeline: &Pipeline,
    batch_size: usize,
    device: &Device,
    backbone: &Backbone,
    logits: impl Fn(&Backbone, Tensor<4>) -> Tensor<2>,
) -> Result<Accuracy> {
    let Some(labels) = split.labels.as_ref() else {
        bail!("split '{}' has no labels to evaluate against", split.name)
    };
    let (scores, classes) = features_of(backbone, split, pipeline, batch_size, device, logits)?;
    let scores: Vec<Vec<f32>> = scores.chunks(classes).map(<[f32]>::to_vec).collect();
    accuracy(&scores, labels)
}

/// [`features`] with `f(backbone, images)` as the features, `backbone` already on `device` in
/// evaluation mode.
pub(crate) fn features_of(
    backbone: &Backbone,
    split: &Split,
    pipeline: &Pipeline,
    batch_size: usize,
    device: &Device,
    f: impl Fn(&Backbone, Tensor<4>) -> Tensor<2>,
) -> Result<(Vec<f32>, usize)> {
    let loader =
        Loader::new(split.clone(), Arc::new(pipeline.clone()), batch_size, 0)?.sequential();
    let bar = crate::data::progress_bar(split.len() as u64, &format!("features of {}", split.name));
    let mut data = Vec::new();
    let mut dim = 0;
    for batch in loader.epoch(0, 0) {
        let f = f(backbone, batch.views[0].to_tensor(device));
        dim = f.dims()[1];
        data.extend(
            f.into_data()
                .try_to_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("{e:?}"))?,
        );
        bar.inc(batch.samples.len() as u64);
    }
    bar.finish_and_clear();
    finite_rows(
        data.chunks(dim.max(1)),
        &format!("the outputs for split '{}'", split.name),
    )?;
    Ok((data, dim))
}

/// Refuses rows (of `dim` values) holding NaN or ±inf: a non-finite feature or logit has no
/// rank, and ranked as anything it would turn into an accuracy. `what` names the rows.
pub fn finite_rows<'a>(rows: impl ExactSizeIterator<Item = &'a [f32]>, what: &str) -> Result<()> {
    let total = rows.len();
    let bad = rows
        .filter(|row| row.iter().any(|v| !v.is_finite()))
        .count();
    if bad > 0 {
        bail!("{what}: {bad} of {total} rows hold NaN or infinite values (the encoder computes no usable features)");
    }
    Ok(())
}

/// Top-1 and top-5 accuracy (fractions).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Accuracy {
    pub top1: f32,
    pub top5: f32,
}

/// Top-1 and top-5 of per-class `scores` against `labels`. Ties are broken as `torch.argmax`
/// and `torch.topk` break them: of equal scores the lower class index ranks first, so a row of
/// equal scores predicts class 0 and a tie never counts for every class at once. Non-finite
/// scores are refused ([`finite_rows`]).
pub fn accuracy(scores: &[Vec<f32>], labels: &[u32]) -> Result<Accuracy> {
    if labels.is_empty() {
        bail!("no labelled images to measure an accuracy on");
    }
    finite_rows(scores.iter().map(Vec::as_slice), "the class scores")?;
    let (mut top1, mut top5) = (0usize, 0usize);
    for (s, &label) in scores.iter().zip(labels) {
        let label = label as usize;
        let mine = s[label];
        // The classes ranked above the label.
        let above = s
            .iter()
            .enumerate()
            .filter(|&(c, &v)| v > mine || (v == mine && c < label))
            .count();
        top1 += (above == 0) as usize;
        top5 += (above < 5) as usize;
    }
    Ok(Accuracy {
        top1: top1 as f32 / labels.len() as f32,
        top5: top5 as f32 / labels.len() as f32,
    })
}

/// RankMe (Garrido et al. 2023, eq. 1): the effective rank exp(−Σ p_k log p_k) of the features
/// `[n, d]`, p_k = σ_k / Σσ + 1e-7 over their singular values σ (uncentred, as the paper): from 1
/// (every image on one line) to min(n, d) (the variance spread evenly). A representation that
/// collapses into a few dimensions has a low rank, and its kNN and linear accuracy follow it.
/// It grows with `n` up to the rank the features hold: compare values over as many images.
/// Errors: non-finite features, or an SVD that does not converge.
pub fn rank_me(features: &Features, device: &Device) -> Result<f64> {
    let (n, d) = (features.len(), features.dim);
    if n == 0 || d == 0 || features.data.iter().any(|v| !v.is_finite()) {
        bail!("RankMe of {n} features of {d} dimensions: none, or not finite");
    }
    let z = Tensor::<2>::from_data(TensorData::new(features.data.clone(), [n, d]), device)
        .cast(burn::tensor::FloatDType::F64);
    // σ(Z)² are the eigenvalues (= singular values) of the Gram matrix of Z's shorter side,
    // taken in f64 so that squaring loses none of the small σ.
    let gram = match n >= d {
        true => z.clone().transpose().matmul(z),
        false => z.clone().matmul(z.transpose()),
    };
    // burn's SVD panics where it does not converge.
    let eigenvalues = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        burn::linalg::svd::<2, 1>(gram, 100)
            .1
            .try_into_vec_as::<f64>()
    }));
    let Ok(eigenvalues) = eigenvalues else {
        bail!("RankMe of {n} features of {d} dimensions: their SVD did not converge");
    };
    let sigma: Vec<f64> = eigenvalues?.iter().map(|l| l.max(0.0).sqrt()).collect();
    let total: f64 = sigma.iter().sum();
    let entropy: f64 = sigma
        .iter()
        .map(|s| s / total.max(f64::MIN_POSITIVE) + 1e-7)
        .map(|p| -p * p.ln())
        .sum();
    Ok(entropy.exp())
}

/// Weighted kNN (Wu et al. 2018): cosine similarity s between l2-normalised features, the k
/// nearest training samples vote for their class with weight exp(s / T); equal votes rank by
/// class index ([`accuracy`]). Non-finite features are refused.
pub fn knn(
    train: &Features,
    test: &Features,
    classes: usize,
    k: usize,
    t: f32,
    device: &Device,
) -> Result<Accuracy> {
    finite_rows(train.rows(), "the memory bank's features")?;
    finite_rows(test.rows(), "the test features")?;
    let bank = l2_normalize(train.tensor(device)).transpose();
    let k = k.min(train.len());
    let mut scores = Vec::with_capacity(test.len());
    for start in (0..test.len()).step_by(256) {
        let n = 256.min(test.len() - start);
        let q = Tensor::<2>::from_data(
            TensorData::new(
                test.data[start * test.dim..(start + n) * test.dim].to_vec(),
                [n, test.dim],
            ),
            device,
        );
        let (sims, idx) = l2_normalize(q).matmul(bank.clone()).topk_with_indices(k, 1);
        let sims: Vec<f32> = sims
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let idx: Vec<i64> = idx
            .into_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for row in 0..n {
            let mut votes = vec![0f32; classes];
            for j in 0..k {
                votes[train.labels[idx[row * k + j] as usize] as usize] +=
                    (sims[row * k + j] / t).exp();
            }
            scores.push(votes);
        }
    }
    accuracy(&scores, &test.labels)
}

/// The class head of linear evaluation and fine-tuning: `dim → classes`, weights N(0, `std`)
/// drawn from seed 0 (the papers' `trunc_normal_`/`normal_` cut nothing at these widths), a zero
/// bias; both train.
pub fn classifier_head(dim: usize, classes: usize, std: f64, device: &Device) -> Linear {
    init_seeded(device, 0, || {
        zero_bias_linear(dim, classes, Initializer::Normal { mean: 0.0, std }, device)
    })
}

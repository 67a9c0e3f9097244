//! Formulas checked on values computed by hand: InfoNCE, NT-Xent, LARS, schedules, kNN.

mod common;

use burn::optim::Optimizer;
use burn::tensor::{Device, Tensor, TensorData};
use selfsup::eval::knn;
use selfsup::losses::{cosine_logits, cross_entropy, cross_entropy_smoothed, info_nce, nt_xent};
use selfsup::train::optim::{cosine_ramp, warmup_cosine, FusedAdamW, Lars};

fn dev() -> Device {
    Device::flex()
}

fn t2(rows: &[[f32; 2]]) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(
            rows.iter().flatten().copied().collect::<Vec<_>>(),
            [rows.len(), 2],
        ),
        &dev(),
    )
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

#[test]
fn info_nce_matches_the_formula() {
    // q = e1, k+ at cosine 0.6, negatives at cosine 0 and −1, τ = 1:
    // L = −log(e^0.6 / (e^0.6 + e^0 + e^−1)).
    let q = t2(&[[1.0, 0.0]]);
    let keys = t2(&[[0.6, 0.8], [0.0, 2.0], [-3.0, 0.0]]);
    let loss = scalar(info_nce(cosine_logits(q.clone(), keys.clone(), 1.0), &[0]));
    let expected = -(0.6f64.exp() / (0.6f64.exp() + 1.0 + (-1f64).exp())).ln();
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    // τ = 0.5 doubles every logit.
    let loss = scalar(info_nce(cosine_logits(q, keys, 0.5), &[0]));
    let expected = -(1.2f64.exp() / (1.2f64.exp() + 1.0 + (-2f64).exp())).ln();
    assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
}

#[test]
fn nt_xent_pairs_view_i_with_view_i_plus_n() {
    // Identical views: each view's positive has similarity 1, its two negatives 0 (itself is
    // excluded): L = −log(e / (e + 2)).
    let z = t2(&[[1.0, 0.0], [0.0, 1.0]]);
    let loss = scalar(nt_xent(z.clone(), z.clone(), 1.0));
    let e = std::f64::consts::E;
    assert!((loss - (-(e / (e + 2.0)).ln())).abs() < 1e-5, "{loss}");
    // Swapped second views: the positive now has similarity 0 and one negative 1.
    let swapped = t2(&[[0.0, 3.0], [2.0, 0.0]]);
    let loss = scalar(nt_xent(z, swapped, 1.0));
    assert!((loss - (-(1.0 / (2.0 + e)).ln())).abs() < 1e-5, "{loss}");
}

#[test]
fn cross_entropy_matches_the_formula() {
    let logits = t2(&[[2.0, 0.0], [0.0, 0.0]]);
    let loss = scalar(cross_entropy(logits, &[0, 1]));
    let expected = 0.5 * (-(2f64.exp() / (2f64.exp() + 1.0)).ln() + 2f64.ln());
    assert!((loss - expected).abs() < 1e-5);
}

#[test]
fn smoothed_cross_entropy_matches_timms_formula() {
    // timm's LabelSmoothingCrossEntropy: (1 − ε)·nll + ε·mean over classes of −log p.
    let logits = || t2(&[[2.0, 0.0], [0.0, 0.0]]);
    let loss = scalar(cross_entropy_smoothed(logits(), &[0, 1], 0.1));
    let z = (2f64.exp() + 1.0).ln();
    let nll = 0.5 * ((z - 2.0) + 2f64.ln());
    let uniform = 0.5 * ((z - 1.0) + 2f64.ln());
    assert!((loss - (0.9 * nll + 0.1 * uniform)).abs() < 1e-5, "{loss}");
    let plain = scalar(cross_entropy(logits(), &[0, 1]));
    assert_eq!(
        scalar(cross_entropy_smoothed(logits(), &[0, 1], 0.0)),
        plain
    );
}

#[test]
fn lars_matches_hand_computed_steps() {
    let lars = Lars::new(0.9, 0.0, 0.001);
    let w = t2(&[[3.0, 4.0]]);
    let g = t2(&[[0.6, 0.8]]);
    // trust = η‖w‖/‖g‖ = 0.001·5/1: w1 = w − 0.005·g.
    let (w1, state) = lars.step(1.0, w, g.clone(), None);
    let w1v: Vec<f32> = w1.to_data().try_to_vec::<f32>().unwrap();
    assert!(
        (w1v[0] - 2.997).abs() < 1e-6 && (w1v[1] - 3.996).abs() < 1e-6,
        "{w1v:?}"
    );
    // Second step: trust = 0.001·‖w1‖ = 0.004995, v2 = 0.9·v1 + 0.004995·g.
    let (w2, _) = lars.step(1.0, w1, g, state);
    let w2v: Vec<f32> = w2.to_data().try_to_vec::<f32>().unwrap();
    let v2 = [0.9 * 0.003 + 0.004995 * 0.6, 0.9 * 0.004 + 0.004995 * 0.8];
    assert!(
        (w2v[0] - (2.997 - v2[0])).abs() < 1e-6 && (w2v[1] - (3.996 - v2[1])).abs() < 1e-6,
        "{w2v:?}"
    );

    // With weight decay: u = g + 0.1·w = (0.9, 1.2), ‖u‖ = 1.5, trust = 0.001·5/1.5, lr 2.
    let lars = Lars::new(0.9, 0.1, 0.001);
    let (w1, _) = lars.step(2.0, t2(&[[3.0, 4.0]]), t2(&[[0.6, 0.8]]), None);
    let w1v: Vec<f32> = w1.to_data().try_to_vec::<f32>().unwrap();
    assert!(
        (w1v[0] - (3.0 - 2.0 * 0.9 / 300.0)).abs() < 1e-6
            && (w1v[1] - (4.0 - 2.0 * 1.2 / 300.0)).abs() < 1e-6,
        "{w1v:?}"
    );

    // A bias (rank 1) gets neither decay nor trust ratio: plain SGD, w − lr·g.
    let b = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &dev());
    let gb = Tensor::<1>::from_data(TensorData::new(vec![0.5f32, 0.5], [2]), &dev());
    let (b1, _) = lars.step(1.0, b, gb, None);
    assert_eq!(b1.to_data().try_to_vec::<f32>().unwrap(), vec![0.5, 1.5]);
}

#[test]
fn fused_adamw_is_burns_adamw_bit_for_bit() {
    // burn's AdamW is checked against PyTorch in burn's own tests; the fused update must give
    // its bits, step after step, with and without weight decay, on a tensor that spans
    // several parallel chunks and on a small one.
    let bits = |t: &Tensor<2>| {
        t.to_data()
            .try_to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    let same = |what: &str, a: &Tensor<2>, b: &Tensor<2>| {
        let differ = bits(a)
            .iter()
            .zip(bits(b))
            .filter(|(x, y)| **x != *y)
            .count();
        assert_eq!(
            differ, 0,
            "{what}: {differ} values differ from burn's AdamW"
        );
    };
    for (shape, wd) in [([300, 200], 0.05f32), ([3, 5], 0.0)] {
        let n = shape[0] * shape[1];
        let values = |seed: u32, scale: f32| {
            let data = (0..n as u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 2001) as f32 / 1000.0 - 1.0)
                .map(|v| v * scale)
                .collect::<Vec<_>>();
            Tensor::<2>::from_data(TensorData::new(data, shape), &dev())
        };
        let fused = FusedAdamW::new([0.9, 0.95], 1e-8, wd);
        let burn = burn::optim::AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.95)
            .with_epsilon(1e-8)
            .with_weight_decay(wd)
            .build();
        let (mut w_fused, mut w_burn) = (values(1, 1.0), values(1, 1.0));
        let (mut s_fused, mut s_burn) = (None, None);
        for step in 0..4 {
            let g = values(7 + step, 1e-3 * (step + 1) as f32);
            let lr = 1.5e-3 * (step + 1) as f64;
            (w_fused, s_fused) = fused.step(lr, w_fused, g.clone(), s_fused);
            (w_burn, s_burn) = burn.step(lr, w_burn, g, s_burn);
            same(
                &format!("{shape:?} weights, step {step}"),
                &w_fused,
                &w_burn,
            );
            let (a, b) = (
                &s_fused.as_ref().unwrap().momentum,
                &s_burn.as_ref().unwrap().momentum,
            );
            assert_eq!(a.time, b.time);
            same(
                &format!("first moment, step {step}"),
                &a.moment_1,
                &b.moment_1,
            );
            same(
                &format!("second moment, step {step}"),
                &a.moment_2,
                &b.moment_2,
            );
        }
        // And it moved: a step of lr 1.5e-3 · 4 from the start is far above rounding.
        assert_ne!(bits(&w_fused), bits(&values(1, 1.0)));
    }
    // A −0 gradient at the first step: burn's first moment (1−β1)·g keeps the sign.
    let t = |v: [f32; 2]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, 2]), &dev());
    let burn = burn::optim::AdamWConfig::new().with_epsilon(1e-8).build();
    let fused = FusedAdamW::new([0.9, 0.999], 1e-8, 1e-4);
    let (w_fused, s_fused) = fused.step(1e-3, t([-0.0, 0.5]), t([-0.0, 0.25]), None);
    let (w_burn, s_burn) = burn.step(1e-3, t([-0.0, 0.5]), t([-0.0, 0.25]), None);
    same("weights after a −0 gradient", &w_fused, &w_burn);
    let moment = |s: Option<burn::optim::AdamWState<2>>| s.unwrap().momentum.moment_1;
    same(
        "first moment of a −0 gradient",
        &moment(s_fused),
        &moment(s_burn),
    );
}

#[test]
fn schedules_hit_their_end_points() {
    assert!((warmup_cosine(0, 10, 100, 1.0, 0.0) - 0.1).abs() < 1e-12);
    assert!((warmup_cosine(9, 10, 100, 1.0, 0.0) - 1.0).abs() < 1e-12);
    assert!((warmup_cosine(10, 10, 100, 1.0, 0.0) - 1.0).abs() < 1e-12);
    assert!((warmup_cosine(55, 10, 100, 1.0, 0.0) - 0.5).abs() < 1e-12);
    assert!((warmup_cosine(100, 10, 100, 1.0, 0.01) - 0.01).abs() < 1e-12);
    assert!((cosine_ramp(0, 100, 0.996, 1.0) - 0.996).abs() < 1e-12);
    assert!((cosine_ramp(100, 100, 0.996, 1.0) - 1.0).abs() < 1e-12);
}

#[test]
fn knn_votes_with_weights_exp_s_over_t() {
    // The query [1, 0.05]: one close neighbour of class 0 (cosine ≈ 1) and two of class 1 at
    // cosine ≈ 0.6. With T = 0.1 the close one outweighs both: e^10 > 2·e^6. With k = 3 and
    // T = 10 the weights are nearly equal and the majority (class 1) wins.
    let train = common::features(
        &[[1.0, 0.0], [0.6, 0.8], [0.6, 0.8], [-1.0, 0.0]],
        &[0, 1, 1, 2],
    );
    let test = common::features(&[[1.0, 0.05]], &[0]);
    let sharp = knn(&train, &test, 3, 3, 0.1, &dev()).unwrap();
    assert_eq!(sharp.top1, 1.0);
    let flat = knn(&train, &test, 3, 3, 10.0, &dev()).unwrap();
    assert_eq!(flat.top1, 0.0);
    assert_eq!(flat.top5, 1.0, "the true class is among the top 5 of 3");
}

#[test]
fn monitors_are_computed_on_the_device_by_hand() {
    // Pretext accuracy: rows 0 and 2 pick class 1, row 1 class 0; all targets 1 -> 2/3.
    let logits = t2(&[[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]);
    let acc = selfsup::losses::accuracy(logits, &[1, 1, 1]);
    assert!((scalar(acc) - 2.0 / 3.0).abs() < 1e-6);
    // Entropy of (1/2, 1/2) is ln 2, of (1, 0) is 0: mean ln(2)/2.
    let p = t2(&[[0.5, 0.5], [1.0, 0.0]]);
    let h = selfsup::losses::mean_entropy(p);
    assert!((scalar(h) - std::f64::consts::LN_2 / 2.0).abs() < 1e-6);
    // Two opposite unit vectors: each coordinate's std over the 2 rows (n − 1) is √2·|x|.
    let z = t2(&[[0.6, 0.8], [-0.6, -0.8]]);
    let sd = scalar(selfsup::losses::embedding_std(z));
    let want = (0.6f64 * 2f64.sqrt() + 0.8 * 2f64.sqrt()) / 2.0;
    assert!((sd - want).abs() < 1e-5, "{sd}");
}

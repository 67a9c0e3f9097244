//! BYOL, SimSiam, Barlow Twins, VICReg, MoCo v3 and SwAV (issue 29): each loss against PyTorch's
//! value (and gradient) from the official formula, computed in f64 by `torch` 2.15 on the inputs below
//! and written here as numbers; each method's wiring (what trains and what does not).

mod common;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::dist::weights_hash;
use selfsup::losses::{
    barlow_twins_loss, byol_loss, moco_v3_loss, negative_cosine, sinkhorn, swav_loss,
    vicreg_covariance, vicreg_variance,
};
use selfsup::methods::vicreg::vicreg_terms;
use selfsup::methods::{InitContext, MethodConfig, MethodSpec, Swav};
use selfsup::models::{ema_update, init_seeded, plain_batch_norm};
use selfsup::train::optim::cosine_ramp;
use selfsup::train::{Method, Progress};

/// z₁ and z₂ `[4, 3]`, as in the PyTorch script.
const Z1: [f32; 12] = [
    0.5, -1.0, 2.0, 1.5, 0.25, -0.5, -0.75, 1.0, 0.0, 2.0, -0.5, 1.0,
];
const Z2: [f32; 12] = [
    0.25, -0.5, 1.5, 1.0, 1.0, -1.0, -1.0, 0.5, 0.5, 1.5, 0.0, 2.0,
];

fn z(values: [f32; 12], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [4, 3]), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() <= tol, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn byol_and_simsiam_losses_equal_pytorchs() {
    let d = Device::flex();
    // helpers.regression_loss(z1, z2).mean(): ‖z̄₁ − z̄₂‖² = 2 − 2 cos.
    let byol = values(byol_loss(z(Z1, &d), z(Z2, &d)));
    assert_close(&byol, &[0.25540592], 1e-6, "byol");
    // −nn.CosineSimilarity(dim=1)(p, z.detach()).mean().
    let simsiam = values(negative_cosine(z(Z1, &d), z(Z2, &d)));
    assert_close(&simsiam, &[-0.87229704], 1e-6, "simsiam");
}

#[test]
fn barlow_twins_loss_and_gradient_equal_the_official_codes() {
    // barlowtwins main.py: c = bn(z1).T @ bn(z2) / N, bn = BatchNorm1d(affine=False) in
    // training; loss = Σ(diag(c) − 1)² + 0.0051 · Σ off_diagonal(c)².
    let device = Device::flex().autodiff();
    let z1 = z(Z1, &device).require_grad();
    let bn = plain_batch_norm(3, &device);
    let standardise = |x: Tensor<2>| selfsup::kernels::batch_norm(&bn, x);
    let c = standardise(z1.clone())
        .transpose()
        .matmul(standardise(z(Z2, &device)))
        .div_scalar(4.0);
    let want_c = [
        0.99818252,
        0.02658354,
        0.09080119,
        -0.574793,
        0.77457753,
        -0.59393674,
        0.112331,
        -0.98975706,
        0.82386933,
    ];
    assert_close(&values(c.clone()), &want_c, 1e-5, "cross-correlation");
    let loss = barlow_twins_loss(c, 0.0051);
    assert_close(&values(loss.clone()), &[0.09043072], 1e-5, "barlow twins");
    let grads = loss.backward();
    let grad = z1.grad(&grads).unwrap();
    let want = [
        -2.02e-05,
        0.05893786,
        0.04786389,
        -0.00021625,
        -0.15109018,
        0.05130425,
        5.035e-05,
        0.09518707,
        -0.02908944,
        0.00018611,
        -0.00303475,
        -0.0700787,
    ];
    assert_close(&values(grad), &want, 2e-6, "∂L/∂z₁");
    // The batch standardisation has nothing to learn.
    assert!(bn.gamma.val().grad(&grads).is_none() && bn.beta.val().grad(&grads).is_none());
}

#[test]
fn vicreg_terms_and_gradient_equal_the_official_codes() {
    // main_vicreg.py: repr_loss = mse(x, y); std_loss = mean(relu(1 − std_x))/2 + (y's)/2 with
    // std = sqrt(var + 1e-4); cov_loss = Σ off_diagonal(cov_x)²/d + (y's), cov = x̃ᵀx̃/(N − 1).
    let device = Device::flex().autodiff();
    let z1 = z(Z1, &device).require_grad();
    let [s, v, c] = vicreg_terms(z1.clone(), z(Z2, &device));
    let terms: Vec<f32> = [s.clone(), v.clone(), c.clone()]
        .into_iter()
        .flat_map(values)
        .collect();
    assert_close(&terms, &[0.30729167, 0.0798947, 1.06078197], 1e-6, "terms");
    let loss = s.mul_scalar(25.0) + v.mul_scalar(25.0) + c;
    assert_close(&values(loss.clone()), &[10.74044106], 1e-5, "vicreg");
    let grad = z1.grad(&loss.backward()).unwrap();
    let want = [
        1.31843171,
        -1.02082717,
        2.41608796,
        1.96947338,
        -3.37982459,
        1.99131944,
        0.75824653,
        1.01253159,
        -2.52256944,
        2.20384838,
        -1.82021317,
        -3.9681713,
    ];
    assert_close(&values(grad), &want, 1e-5, "∂L/∂z₁");
    // The hinge is flat once a dimension's std reaches 1 (dimensions 0 and 1: std 1.63), and
    // 1 − √ε = 0.99 for a constant one (dimension 2); the covariance is 0 for uncorrelated
    // dimensions.
    let spread = z(
        [2.0, 0.0, 0.0, -2.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, -2.0, 0.0],
        &Device::flex(),
    );
    assert_close(
        &values(vicreg_variance(spread.clone())),
        &[0.99 / 3.0],
        1e-6,
        "variance",
    );
    assert_close(
        &values(vicreg_covariance(spread)),
        &[0.0],
        1e-7,
        "covariance",
    );
}

#[test]
fn moco_v3_loss_and_gradient_equal_the_official_codes() {
    // builder.py's contrastive_loss: CE(normalize(q)·normalize(k)ᵀ / T, arange(N) + N·rank)·2T.
    let device = Device::flex().autodiff();
    let q = z(Z1, &device).require_grad();
    let loss = moco_v3_loss(q.clone(), z(Z2, &device), &[0, 1, 2, 3], 0.2);
    assert_close(&values(loss.clone()), &[0.07589657], 1e-6, "moco v3");
    let want = [
        0.03153743,
        0.01671894,
        0.00047511,
        0.01257894,
        -0.01316727,
        0.03115318,
        0.01237884,
        0.00928413,
        -0.01039435,
        -0.00747258,
        -0.01528399,
        0.00730316,
    ];
    assert_close(
        &values(q.grad(&loss.backward()).unwrap()),
        &want,
        1e-6,
        "∂L/∂q",
    );
    // Rank 1 of 2 holds rows 1 and 3 of the global batch: its queries against every key.
    let d = Device::flex();
    let rows = |t: Tensor<2>| t.select(0, Tensor::from_ints([1, 3], &d));
    let local = moco_v3_loss(rows(z(Z1, &d)), z(Z2, &d), &[1, 3], 0.2);
    assert_close(&values(local), &[0.06922051], 1e-6, "rank 1's share");
}

/// Two random views `[4, 3, 32, 32]`, seeded.
fn views(device: &Device) -> Vec<Tensor<4>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    (0..2)
        .map(|_| {
            let v: Vec<f32> = (0..4 * 3 * 32 * 32)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            Tensor::from_data(TensorData::new(v, [4, 3, 32, 32]), device)
        })
        .collect()
}

fn progress() -> Progress {
    Progress {
        epoch: 0,
        step: 30,
        total_steps: 100,
        steps_per_epoch: 10,
    }
}

#[test]
fn byols_target_gets_no_gradient_and_follows_the_online_network_by_ema() {
    let device = Device::flex().autodiff();
    let recipe = common::small_recipe("byol");
    let MethodConfig::Byol(config) = &recipe.method else {
        unreachable!()
    };
    let byol = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    let out = byol.loss(&views(&device), &progress());
    let grads = GradientsParams::from_grads(out.loss.backward(), &byol);
    let (online, target) = (
        weights_hash(byol.backbone()),
        byol.teacher().unwrap().clone(),
    );
    let byol = SgdConfig::new().init().step(0.1, byol, grads);
    assert_ne!(
        weights_hash(byol.backbone()),
        online,
        "the online encoder learns"
    );
    assert_eq!(
        weights_hash(byol.teacher().unwrap()),
        weights_hash(&target),
        "the target has no gradient"
    );
    // ξ ← τ·ξ + (1 − τ)·θ with τ on its cosine from 0.99 (the recipe's) to 1.
    let p = progress();
    let tau = cosine_ramp(
        p.step,
        p.total_steps,
        config.momentum,
        config.final_momentum,
    );
    assert!(tau > config.momentum && tau < 1.0);
    let expected = ema_update(target, byol.backbone(), tau);
    let byol = byol.after_step(None, &p);
    assert_eq!(
        weights_hash(byol.teacher().unwrap()),
        weights_hash(&expected)
    );
}

#[test]
fn simsiam_stops_the_gradient_of_the_predicted_branch_and_fixes_the_predictors_lr() {
    let device = Device::flex().autodiff();
    let p = z(Z1, &device).require_grad();
    let target = z(Z2, &device).require_grad();
    let grads = negative_cosine(p.clone(), target.clone()).backward();
    assert!(p.grad(&grads).is_some());
    assert!(target.grad(&grads).is_none(), "stop-gradient on z");

    let recipe = common::small_recipe("simsiam");
    let MethodConfig::Simsiam(mut config) = recipe.method.clone() else {
        unreachable!()
    };
    let simsiam = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    // The constant-lr group is the predictor: none of the encoder's parameters, some of the
    // method's.
    let fixed = simsiam.constant_lr().expect("fix_pred_lr is the default");
    let matched = |ids: Vec<ParamId>| ids.iter().filter(|id| fixed.matches(id, None)).count();
    assert_eq!(matched(param_ids(simsiam.backbone())), 0);
    let (all, inside) = (param_ids(&simsiam).len(), matched(param_ids(&simsiam)));
    assert!(inside > 0 && inside < all, "{inside} of {all}");
    config.fix_pred_lr = false;
    let scheduled = config.init(&InitContext::of(&recipe, &device));
    assert!(scheduled.constant_lr().is_none());
}

/// The ids of every float parameter of `module`.
fn param_ids<M: Module>(module: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl ModuleVisitor for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

#[test]
fn moco_v3s_momentum_encoder_gets_no_gradient_and_a_vits_patch_projection_is_frozen() {
    let device = Device::flex().autodiff();
    let mut recipe = common::small_recipe("moco_v3");
    let MethodConfig::MocoV3(config) = recipe.method.clone() else {
        unreachable!()
    };
    let moco = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    let out = moco.loss(&views(&device), &progress());
    let grads = GradientsParams::from_grads(out.loss.backward(), &moco);
    let momentum = moco.teacher().unwrap().clone();
    let online = weights_hash(moco.backbone());
    let moco = SgdConfig::new().init().step(0.1, moco, grads);
    assert_ne!(weights_hash(moco.backbone()), online);
    assert_eq!(
        weights_hash(moco.teacher().unwrap()),
        weights_hash(&momentum)
    );
    let p = progress();
    let m = cosine_ramp(
        p.step,
        p.total_steps,
        config.momentum,
        config.final_momentum,
    );
    let expected = ema_update(momentum, moco.backbone(), m);
    let moco = moco.after_step(None, &p);
    assert_eq!(
        weights_hash(moco.teacher().unwrap()),
        weights_hash(&expected)
    );

    // A ViT (`--stop-grad-conv1`): the patch projection gets no gradient, the blocks do.
    recipe.model = selfsup::models::BackboneConfig::default_for("vit").unwrap();
    if let selfsup::models::BackboneConfig::Vit(v) = &mut recipe.model {
        (v.image_size, v.patch_size, v.dim, v.depth, v.heads) = (32, 8, 48, 1, 3);
    }
    let moco = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    let grads = GradientsParams::from_grads(
        moco.loss(&views(&device), &progress()).loss.backward(),
        &moco,
    );
    let (frozen, trained) = param_ids(moco.backbone())
        .into_iter()
        .partition::<Vec<_>, _>(|id| !has_grad(&grads, moco.backbone(), *id));
    assert!(!trained.is_empty());
    // The patch projection (weight and bias) and the fixed sin-cos position embeddings.
    assert_eq!(frozen.len(), 3, "{frozen:?}");
}

/// Whether `grads` holds a gradient for parameter `id` of `module`.
fn has_grad<M: Module>(grads: &GradientsParams, module: &M, id: ParamId) -> bool {
    struct Find<'a>(&'a GradientsParams, ParamId, bool);
    impl ModuleVisitor for Find<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if param.id == self.1 {
                self.2 = self.0.get::<D>(param.id).is_some();
            }
        }
    }
    let mut find = Find(grads, id, false);
    module.visit(&mut find);
    find.2
}

/// z₃ `[4, 3]`: a third crop for SwAV.
const Z3: [f32; 12] = [
    1.0, 0.0, -0.5, 0.5, -1.5, 0.25, 0.0, 0.75, -1.0, -0.25, 1.0, 0.5,
];

#[test]
fn sinkhorn_codes_and_the_swapped_prediction_equal_the_official_codes() {
    // main_swav.py at world size 1, on prototype scores s = 0.1·z: q = distributed_sinkhorn(s)
    // (ε 0.05, 3 iterations) for crops 0 and 1 under no_grad; loss = mean over the coded crops
    // of the mean over the other crops of −mean(Σ q·log softmax(s/0.1)).
    let device = Device::flex().autodiff();
    let s: Vec<Tensor<2>> = [Z1, Z2, Z3]
        .into_iter()
        .map(|v| z(v, &device).mul_scalar(0.1).detach().require_grad())
        .collect();
    let codes: Vec<Tensor<2>> = (0..2).map(|i| sinkhorn(s[i].clone(), 0.05, 3)).collect();
    let want_q0 = [
        0.02504869, 0.0101615, 0.96478981, 0.58686866, 0.39251901, 0.02061233, 0.00357882,
        0.96566409, 0.03075709, 0.7607895, 0.04176842, 0.19744208,
    ];
    let want_q1 = [
        0.22976739, 0.05799914, 0.71223347, 0.46817515, 0.52964299, 0.00218187, 0.03468209,
        0.7880678, 0.17725011, 0.57208791, 0.03222213, 0.39568997,
    ];
    assert_close(&values(codes[0].clone()), &want_q0, 1e-6, "q₀");
    assert_close(&values(codes[1].clone()), &want_q1, 1e-6, "q₁");
    let loss = swav_loss(&codes, &s, 0.1);
    assert_close(&values(loss.clone()), &[1.10081933], 1e-6, "swav");
    // The codes carry no gradient: crop 0's gradient is its prediction of q₁ alone.
    let grads = loss.backward();
    let want_g0 = [
        -0.03404812,
        -0.0118041,
        0.04585222,
        0.14696177,
        -0.2050876,
        0.05812583,
        0.0487732,
        -0.08713348,
        0.03836028,
        0.07349011,
        0.0152435,
        -0.08873362,
    ];
    let want_g2 = [
        0.6264046,
        0.24642948,
        -0.87283407,
        -0.00636625,
        -0.48797242,
        0.49433867,
        0.3347794,
        -0.33673048,
        0.00195108,
        -0.64386492,
        0.61407106,
        0.02979386,
    ];
    assert_close(
        &values(s[0].grad(&grads).unwrap()),
        &want_g0,
        1e-6,
        "∂L/∂s₀",
    );
    assert_close(
        &values(s[2].grad(&grads).unwrap()),
        &want_g2,
        1e-6,
        "∂L/∂s₂",
    );
    // Scores of up to 20 over ε = 0.05: exp(400) overflows f32 and exp(−600) underflows, yet
    // the codes are assignments (each row sums to 1).
    let large = sinkhorn(z(Z1, &Device::flex()).mul_scalar(10.0), 0.05, 3);
    let rows = values(large.sum_dim(1));
    assert_close(&rows, &[1.0; 4], 1e-5, "row sums");
}

#[test]
fn swavs_prototypes_are_frozen_for_their_epochs_then_learn_and_stay_unit() {
    let device = Device::flex().autodiff();
    let recipe = common::small_recipe("swav");
    let MethodConfig::Swav(mut config) = recipe.method.clone() else {
        unreachable!()
    };
    config.freeze_prototypes_epochs = 1;
    let swav = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    let column_norms = |c: Tensor<2>| values(c.square().sum_dim(0).sqrt());
    let k = config.prototypes;
    assert_close(
        &column_norms(swav.prototypes()),
        &vec![1.0; k],
        1e-6,
        "init",
    );
    // One SGD step from the gradients of a batch at `epoch`: the prototypes after it.
    let stepped = |swav: Swav, epoch: usize| {
        let p = Progress {
            epoch,
            ..progress()
        };
        let loss = swav.loss(&views(&device), &p).loss;
        let grads = GradientsParams::from_grads(loss.backward(), &swav);
        SgdConfig::new().init().step(0.5, swav, grads)
    };
    let before = values(swav.prototypes());
    let frozen = stepped(swav.clone(), 0);
    assert_eq!(values(frozen.prototypes()), before, "frozen in epoch 0");
    assert_ne!(
        weights_hash(frozen.backbone()),
        weights_hash(swav.backbone()),
        "the encoder learns meanwhile"
    );
    let swav = stepped(swav, 1).after_step(None, &progress());
    assert_ne!(values(swav.prototypes()), before, "learning from epoch 1");
    assert_close(
        &column_norms(swav.prototypes()),
        &vec![1.0; k],
        1e-6,
        "after a step",
    );
}

#[test]
fn swavs_queue_fills_from_its_epoch_and_joins_the_codes_once_full() {
    let device = Device::flex();
    let recipe = common::small_recipe("swav");
    let MethodConfig::Swav(mut config) = recipe.method.clone() else {
        unreachable!()
    };
    (
        config.proj_dim,
        config.queue_size,
        config.epoch_queue_starts,
    ) = (3, 8, 3);
    let swav = init_seeded(&device, 0, || {
        config.init(&InitContext::of(&recipe, &device))
    });
    let scores = swav.scores(z(Z1, &device).mul_scalar(0.3), false);
    let alone = sinkhorn(scores.clone(), config.epsilon, config.sinkhorn_iterations);
    assert_eq!(values(swav.codes(scores.clone(), 0)), values(alone.clone()));
    // Steps of epochs 0-2 enqueue nothing; from epoch 3 (step 30 of 10 a epoch) each step
    // enqueues its 4 images of each global crop, so the queue of 8 is full after two steps.
    let kept = |v: [f32; 12]| Tensor::cat(vec![z(v, &device), z(Z3, &device)], 1);
    let at = |step: usize| Progress {
        step,
        epoch: step / 10,
        ..progress()
    };
    let swav = swav.after_step(Some(kept(Z2)), &at(29));
    assert_eq!(values(swav.codes(scores.clone(), 0)), values(alone.clone()));
    let swav = swav.after_step(Some(kept(Z2)), &at(30));
    assert_eq!(
        values(swav.codes(scores.clone(), 0)),
        values(alone.clone()),
        "not yet full"
    );
    let swav = swav.after_step(Some(kept(Z1)), &at(31));
    let queued = Tensor::cat(vec![z(Z2, &device), z(Z1, &device)], 0);
    let samples = Tensor::cat(vec![swav.scores(queued, true), scores.clone()], 0);
    let with_queue = sinkhorn(samples, config.epsilon, config.sinkhorn_iterations).narrow(0, 8, 4);
    let codes = values(swav.codes(scores, 0));
    assert_close(
        &codes,
        &values(with_queue)
            .iter()
            .map(|&v| v as f64)
            .collect::<Vec<_>>(),
        1e-6,
        "with the queue",
    );
    assert!(codes
        .iter()
        .zip(values(alone))
        .any(|(a, b)| (a - b).abs() > 1e-3));
}

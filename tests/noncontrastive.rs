//! BYOL, SimSiam, Barlow Twins, VICReg and MoCo v3 (issue 29): each loss against PyTorch's value (and
//! gradient) from the official formula, computed in f64 by `torch` 2.15 on the inputs below
//! and written here as numbers; each method's wiring (what trains and what does not).

mod common;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use selfsup::dist::weights_hash;
use selfsup::losses::{
    barlow_twins_loss, byol_loss, moco_v3_loss, negative_cosine, vicreg_covariance, vicreg_variance,
};
use selfsup::methods::vicreg::vicreg_terms;
use selfsup::methods::{InitContext, MethodConfig, MethodSpec};
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

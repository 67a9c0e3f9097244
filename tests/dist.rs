//! Data parallelism gives the run of one process: for every method, steps on real CIFAR-10
//! images at world size 2 and 3 (ranks as threads, `ThreadGroup`) against world size 1 on the
//! same global batches: the same mean loss and averaged gradients, the same parameters on every
//! rank, and after 3 steps the same parameters, MoCo queue and DINO centre as one process.
//! Controls switch one piece off and must fail the same comparison. `tests/mpi.rs` runs the same
//! comparison over Open MPI.

mod common;

use selfsup::config::Recipe;
use selfsup::data::Split;
use selfsup::dist::check::{compare, Gaps};
use selfsup::dist::{self, Pieces, ThreadGroup};
use selfsup::methods::METHODS;

/// `f` on each rank of a group of `world` threads: each rank's result.
fn on_ranks<R: Send>(world: usize, f: impl Fn() -> R + Sync) -> Vec<R> {
    std::thread::scope(|s| {
        let ranks: Vec<_> = ThreadGroup::group(world)
            .into_iter()
            .map(|comm| s.spawn(|| dist::with_world(comm, &f)))
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// [`dist::check::compare`] on `world` ranks (threads) with `pieces`: rank 0's gaps.
fn gaps(recipe: &Recipe, split: &Split, world: usize, steps: usize, pieces: Pieces) -> [f32; 3] {
    let ranks: Vec<Gaps> = on_ranks(world, || {
        dist::with_pieces(pieces, || compare(recipe, split, steps).unwrap())
    });
    [ranks[0].loss, ranks[0].grads, ranks[0].weights]
}

#[test]
fn every_method_trains_the_same_at_two_and_three_ranks() {
    let split = common::cifar10_train(48);
    for method in METHODS {
        let recipe = common::small_recipe(method);
        for world in [2, 3] {
            let [loss, grads, weights] = gaps(&recipe, &split, world, 3, Pieces::default());
            eprintln!("{method} at {world} ranks: first step's loss {loss:.1e}, gradients {grads:.1e}, weights' change after 3 steps {weights:.1e}");
            let [max_loss, max_grads, max_weights] = Gaps::BOUNDS;
            assert!(
                loss < max_loss,
                "{method} at {world} ranks: first step's loss off by {loss:e}"
            );
            assert!(
                grads < max_grads,
                "{method} at {world} ranks: gradients off by {grads:e}"
            );
            assert!(
                weights < max_weights,
                "{method} at {world} ranks: weights off by {weights:e} of their change"
            );
        }
    }
}

#[test]
fn each_piece_is_needed() {
    let split = common::cifar10_train(48);
    let off = |f: fn(&mut Pieces)| {
        let mut p = Pieces::default();
        f(&mut p);
        p
    };
    let simclr = common::small_recipe("simclr");
    let [_, grads, _] = gaps(&simclr, &split, 2, 1, off(|p| p.gather_gradient = false));
    assert!(
        grads > 1e-3,
        "SimCLR without the gather's gradient: gradients off by only {grads:e}"
    );
    let [loss, _, _] = gaps(&simclr, &split, 2, 1, off(|p| p.sync_batch_norm = false));
    assert!(
        loss > 1e-4,
        "SimCLR without synchronised BN: loss off by only {loss:e}"
    );
    let mae = common::small_recipe("mae");
    let [loss, _, _] = gaps(&mae, &split, 2, 1, off(|p| p.global_draws = false));
    assert!(
        loss > 1e-4,
        "MAE with masks drawn for the local batch: loss off by only {loss:e}"
    );
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused() {
    let recipe = common::small_recipe("simclr");
    let errors = on_ranks(5, || recipe.check().unwrap_err().to_string());
    assert!(
        errors[0].contains("train.batch_size = 12") && errors[0].contains("5 ranks"),
        "{}",
        errors[0]
    );
    let moco = common::small_recipe("moco");
    let errors = on_ranks(4, || moco.check().unwrap_err().to_string());
    assert!(errors[0].contains("method.bn_splits = 6"), "{}", errors[0]);
}

/// Synchronised batch norm at one rank is batch norm: its outputs, statistics and gradients
/// (x, γ, β) equal burn's composition's, on feature vectors and on images.
#[test]
fn synchronised_batch_norm_alone_is_batch_norm() {
    use burn::tensor::{Device, Tensor, TensorData};
    use rand::{Rng, SeedableRng};
    let device = Device::flex().autodiff();
    // Not burn's global generator: the other tests of this file seed and draw it meanwhile.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut random = |shape: &[usize], mean: f32, spread: f32| {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| mean + spread * rng.random_range(-1.0f32..1.0))
            .collect();
        TensorData::new(values, shape.to_vec())
    };
    let mut check = |shape: [usize; 4], mean: f32, spread: f32| {
        let c = shape[1];
        let x = Tensor::<4>::from_data(random(&shape, mean, spread), &device).require_grad();
        let gamma = Tensor::<1>::from_data(random(&[c], 1.0, 0.5), &device).require_grad();
        let beta = Tensor::<1>::from_data(random(&[c], 0.0, 0.5), &device).require_grad();
        let weights = Tensor::<4>::from_data(random(&shape, 0.0, 1.0), &device);
        let ours = dist::sync_batch_norm(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let theirs =
            burn::tensor::module::batch_norm_train(x.clone(), gamma.clone(), beta.clone(), 1e-5);
        let grads = |y: Tensor<4>| {
            let g = (y * weights.clone()).sum().backward();
            [
                x.grad(&g).unwrap().flatten::<1>(0, 3),
                gamma.grad(&g).unwrap(),
                beta.grad(&g).unwrap(),
            ]
        };
        let values = [
            (
                ours.0.clone().inner().flatten(0, 3),
                theirs.output.clone().inner().flatten(0, 3),
            ),
            (ours.1.inner(), theirs.mean.inner()),
            (ours.2.inner(), theirs.variance.inner()),
        ];
        let gradients = grads(ours.0).into_iter().zip(grads(theirs.output));
        for (i, (got, want)) in values.into_iter().chain(gradients).enumerate() {
            let got = got.try_into_vec_as::<f32>().unwrap();
            let want = want.try_into_vec_as::<f32>().unwrap();
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let gap = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
                / scale;
            assert!(gap < 1e-5, "{shape:?} part {i}: off by {gap:e}");
        }
    };
    check([6, 5, 1, 1], 3.0, 2.0);
    check([4, 3, 5, 7], -1.0, 0.5);
}

#[test]
fn linear_evaluation_trains_the_same_at_two_and_three_ranks() {
    // Each rank classifies its rows of every batch through the shared supervised epoch, which
    // averages the gradients: the head, so the accuracy on 300 images, of one process.
    let (train, test) = (common::cifar10_train(96), common::cifar10_train(300));
    let recipe = common::small_recipe("simclr");
    let device = burn::tensor::Device::flex();
    let backbone = selfsup::models::init_seeded(&device, 0, || recipe.model.init(&device));
    let config = selfsup::eval::LinearEvalConfig {
        epochs: 4,
        batch_size: 24,
        ..recipe.linear_eval.clone()
    };
    let eval = recipe.augment.eval_pipeline().unwrap();
    let accuracy = || {
        let a = selfsup::eval::linear_eval(
            &backbone, &train, &test, 10, &eval, &eval, &config, &device,
        )
        .unwrap();
        (a.top1, a.top5)
    };
    let alone = accuracy();
    for world in [2, 3] {
        for (rank, got) in on_ranks(world, accuracy).into_iter().enumerate() {
            assert_eq!(got, alone, "rank {rank} of {world}");
        }
    }
    eprintln!(
        "linear evaluation: top-1 {:.4}, top-5 {:.4}",
        alone.0, alone.1
    );
}

#[test]
fn fine_tuning_trains_the_same_at_two_and_three_ranks() {
    // Each rank fine-tunes on its rows of every batch, with random erasing, mixup/CutMix, drop
    // path (ViT) and synchronised batch norm (ResNet) drawn and computed for the global batch:
    // the encoder of one process. Drawn for the local batch instead, it differs.
    let train = common::cifar10_train(48);
    let device = burn::tensor::Device::flex();
    for method in ["mae", "simclr"] {
        let recipe = common::small_recipe(method);
        let backbone = selfsup::models::init_seeded(&device, 0, || recipe.model.init(&device));
        let config = selfsup::eval::finetune::FinetuneConfig {
            epochs: 2,
            batch_size: 12,
            warmup_epochs: 0.0,
            random_erasing: 0.5,
            drop_path: 0.2,
            ..recipe.finetune.clone()
        };
        let eval = recipe.augment.eval_pipeline().unwrap();
        let augment = selfsup::pretrain::crop_flip_views(&recipe, config.rand_augment).unwrap();
        let weights = || {
            let tuned = selfsup::eval::finetune::finetune(
                backbone.clone(),
                recipe.model.feature_dim(),
                &train,
                &train.subset(12, 1),
                10,
                &augment,
                &eval,
                &config,
                &device,
            )
            .unwrap();
            dist::check::flat_weights(&tuned.backbone).unwrap()
        };
        let before = dist::check::flat_weights(&backbone).unwrap();
        let alone = weights();
        let change = gap(&alone, &before);
        for world in [2, 3] {
            for (rank, got) in on_ranks(world, weights).into_iter().enumerate() {
                let off = gap(&got, &alone) / change;
                eprintln!(
                    "{method} fine-tuned at rank {rank} of {world}: off by {off:.1e} of the change"
                );
                assert!(
                    off < 1e-3,
                    "{method}, rank {rank} of {world}: off by {off:e}"
                );
            }
        }
        let local = Pieces {
            global_draws: false,
            ..Pieces::default()
        };
        let got = on_ranks(2, || dist::with_pieces(local, weights));
        let off = gap(&got[0], &alone) / change;
        assert!(off > 1e-2, "{method} with local draws: off by only {off:e}");
    }
}

/// The Euclidean distance of `a` and `b`.
fn gap(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f32>()
        .sqrt()
}

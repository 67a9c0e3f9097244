//! Data parallelism gives the run of one process: for every method, steps on real CIFAR-10
//! images at world size 2 and 3 (ranks as threads, `ThreadGroup`) against world size 1 on the
//! same global batches: the same mean loss and averaged gradients, the same parameters on every
//! rank, and after 3 steps the same parameters, MoCo queue and DINO centre as one process.
//! Controls switch one piece off and must fail the same comparison. `tests/mpi.rs` runs the same
//! comparison over Open MPI.

mod common;

use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use selfsup::config::Recipe;
use selfsup::data::{Loader, Split};
use selfsup::dist::{self, Communicator, Pieces, Single, ThreadGroup};
use selfsup::methods::{with_method, MethodUser, METHODS};
use selfsup::train::{Method, Progress, Trainer};

/// The learning rate of the steps compared: small enough that a step stays close to linear in
/// the gradient (SimCLR's loss at lr 5e-3 already moves 1e-5 between runs whose first gradients
/// agree to 1e-6).
const LR: f64 = 1e-3;

/// What one rank saw: the mean loss of each step, the averaged gradients of the first, and
/// every float tensor of the method (parameters and buffers) before the first and after the
/// last.
#[derive(Debug, Clone)]
pub struct Outcome {
    losses: Vec<f32>,
    /// Per parameter.
    grads: Vec<Vec<f32>>,
    start: Vec<f32>,
    weights: Vec<f32>,
}

/// A small version of the method's published recipe: a narrow ResNet-18 or a 2-block ViT, a
/// global batch of 12 (which 2 and 3 divide), MoCo's batch norm in 6 groups, SGD.
fn small_recipe(method: &str) -> Recipe {
    let mut text = selfsup::methods::published(method).unwrap().1.to_string();
    text = text.replace("width = 1.0", "width = 0.125");
    text = text.replace("dim = 192", "dim = 48");
    text = text.replace("depth = 12", "depth = 2");
    let mut recipe = Recipe::parse(&text).unwrap();
    recipe.train.batch_size = 12;
    if let selfsup::methods::MethodConfig::Moco(m) = &mut recipe.method {
        m.bn_splits = 6;
        m.queue_size = 48;
    }
    // SGD, whose step is proportional to the gradient, so that float rounding stays rounding
    // over the steps compared: AdamW and LARS normalise each step, and turn a gradient that is
    // rounding noise (a bias a normalisation cancels; the first Adam step is sign(g)) into a
    // full step in any run. With the recipes' own optimisers the weights end 1e-7 (SimCLR,
    // MoCo, jigsaw) to 2e-4 (MAE, DINO) and, for the GAN, 1e-2 of their change apart.
    recipe.train.optim.optimizer = selfsup::train::OptimizerKind::Sgd;
    recipe.train.optim.momentum = 0.9;
    recipe.train.optim.final_weight_decay = None;
    if let selfsup::methods::MethodConfig::Inpainting(m) = &mut recipe.method {
        m.bottleneck_dim = 64;
    }
    if let selfsup::methods::MethodConfig::Dino(d) = &mut recipe.method {
        (d.out_dim, d.hidden, d.bottleneck) = (256, 128, 64);
    }
    recipe.check().unwrap();
    recipe
}

/// `steps` steps of `recipe` on `world` ranks (threads), with `pieces`: each rank's outcome.
fn run(recipe: &Recipe, split: &Split, world: usize, steps: usize, pieces: Pieces) -> Vec<Outcome> {
    let comms: Vec<Arc<dyn Communicator>> = match world {
        1 => vec![Arc::new(Single)],
        w => ThreadGroup::new(w),
    };
    std::thread::scope(|s| {
        let ranks: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    dist::with_world(comm, || {
                        dist::with_pieces(pieces, || rank_run(recipe, split, steps))
                    })
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

fn rank_run(recipe: &Recipe, split: &Split, steps: usize) -> Outcome {
    let (rank, world) = dist::rank_size();
    let pipeline = recipe.augment.build().unwrap();
    let loader = Loader::new(
        split.clone(),
        recipe.method.augment(pipeline),
        recipe.train.batch_size,
        recipe.seed,
    )
    .unwrap()
    .sharded(rank, world);
    let device = Device::flex().autodiff();
    struct Steps<'a> {
        recipe: &'a Recipe,
        loader: Loader,
        steps: usize,
        device: Device,
    }
    impl MethodUser<Outcome> for Steps<'_> {
        fn call<M: Method>(self, mut method: M) -> Outcome {
            let dir = tempfile::tempdir().unwrap();
            let trainer = Trainer::new(self.recipe.train.clone(), dir.path(), self.device.clone());
            let (mut optim, mut aux) = (
                self.recipe.train.optim.init(),
                self.recipe.train.optim.init(),
            );
            let n = self.recipe.train.batch_size / dist::world().size();
            let mut outcome = Outcome {
                losses: vec![],
                grads: vec![],
                start: flat_weights(&method),
                weights: vec![],
            };
            for step in 0..self.steps {
                let batch = self.loader.batch(0, step);
                let views: Vec<Tensor<4>> = batch
                    .views
                    .iter()
                    .map(|v| v.to_tensor(&self.device))
                    .collect();
                let progress = Progress {
                    epoch: 0,
                    step,
                    total_steps: 10,
                    steps_per_epoch: 10,
                };
                let out = method.loss(&views, &progress);
                let mut loss = out
                    .loss
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap();
                dist::mean_over_ranks(&mut loss);
                outcome.losses.push(loss[0]);
                let grads = GradientsParams::from_grads(out.loss.backward(), &method);
                let grads = dist::average_gradients(grads, &method);
                if step == 0 {
                    outcome.grads = flat_grads(&grads, &method);
                }
                method = trainer.step(
                    method, &mut optim, &mut aux, grads, out.keep, n, LR, &progress,
                );
            }
            outcome.weights = flat_weights(&method);
            outcome
        }
    }
    with_method(
        recipe,
        None,
        &device,
        Steps {
            recipe,
            loader,
            steps,
            device: device.clone(),
        },
    )
}

/// Every float tensor of `module`, in its order.
fn flat_weights<M: Module>(module: &M) -> Vec<f32> {
    struct Flat(Vec<f32>);
    impl ModuleVisitor for Flat {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.extend(
                param
                    .val()
                    .into_data()
                    .convert::<f32>()
                    .try_into_vec::<f32>()
                    .unwrap(),
            );
        }
    }
    let mut flat = Flat(vec![]);
    module.visit(&mut flat);
    flat.0
}

/// The gradient of each of `module`'s parameters, in its order.
fn flat_grads<M: Module>(grads: &GradientsParams, module: &M) -> Vec<Vec<f32>> {
    struct Flat<'a>(&'a GradientsParams, Vec<Vec<f32>>);
    impl ModuleVisitor for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                let values = g.into_data().convert::<f32>().try_into_vec::<f32>();
                self.1.push(values.unwrap());
            }
        }
    }
    let mut flat = Flat(grads, vec![]);
    module.visit(&mut flat);
    flat.1
}

/// The largest difference of `a` and `b`, relative to the largest magnitude of `b`.
fn relative_gap(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// How far the run at `world` ranks is from one process, each relative: the loss (the largest
/// gap of a step's), the first step's gradients (to the largest of all: a bias that batch norm
/// cancels has a true gradient of 0 and one of float noise in any run), and the weights after
/// `steps` (the gap's norm to the norm of one process's change of them). Relative to the change,
/// not to the largest weight.
/// Panics unless every rank holds the same weights and logged the same losses.
fn gaps(recipe: &Recipe, split: &Split, world: usize, steps: usize, pieces: Pieces) -> [f32; 3] {
    let single = &run(recipe, split, 1, steps, Pieces::default())[0];
    let ranks = run(recipe, split, world, steps, pieces);
    for (r, o) in ranks.iter().enumerate() {
        assert_eq!(
            o.weights, ranks[0].weights,
            "rank {r}'s weights differ from rank 0's"
        );
        assert_eq!(o.losses, ranks[0].losses, "rank {r} logged another loss");
    }
    let o = &ranks[0];
    let loss = o
        .losses
        .iter()
        .zip(&single.losses)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0f32, f32::max);
    let norm = |v: Vec<f32>| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let sub = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<_>>();
    let change = norm(sub(&single.weights, &single.start));
    let gap = norm(sub(&o.weights, &single.weights));
    [
        loss,
        relative_gap(&o.grads.concat(), &single.grads.concat()),
        (gap / change) as f32,
    ]
}

#[test]
fn every_method_trains_the_same_at_two_and_three_ranks() {
    let split = common::cifar10_train(48);
    for method in METHODS {
        let recipe = small_recipe(method);
        for world in [2, 3] {
            let [loss, grads, weights] = gaps(&recipe, &split, world, 3, Pieces::default());
            eprintln!("{method} at {world} ranks: loss {loss:.1e}, gradients {grads:.1e}, weights' change after 3 steps {weights:.1e}");
            assert!(
                loss < 1e-6,
                "{method} at {world} ranks: loss off by {loss:e}"
            );
            assert!(
                grads < 1e-5,
                "{method} at {world} ranks: gradients off by {grads:e}"
            );
            assert!(
                weights < 1e-3,
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
    let simclr = small_recipe("simclr");
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
    let mae = small_recipe("mae");
    let [loss, _, _] = gaps(&mae, &split, 2, 1, off(|p| p.global_draws = false));
    assert!(
        loss > 1e-4,
        "MAE with masks drawn for the local batch: loss off by only {loss:e}"
    );
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused() {
    let recipe = small_recipe("simclr");
    let comms = ThreadGroup::new(5);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(|| dist::with_world(c, || recipe.check().unwrap_err().to_string())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        errors[0].contains("train.batch_size = 12") && errors[0].contains("5 ranks"),
        "{}",
        errors[0]
    );
    let moco = small_recipe("moco");
    let comms = ThreadGroup::new(4);
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| s.spawn(|| dist::with_world(c, || moco.check().unwrap_err().to_string())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(errors[0].contains("method.bn_splits = 6"), "{}", errors[0]);
}

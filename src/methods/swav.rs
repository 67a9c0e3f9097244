//! SwAV (Caron et al. 2020): swapping assignments between views. Each crop's embedding
//! z = g(f(x))/‖g(f(x))‖ is scored against K learned prototypes C (unit vectors), s = zᵀC; the
//! codes q of the two global crops come from Sinkhorn-Knopp over the batch (each prototype gets
//! an equal share of the samples, which is what keeps the codes from collapsing), and each crop
//! predicts the codes of the other crops:
//!
//!   L = mean over pairs (i ∈ {1, 2}, j ≠ i) of  −Σ_k q_i(k) log softmax(s_j / τ)(k),
//!   q = Sinkhorn(exp(s/ε)), 3 iterations, ε = 0.05, τ = 0.1.
//!
//! As `main_swav.py` and its `resnet50.py`: the backbone runs once per crop resolution and the
//! projector (Linear → BN → ReLU → Linear) once on every crop together; the prototypes are a
//! linear layer without bias, renormalised to unit norm before every step and frozen for the
//! first epoch (`freeze_prototypes_niters`, 313 iterations: one epoch of ImageNet at batch
//! 4,096); the codes have no gradient. With a queue (`queue_length`, for batches under 256), the
//! embeddings of earlier batches join Sinkhorn's samples from epoch `epoch_queue_starts` on,
//! once the queue is full. Across ranks the scores of every rank are gathered and every rank
//! runs Sinkhorn over the whole global batch (and the queue, which holds every rank's
//! embeddings), then takes its own rows: the codes of one process at any world size.

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{at_least_one, positive};
use crate::dist::{gather_kept, local_part};
use crate::losses::{embedding_std, l2_normalize, sinkhorn, swav_loss};
use crate::methods::moco::enqueue;
use crate::methods::{recipe_file, Feed, InitContext, MethodSpec};
use crate::models::OutputNorm::Off;
use crate::models::{Backbone, ProjectionHead, ProjectionHeadConfig};
use crate::train::{Method, Progress, StepOutput};

/// The crops whose codes the others predict: the two global crops (`crops_for_assign` 0, 1).
const CODED: usize = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwavConfig {
    /// Hidden width of the projector (2048).
    pub proj_hidden: usize,
    /// Width of the embeddings and prototypes (`feat_dim`, 128).
    pub proj_dim: usize,
    /// K, the number of prototypes (3000).
    pub prototypes: usize,
    /// τ of the softmax over the prototype scores (0.1).
    pub temperature: f64,
    /// ε, Sinkhorn's entropy regularisation (0.05): smaller gives sharper codes.
    pub epsilon: f64,
    /// Sinkhorn-Knopp iterations (3).
    pub sinkhorn_iterations: usize,
    /// Epochs during which the prototypes do not learn (1).
    pub freeze_prototypes_epochs: usize,
    /// Embeddings of earlier batches kept for the codes, per global crop (0: no queue; the
    /// official code suggests 3840 for a batch of 256). A multiple of `train.batch_size`.
    pub queue_size: usize,
    /// The epoch from which the queue fills (15); it joins the codes once full.
    pub epoch_queue_starts: usize,
}

impl Default for SwavConfig {
    /// `main_swav.py`'s defaults.
    fn default() -> Self {
        SwavConfig {
            proj_hidden: 2048,
            proj_dim: 128,
            prototypes: 3000,
            temperature: 0.1,
            epsilon: 0.05,
            sinkhorn_iterations: 3,
            freeze_prototypes_epochs: 1,
            queue_size: 0,
            epoch_queue_starts: 15,
        }
    }
}

impl MethodSpec for SwavConfig {
    type Method = Swav;
    const PUBLISHED: (&'static str, &'static str) = recipe_file!("swav_cifar10");

    fn check(&self, feed: &Feed) -> anyhow::Result<()> {
        at_least_one("method.proj_hidden", self.proj_hidden)?;
        at_least_one("method.proj_dim", self.proj_dim)?;
        at_least_one("method.prototypes", self.prototypes)?;
        at_least_one("method.sinkhorn_iterations", self.sinkhorn_iterations)?;
        positive("method.temperature", self.temperature)?;
        positive("method.epsilon", self.epsilon)?;
        if self.queue_size % feed.batch != 0 {
            anyhow::bail!(
                "method.queue_size = {}: the queue takes whole batches, so it must be a multiple of train.batch_size = {} (as main_swav.py rounds it down)",
                self.queue_size,
                feed.batch
            );
        }
        let views = feed.view_sizes.len();
        if views < CODED {
            anyhow::bail!("augment: method swav needs two global crops (their codes are swapped) and any smaller ones; this pipeline makes {views} view(s)");
        }
        feed.same_size("swav", 0..CODED)?;
        feed.same_size("swav", CODED..views)?;
        feed.min_batch("swav", 2, "batch norm normalises over the batch")
    }

    /// Encoder, projector, unit prototypes (`nn.Linear`'s init, then normalised), empty queues.
    fn init(&self, ctx: &InitContext) -> Swav {
        let (model, device) = (ctx.model, ctx.device);
        let (d, k) = (self.proj_dim, self.prototypes);
        let bound = 1.0 / (d as f64).sqrt();
        let prototypes = Tensor::random([d, k], Distribution::Uniform(-bound, bound), device);
        let queues = match self.queue_size {
            0 => vec![],
            size => (0..CODED)
                .map(|_| {
                    Param::initialized(ParamId::new(), Tensor::zeros([size, d], device))
                        .set_require_grad(false)
                })
                .collect(),
        };
        Swav {
            backbone: model.init(device),
            projector: ProjectionHeadConfig::mlp(model.feature_dim(), self.proj_hidden, d, 2, Off)
                .init(device),
            prototypes: Param::from_tensor(unit_columns(prototypes)),
            queues,
            temperature: self.temperature,
            epsilon: self.epsilon,
            sinkhorn_iterations: self.sinkhorn_iterations,
            freeze_prototypes_epochs: self.freeze_prototypes_epochs,
            epoch_queue_starts: self.epoch_queue_starts,
        }
    }
}

#[derive(Module, Debug)]
pub struct Swav {
    backbone: Backbone,
    projector: ProjectionHead,
    /// C: the K prototypes as unit columns, `[proj_dim, K]` (unit again after every step).
    prototypes: Param<Tensor<2>>,
    /// One queue per global crop: the last `queue_size` embeddings `[queue_size, proj_dim]` of
    /// the global batch, a ring without gradient; none without a queue.
    queues: Vec<Param<Tensor<2>>>,
    temperature: f64,
    epsilon: f64,
    sinkhorn_iterations: usize,
    freeze_prototypes_epochs: usize,
    epoch_queue_starts: usize,
}

/// `c` `[d, K]` with each column scaled to unit l2 norm.
fn unit_columns(c: Tensor<2>) -> Tensor<2> {
    l2_normalize(c.transpose()).transpose()
}

impl Swav {
    /// Unit embeddings z of every crop `[Σ n_g, proj_dim]`, in the order of `groups` (each a
    /// batch of same-sized crops): the backbone once per resolution, the projector once on all.
    pub fn embed(&self, groups: Vec<Tensor<4>>) -> Tensor<2> {
        let features = groups
            .into_iter()
            .map(|x| self.backbone.forward(x))
            .collect();
        l2_normalize(self.projector.forward(Tensor::cat(features, 0)))
    }

    /// C, the prototypes as columns `[proj_dim, K]`.
    pub fn prototypes(&self) -> Tensor<2> {
        self.prototypes.val()
    }

    /// Prototype scores zᵀC `[rows, K]`; `frozen`: the prototypes take no gradient.
    pub fn scores(&self, z: Tensor<2>, frozen: bool) -> Tensor<2> {
        let c = self.prototypes.val();
        crate::precision::matmul(z, if frozen { c.detach() } else { c })
    }

    /// The codes of one global crop from this rank's scores `[n, K]`: Sinkhorn over the global
    /// batch, after the queue's embeddings once that queue is full; this rank's rows `[n, K]`,
    /// no gradient.
    pub fn codes(&self, scores: Tensor<2>, crop: usize) -> Tensor<2> {
        let [n, _] = scores.dims();
        let batch = gather_kept(scores.detach(), n);
        let rows = batch.dims()[0];
        let samples = match self.full_queue(crop) {
            Some(queue) => Tensor::cat(vec![self.scores(queue, true), batch], 0),
            None => batch,
        };
        let total = samples.dims()[0];
        let q = sinkhorn(samples, self.epsilon, self.sinkhorn_iterations);
        local_part(q.narrow(0, total - rows, rows))
    }

    /// Crop `crop`'s queue once full (its last row written: `main_swav.py`'s test), else `None`.
    fn full_queue(&self, crop: usize) -> Option<Tensor<2>> {
        let queue = self.queues.get(crop)?.val();
        let size = queue.dims()[0];
        let last: f32 = queue
            .clone()
            .narrow(0, size - 1, 1)
            .abs()
            .sum()
            .into_scalar();
        (last > 0.0).then_some(queue)
    }
}

impl Method for Swav {
    /// `views[0]`, `views[1]`: the global crops; the rest: smaller crops.
    fn loss(&self, views: &[Tensor<4>], progress: &Progress) -> StepOutput {
        let [n, _, _, _] = views[0].dims();
        let mut groups = vec![Tensor::cat(views[..CODED].to_vec(), 0)];
        if views.len() > CODED {
            groups.push(Tensor::cat(views[CODED..].to_vec(), 0));
        }
        let z = self.embed(groups);
        let frozen = progress.epoch < self.freeze_prototypes_epochs;
        let s = self.scores(z.clone(), frozen);
        let scores: Vec<Tensor<2>> = (0..views.len())
            .map(|v| s.clone().narrow(0, v * n, n))
            .collect();
        let codes: Vec<Tensor<2>> = (0..CODED)
            .map(|i| self.codes(scores[i].clone(), i))
            .collect();
        let loss = swav_loss(&codes, &scores, self.temperature);
        // The global crops' embeddings side by side, `[n, 2·proj_dim]`, for the queues.
        let keep = (!self.queues.is_empty()).then(|| {
            let crops = (0..CODED).map(|i| z.clone().narrow(0, i * n, n)).collect();
            Tensor::cat(crops, 1).detach()
        });
        StepOutput {
            loss,
            scalars: vec![("z_std", embedding_std(z.narrow(0, 0, n)))],
            keep,
        }
    }

    /// The prototypes back to unit norm; from `epoch_queue_starts` on, the step's global-crop
    /// embeddings of every rank into the queues. The ring position follows from the step count.
    fn after_step(mut self, kept: Option<Tensor<2>>, progress: &Progress) -> Self {
        self.prototypes = self.prototypes.map(|c| {
            let trained = c.is_require_grad();
            let c = unit_columns(c.set_require_grad(false));
            if trained {
                c.set_require_grad(true)
            } else {
                c
            }
        });
        let start = self.epoch_queue_starts * progress.steps_per_epoch;
        if let (Some(z), true) = (kept, progress.step >= start) {
            let [rows, width] = z.dims();
            let d = width / CODED;
            let at = (progress.step - start) * rows;
            self.queues = std::mem::take(&mut self.queues)
                .into_iter()
                .enumerate()
                .map(|(i, queue)| {
                    let embeddings = z.clone().narrow(1, i * d, d);
                    queue.map(|q| enqueue(q, embeddings, at).set_require_grad(false))
                })
                .collect();
        }
        self
    }

    fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    fn start_from(self, weights: Backbone) -> Self {
        Swav {
            backbone: weights,
            ..self
        }
    }
}

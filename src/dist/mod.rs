//! Data-parallel training: one process per device, launched by `mpirun -np N selfsup pretrain`
//! (or a cluster's `srun`), and the collectives they train through.
//!
//! The run is the same at any world size W. `train.batch_size` is the **global** batch: rank r
//! takes rows r, r+W, r+2W, ... of each global batch ([`local_rows`]); the loader fixes every
//! batch and view by (seed, epoch, sample), so no sampler and no per-rank seeds. Every draw
//! keyed by the step (MAE's masks, MoCo's shuffle, DINO's drop path, jigsaw's puzzles) draws for
//! the global batch and takes this rank's rows. Gradients are averaged over ranks in one flat
//! bucket ([`average_gradients`]); batch norm in training normalises over the global batch
//! ([`crate::kernels::batch_norm`] through [`all_reduce`]); SimCLR gathers its projections with
//! their gradient ([`all_gather_rows`]); MoCo's keys and DINO's teacher outputs reach
//! `after_step` from every rank ([`gather_kept`]); SwAV's Sinkhorn runs over every rank's scores
//! ([`local_part`]). Rank 0 alone writes the run folder.
//!
//! The collectives sit behind [`Communicator`]: [`Single`] (a lone process, no MPI at all),
//! [`ThreadGroup`] (ranks as threads of one process: the tests), and, with the cargo feature
//! `mpi`, Open MPI through rsmpi ([`mpi::init`]). Every rank must make the same collective calls
//! in the same order, as in MPI.

pub mod check;
#[cfg(feature = "mpi")]
pub mod mpi;
mod op;
mod threads;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Result};
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};

pub use op::{all_reduce, sync_batch_norm};
pub use threads::ThreadGroup;

/// The collectives of a group of processes (or threads), staged through host memory so that
/// every backend works. Every member calls each one with data of the same length.
pub trait Communicator: Send + Sync {
    /// This member's index, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of members W.
    fn size(&self) -> usize;
    /// This member's index among the members on its own node (host), which picks its GPU.
    /// Every member on one node by default.
    fn local_rank(&self) -> usize {
        self.rank()
    }
    /// Replaces `data` by its element-wise sum over the members (identical on every member).
    fn all_reduce_sum(&self, data: &mut [f32]);
    /// [`all_reduce_sum`](Self::all_reduce_sum) in f64 (batch-norm statistics and their
    /// backward sums, where f32 would lose what a cancellation leaves).
    fn all_reduce_sum_f64(&self, data: &mut [f64]);
    /// Every member's `data`, concatenated in rank order.
    fn all_gather(&self, data: &[f32]) -> Vec<f32>;
    /// Every member's `value`, in rank order.
    fn all_gather_u64(&self, value: u64) -> Vec<u64>;
    /// Ends every member's process at once with `code` (MPI_Abort): a rank that fails must not
    /// leave the others waiting in a collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A lone process: world size 1, every collective the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _data: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _data: &mut [f64]) {}
    fn all_gather(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
}

static PROCESS: OnceLock<Arc<dyn Communicator>> = OnceLock::new();

/// Nanoseconds this process has spent in collectives, waiting for the other ranks included.
static IN_COLLECTIVES: AtomicU64 = AtomicU64::new(0);

/// Runs the collective `f`, counting its time ([`collective_seconds`]).
pub(crate) fn timed<R>(f: impl FnOnce() -> R) -> R {
    let started = std::time::Instant::now();
    let result = f();
    IN_COLLECTIVES.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    result
}

/// Seconds this process has spent in collectives so far (waiting for the other ranks
/// included): the trainer logs each epoch's share as `collective_share`.
pub fn collective_seconds() -> f64 {
    IN_COLLECTIVES.load(Ordering::Relaxed) as f64 * 1e-9
}

thread_local! {
    static THREAD: RefCell<Option<Arc<dyn Communicator>>> = const { RefCell::new(None) };
}

/// The pieces of data parallelism beyond averaged gradients, all on by default. A test switches
/// one off (on its rank threads, [`with_pieces`]) to show that the run then differs from one
/// process: each piece is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    /// [`all_gather_rows`] carries the gradient back to every rank (else only the local rows'
    /// own gradient).
    pub gather_gradient: bool,
    /// Batch norm in training normalises over the global batch (else over the local one).
    pub sync_batch_norm: bool,
    /// Draws keyed by the step are made for the global batch (else for the local one).
    pub global_draws: bool,
}

impl Default for Pieces {
    fn default() -> Self {
        Pieces {
            gather_gradient: true,
            sync_batch_norm: true,
            global_draws: true,
        }
    }
}

thread_local! {
    static PIECES: RefCell<Pieces> = RefCell::new(Pieces::default());
}

/// Runs `f` with `pieces` on this thread.
pub fn with_pieces<R>(pieces: Pieces, f: impl FnOnce() -> R) -> R {
    let previous = PIECES.with(|p| p.replace(pieces));
    let result = f();
    PIECES.with(|p| *p.borrow_mut() = previous);
    result
}

/// The pieces on for this thread.
pub fn pieces() -> Pieces {
    PIECES.with(|p| *p.borrow())
}

/// Makes `world` the process's group (once, at start-up: `mpi::init` calls it).
pub fn set_process_world(world: Arc<dyn Communicator>) -> Result<()> {
    if PROCESS.set(world).is_err() {
        bail!("the process's communicator was already set");
    }
    Ok(())
}

/// Runs `f` with `world` as this thread's group (a [`ThreadGroup`] member), then restores the
/// previous one.
pub fn with_world<R>(world: Arc<dyn Communicator>, f: impl FnOnce() -> R) -> R {
    let previous = THREAD.with(|t| t.borrow_mut().replace(world));
    let result = f();
    THREAD.with(|t| *t.borrow_mut() = previous);
    result
}

/// The group this thread trains in: its [`with_world`] group, else the process's, else
/// [`Single`].
pub fn world() -> Arc<dyn Communicator> {
    THREAD
        .with(|t| t.borrow().clone())
        .or_else(|| PROCESS.get().cloned())
        .unwrap_or_else(|| Arc::new(Single))
}

/// This rank and the world size `(r, W)`.
pub fn rank_size() -> (usize, usize) {
    let w = world();
    (w.rank(), w.size())
}

/// Refuses a global batch of `batch` (from the recipe key `key`) that the ranks cannot share
/// equally.
pub fn check_batch(key: &str, batch: usize) -> Result<()> {
    let world = world().size();
    if !batch.is_multiple_of(world) {
        bail!("{key} = {batch}: the global batch is shared by the {world} ranks of this run, so {world} must divide it");
    }
    Ok(())
}

/// Waits until every rank is here.
pub fn barrier() {
    world().all_gather_u64(0);
}

/// The world size an MPI launcher (mpirun, srun) started this process in, if any.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// Whether this rank writes the run folder, logs and shows progress (rank 0).
pub fn is_main() -> bool {
    world().rank() == 0
}

/// The rows of a global batch of `global` rows that this rank takes: r, r+W, r+2W, ...
pub fn local_rows(global: usize) -> Vec<usize> {
    let (r, w) = rank_size();
    (r..global).step_by(w).collect()
}

/// This rank's share of `global`, a draw made for every row of the global batch (a mask, a
/// label, a keep flag): the items at [`local_rows`].
pub fn local_share<T: Clone>(global: &[T]) -> Vec<T> {
    if !pieces().global_draws {
        return global.to_vec();
    }
    local_rows(global.len())
        .into_iter()
        .map(|i| global[i].clone())
        .collect()
}

/// The row in the global batch of each of this rank's `n` rows: [`local_rows`] of `W·n`
/// (`0..n` where draws are not global).
pub fn global_rows(n: usize) -> Vec<usize> {
    local_share(&(0..global_batch(n)).collect::<Vec<_>>())
}

/// This rank's rows ([`local_rows`]) of `x` `[W·n, ...]`, rows of the global batch in order:
/// `[n, ...]` (SwAV's codes, computed over the global batch on every rank; fine-tuning's mixed
/// batch).
pub fn local_part<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let rows = x.dims()[0];
    if world().size() == 1 {
        return x;
    }
    let idx: Vec<i64> = local_rows(rows).into_iter().map(|i| i as i64).collect();
    let len = idx.len();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [len]), &x.device());
    x.select(0, idx)
}

/// The global batch size for a local one of `n` rows (every rank holds as many).
pub fn global_batch(n: usize) -> usize {
    match pieces().global_draws {
        true => n * world().size(),
        false => n,
    }
}

/// The rows of every rank, `[W·n, ...]` in global batch order (row r + kW is rank r's row k),
/// each rank's `x` being `[n, ...]`. With gradient: the gradient of a row reaches its rank as
/// the sum of every rank's gradient for it (lightly's `GatherLayer`), so a loss over all rows
/// on every rank trains as one loss over the global batch.
pub fn all_gather_rows<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    let (r, w) = rank_size();
    if w == 1 {
        return x;
    }
    let mut dims = x.dims();
    let n = dims[0];
    // Zeros but for this rank's rows, summed over ranks: exact, as x + 0 is x.
    let mut placed = dims;
    placed[0] = n * w;
    let slots: Vec<i64> = (0..n).map(|k| (r + k * w) as i64).collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(slots, [n]), &x.device());
    let zeros = Tensor::<D>::zeros(placed, &x.device());
    let spread = zeros.select_assign(0, index, x, burn::tensor::IndexingUpdateOp::Add);
    dims[0] = n * w;
    if !pieces().gather_gradient {
        // The other ranks' rows as constants: only this rank's rows carry a gradient.
        let global = all_reduce(spread.clone().detach());
        return (global + spread.clone() - spread.detach()).reshape(dims);
    }
    all_reduce(spread).reshape(dims)
}

/// `kept` rows of this rank, without gradient, from every rank in global batch order: `kept`
/// is one or more blocks of `n` rows, each block a local batch (a view, a pass of an
/// accumulated step); the result has the same blocks, each `W·n` rows of the global batch.
pub fn gather_kept(kept: Tensor<2>, n: usize) -> Tensor<2> {
    let w = world().size();
    if w == 1 {
        return kept;
    }
    let [rows, d] = kept.dims();
    let blocks = rows / n;
    let device = kept.device();
    let values = kept
        .detach()
        .try_into_vec_as::<f32>()
        .expect("kept rows read from the device");
    let all = world().all_gather(&values);
    // all[rank][block][k][d] → out[block][k·W + rank][d]
    let mut out = vec![0f32; all.len()];
    for rank in 0..w {
        for b in 0..blocks {
            for k in 0..n {
                let from = ((rank * blocks + b) * n + k) * d;
                let to = ((b * n + k) * w + rank) * d;
                out[to..to + d].copy_from_slice(&all[from..from + d]);
            }
        }
    }
    Tensor::from_data(TensorData::new(out, [rows * w, d]), &device)
}

/// Averages the gradients over ranks, in one flat bucket in the module's own parameter order
/// (one all-reduce a step); every rank then takes the same optimiser step.
pub fn average_gradients<M: Module>(grads: GradientsParams, module: &M) -> GradientsParams {
    let w = world().size();
    if w == 1 {
        return grads;
    }
    let mut bucket = Bucket {
        grads,
        values: vec![],
        taken: vec![],
        returning: false,
        next: 0,
        at: 0,
    };
    module.visit(&mut bucket);
    world().all_reduce_sum(&mut bucket.values);
    let scale = 1.0 / w as f32;
    bucket.values.iter_mut().for_each(|v| *v *= scale);
    bucket.returning = true;
    module.visit(&mut bucket);
    bucket.grads
}

/// A module's gradients, taken out flat in parameter order, then (`returning`) put back from
/// `values` in the same order and shapes.
struct Bucket {
    grads: GradientsParams,
    values: Vec<f32>,
    /// The parameters taken, in order, with their gradient's device.
    taken: Vec<(burn::module::ParamId, burn::tensor::Device)>,
    returning: bool,
    /// While returning: the next of `taken`, and where its values start.
    next: usize,
    at: usize,
}

impl ModuleVisitor for Bucket {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.returning {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                self.taken.push((param.id, grad.device()));
                let values = grad.try_into_vec_as::<f32>();
                self.values
                    .extend(values.expect("a gradient read from the device"));
            }
            return;
        }
        let Some((id, device)) = self.taken.get(self.next) else {
            return;
        };
        if *id != param.id {
            return;
        }
        let shape = param.shape();
        let len = shape.num_elements();
        let values = self.values[self.at..self.at + len].to_vec();
        let grad = Tensor::<D>::from_data(TensorData::new(values, shape), device);
        self.grads.register(param.id, grad);
        (self.next, self.at) = (self.next + 1, self.at + len);
    }
}

/// A hash of every float tensor of `module` (parameters and buffers: batch-norm statistics,
/// MoCo's queue, DINO's centre), bit for bit.
pub fn weights_hash<M: Module>(module: &M) -> u64 {
    struct Hasher(u64);
    impl ModuleVisitor for Hasher {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param
                .val()
                .try_into_vec_as::<f32>()
                .expect("a parameter read from the device");
            self.0 = hash_floats(values, self.0);
        }
    }
    let mut h = Hasher(0xcbf2_9ce4_8422_2325);
    module.visit(&mut h);
    h.0
}

/// FNV-1a over the bits of `values`, from `hash`.
fn hash_floats(values: impl IntoIterator<Item = f32>, mut hash: u64) -> u64 {
    for v in values {
        for byte in v.to_bits().to_le_bytes() {
            hash = (hash ^ byte as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

/// Refuses to go on when the ranks' copies of `module` differ (`when`: "at the start", "after
/// epoch 3"), naming the ranks that differ from rank 0.
pub fn check_same_weights<M: Module>(module: &M, when: &str) -> Result<()> {
    let world = world();
    if world.size() == 1 {
        return Ok(());
    }
    let hashes = world.all_gather_u64(weights_hash(module));
    let differ: Vec<usize> = (1..hashes.len())
        .filter(|&r| hashes[r] != hashes[0])
        .collect();
    if !differ.is_empty() {
        bail!("{when} the weights of rank(s) {differ:?} differ from rank 0's: the ranks no longer train one model (a rank resumed from another checkpoint, or a non-deterministic reduction)");
    }
    Ok(())
}

/// The mean over ranks of each of `values` (logged scalars and losses).
pub fn mean_over_ranks(values: &mut [f32]) {
    let w = world();
    if w.size() > 1 {
        w.all_reduce_sum(values);
        let scale = 1.0 / w.size() as f32;
        values.iter_mut().for_each(|v| *v *= scale);
    }
}

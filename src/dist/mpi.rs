//! The [`Communicator`] over MPI (Open MPI through rsmpi), for processes launched by `mpirun -np
//! N selfsup ...` or a cluster's `srun`. Collectives go through host memory, so every backend
//! trains this way; MPI picks the transport (shared memory on a node, TCP or InfiniBand between
//! nodes).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Equivalence};

use super::Communicator;

/// The MPI world of this process.
pub struct MpiWorld {
    /// Behind a lock: MPI is initialised with `MPI_THREAD_SERIALIZED` at least, so calls from
    /// different threads must not overlap.
    comm: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// The rank among this node's processes (`MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)`).
    local_rank: usize,
}

// SAFETY: every MPI call goes through the mutex, and MPI was initialised for calls from any
// thread one at a time (checked in `init`).
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// Keeps MPI initialised; dropping it finalises MPI (end of `main`).
pub struct MpiGuard {
    _universe: Universe,
    /// This process's world.
    pub world: Arc<MpiWorld>,
}

/// Initialises MPI and makes its world this process's group ([`super::world`]).
///
/// # Errors
/// MPI was initialised already, or does not allow calls from more than one thread.
pub fn init() -> Result<MpiGuard> {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized) else {
        bail!("MPI was initialised already");
    };
    if matches!(threading, Threading::Single | Threading::Funneled) {
        bail!("this MPI library allows calls from the main thread only ({threading:?}); selfsup needs MPI_THREAD_SERIALIZED");
    }
    let comm = universe.world();
    let (rank, size) = (comm.rank() as usize, comm.size() as usize);
    let local_rank = comm.split_shared(comm.rank()).rank() as usize;
    let world = Arc::new(MpiWorld {
        comm: Mutex::new(comm),
        rank,
        size,
        local_rank,
    });
    super::set_process_world(world.clone())?;
    Ok(MpiGuard {
        _universe: universe,
        world,
    })
}

impl MpiWorld {
    /// MPI_Allreduce with MPI_SUM of `data`, in place.
    fn sum<T: Equivalence + Clone>(&self, data: &mut [T]) {
        let send = data.to_vec();
        super::timed(|| {
            self.comm
                .lock()
                .unwrap()
                .all_reduce_into(&send[..], data, SystemOperation::sum())
        });
    }
}

impl Communicator for MpiWorld {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn all_reduce_sum(&self, data: &mut [f32]) {
        self.sum(data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) {
        self.sum(data)
    }

    fn all_gather(&self, data: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; data.len() * self.size];
        super::timed(|| {
            self.comm
                .lock()
                .unwrap()
                .all_gather_into(data, &mut out[..])
        });
        out
    }

    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let mut out = vec![0u64; self.size];
        super::timed(|| {
            self.comm
                .lock()
                .unwrap()
                .all_gather_into(&value, &mut out[..])
        });
        out
    }

    fn abort(&self, code: i32) -> ! {
        // Not through the lock: a rank may abort while another thread waits in a collective.
        SimpleCommunicator::world().abort(code)
    }
}

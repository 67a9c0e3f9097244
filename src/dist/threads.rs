//! Ranks as threads of one process: the collectives of [`Communicator`] over shared memory, for
//! tests that compare a run at world size W with the single-process run without MPI.

use std::sync::{Arc, Barrier, Mutex};

use super::Communicator;

/// One member of a group of `size` threads; [`ThreadGroup::group`] makes them all.
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<u8>>>,
}

impl ThreadGroup {
    /// The `size` members of a new group, in rank order: give member r to thread r (through
    /// [`super::with_world`]).
    pub fn group(size: usize) -> Vec<Arc<dyn Communicator>> {
        let shared = Arc::new(Shared {
            size,
            barrier: Barrier::new(size),
            slots: Mutex::new(vec![vec![]; size]),
        });
        (0..size)
            .map(|rank| {
                Arc::new(ThreadGroup {
                    rank,
                    shared: shared.clone(),
                }) as Arc<dyn Communicator>
            })
            .collect()
    }

    /// Every member's bytes, in rank order.
    fn exchange(&self, data: Vec<u8>) -> Vec<Vec<u8>> {
        super::timed(|| self.exchange_untimed(data))
    }

    fn exchange_untimed(&self, data: Vec<u8>) -> Vec<Vec<u8>> {
        self.shared.slots.lock().unwrap()[self.rank] = data;
        self.shared.barrier.wait();
        let all = self.shared.slots.lock().unwrap().clone();
        assert!(
            all.iter().all(|m| m.len() == all[0].len()),
            "rank {}: the members passed {:?} bytes to one collective: their calls differ",
            self.rank,
            all.iter().map(Vec::len).collect::<Vec<_>>()
        );
        // Nobody writes the next exchange before everyone has read this one.
        self.shared.barrier.wait();
        all
    }
}

fn to_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn to_f32(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Communicator for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    /// Sums in rank order: the same bits on every member.
    fn all_reduce_sum(&self, data: &mut [f32]) {
        let all = self.exchange(to_bytes(data));
        data.fill(0.0);
        for member in &all {
            for (d, v) in data.iter_mut().zip(to_f32(member)) {
                *d += v;
            }
        }
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let all = self.exchange(bytes);
        data.fill(0.0);
        for member in &all {
            for (d, b) in data.iter_mut().zip(member.chunks_exact(8)) {
                *d += f64::from_le_bytes(b.try_into().unwrap());
            }
        }
    }

    fn all_gather(&self, data: &[f32]) -> Vec<f32> {
        let all = self.exchange(to_bytes(data));
        all.iter()
            .flat_map(|m| to_f32(m).collect::<Vec<_>>())
            .collect()
    }

    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        self.exchange(value.to_le_bytes().to_vec())
            .iter()
            .map(|b| u64::from_le_bytes(b[..8].try_into().unwrap()))
            .collect()
    }

    fn abort(&self, code: i32) -> ! {
        panic!(
            "rank {} aborted the thread group with code {code}",
            self.rank
        )
    }
}

//! The gradient all-reduce over MPI: seconds to sum a bucket of f32 over the ranks (host memory,
//! Open MPI's transport: shared memory on one machine), for the buckets of ResNet-18 at widths
//! 0.25 and 1, and of ResNet-50 with SimCLR's head. Feeds the scaling model in BENCHMARKS.md.
//!
//! Run: `cargo bench --profile dev --features mpi --bench allreduce --no-run`, then
//! `mpirun -np 2 target/debug/deps/allreduce-*` (the binary cargo printed).

use std::time::Instant;

use selfsup::dist;

fn main() {
    let _mpi = dist::mpi::init().expect("MPI (launch with mpirun)");
    let world = dist::world();
    let buckets = [
        ("ResNet-18 w0.25 + SimCLR head", 830_000usize),
        ("ResNet-18 + SimCLR head", 11_500_000),
        ("ResNet-50 + SimCLR head (2048-2048-128)", 28_200_000),
    ];
    for (name, n) in buckets {
        let mut data = vec![1f32; n];
        world.all_reduce_sum(&mut data); // warm-up
        let reps = 5;
        let started = Instant::now();
        for _ in 0..reps {
            world.all_reduce_sum(&mut data);
        }
        let seconds = started.elapsed().as_secs_f64() / reps as f64;
        if world.rank() == 0 {
            println!(
                "{{\"bucket\":\"{name}\",\"floats\":{n},\"ranks\":{},\"seconds\":{seconds:.4},\"GB_per_s\":{:.2}}}",
                world.size(),
                4.0 * n as f64 / seconds / 1e9
            );
        }
    }
}

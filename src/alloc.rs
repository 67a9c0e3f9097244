//! The allocator of selfsup's binaries: mimalloc, keeping the memory that training frees.
//!
//! Every op of a training step allocates its output, and many are megabytes. glibc's malloc maps
//! such blocks fresh from the OS and unmaps them on free, so each step pays page faults, page
//! clearing and TLB shootdowns again: a quarter of the CPU time on 2 cores (BENCHMARKS.md,
//! "Training throughput"). mimalloc reuses freed blocks; with purging off it never hands them
//! back, so the process stays at its peak memory, which training reaches in its first step anyway.
//!
//! A binary opts in with
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: selfsup::alloc::MiMalloc = selfsup::alloc::MiMalloc;
//! ```
//! and calls [`keep_freed_memory`] first thing in `main`.

pub use mimalloc::MiMalloc;

/// `mi_option_purge_delay` of mimalloc's `mi_option_e` (v3 and v2 alike; libmimalloc-sys names
/// no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to return freed memory to the OS (`MIMALLOC_PURGE_DELAY=-1`); an
/// environment variable of that name still overrides it.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option of the allocator; valid at any time.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

//! selfsup: self-supervised visual representation learning in one binary.
//!
//! Data flows one way: [`data`] decodes images into memory, [`augment`] draws the views each
//! method asks for, a method of [`methods`] turns them into a loss over a backbone of
//! [`models`], and [`train`] runs the optimisation, checkpoints and metrics. [`eval`] measures
//! the frozen backbone (kNN, linear probe), [`viz`] draws what is worth looking at, and
//! [`pretrain`] ties a recipe ([`config`]) to all of them. [`run`] reads and writes run folders,
//! [`weights`] moves encoders in and out of PyTorch.

pub mod alloc;
pub mod augment;
pub mod bf16;
pub mod config;
pub mod data;
pub mod device_check;
pub mod dist;
pub mod eval;
pub mod kernels;
pub mod losses;
pub mod methods;
pub mod models;
pub mod precision;
pub mod pretrain;
pub mod run;
pub mod train;
pub mod viz;
pub mod weights;

/// The log filter of the `selfsup` binary when `RUST_LOG` is unset: selfsup's own progress at
/// `info`, every other crate at `warn`. (At `info`, the CUDA backend's compiler, `pliron`, logs
/// each kernel's IR after every pass: gigabytes of stderr in a GPU run's first minutes.)
pub const DEFAULT_LOG_FILTER: &str = "warn,selfsup=info";

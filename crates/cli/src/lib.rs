//! The savae application: configuration, training steps, the training loop, checkpoints,
//! evaluation, gradient checks and benchmarks. `main.rs` is a thin CLI over this.

pub mod config;
pub mod step;
pub mod adam;
pub mod batch;
pub mod checkpoint;
pub mod device;
pub mod eval;
pub mod train;
pub mod bench;
pub mod gradcheck;
pub mod report;

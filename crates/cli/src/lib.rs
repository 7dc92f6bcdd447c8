//! The savae application: configuration, training steps, the training loop, checkpoints,
//! evaluation, sentence generation, gradient checks and benchmarks. `main.rs` is a thin CLI over this.

pub mod adam;
pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod eval;
pub mod gradcheck;
pub mod report;
pub mod sample;
pub mod step;
pub mod train;

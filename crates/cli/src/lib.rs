//! The savae application: configuration, training steps, the training loop, checkpoints,
//! evaluation, gradient checks and benchmarks. `main.rs` is a thin CLI over this.

pub mod config;
pub mod step;

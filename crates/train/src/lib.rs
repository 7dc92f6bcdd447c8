//! Training semi-amortized VAEs from Rust: the library under the `savae` command line.
//!
//! - [`options`] and [`config`]: every setting of a run, typed and declared once
//!   ([`TrainConfig`], [`TrainOverrides`]), checked in terms of values ([`SettingError`]);
//! - [`step`]: one training step of each mode — the loss at λ0 or at the refined λ*, and
//!   its gradient, with the SA-VAE gradient chosen as a value ([`SavaeGradient`]: implicit
//!   or unrolled);
//! - [`adam`], [`batch`], [`checkpoint`]: the optimizer, device batches and noise, and the
//!   safetensors checkpoint format;
//! - [`eval`]: ELBOs, KL, importance-sampled NLL, perplexity and mutual information;
//!   [`partial`]: an evaluation's running totals on disk, so that a killed one continues;
//! - [`trainer`]: the loop as a value ([`Trainer`]) with its position ([`TrainState`]) and
//!   an [`Observer`] for steps, epochs and stop requests.
//!
//! - [`threads`]: one pool of CPU threads for the process ([`configure_cpu_threads`]).
//!
//! `examples/train_from_rust.rs` trains, resumes and evaluates a tiny SA-VAE through this
//! API. Second-order autodiff needs `savae_implicit::enable_second_order()` called first
//! (before any backward pass of the thread).

pub mod adam;
pub mod batch;
pub mod checkpoint;
pub mod config;
pub mod eval;
pub mod options;
pub mod partial;
pub mod step;
pub mod threads;
pub mod trainer;

pub use config::{SettingsFile, TrainConfig, TrainOverrides, SETTINGS};
pub use eval::{
    evaluate, evaluate_checkpoint, EvalOptions, EvalReport, EvalRequest, Subset, SubsetOrder,
};
pub use options::SettingError;
pub use partial::EvalProgressFile;
pub use step::{ImplicitGradient, Mode, SavaeGradient, StepConfig, StepOutput};
pub use threads::configure_cpu_threads;
pub use trainer::{Observer, RunOptions, Silent, TrainState, TrainSummary, Trainer};

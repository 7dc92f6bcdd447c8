//! Train a tiny MNIST SA-VAE with the implicit gradient, resume it, and evaluate it,
//! through the `savae-train` API alone.
//!
//!     cargo run --release -p savae-train --example train_from_rust
//!
//! `cargo test` runs the same function as a test (the example is built with `test = true`).

use anyhow::Result;
use savae_train::options::{GradientKind, ModelKind};
use savae_train::{evaluate_checkpoint, EvalRequest, RunOptions, Silent, Subset, TrainConfig};
use savae_train::{TrainOverrides, Trainer};
use std::path::PathBuf;

fn train_resume_evaluate(run_dir: PathBuf) -> Result<f64> {
    savae_implicit::enable_second_order();
    let data_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"));
    let cfg = TrainConfig {
        model: ModelKind::Savae,
        grad: GradientKind::Implicit,
        epochs: 1,
        batch_size: 50,
        hidden: vec![32],
        latent_dim: 4,
        svi_steps: 3,
        max_train_examples: Some(200),
        valid_examples: Some(100),
        ..TrainConfig::defaults_for("mnist")
    };
    let opts = RunOptions::new(run_dir.clone(), data_dir.clone(), candle_core::Device::Cpu);
    let first = Trainer::create(cfg, opts.clone(), true)?.run(&mut Silent)?;
    // Resume from last.safetensors for a second epoch.
    let more = TrainOverrides {
        epochs: Some(2),
        ..TrainOverrides::default()
    };
    let second = Trainer::resume(opts, &[&more])?.run(&mut Silent)?;
    assert_eq!((first.epochs_done, second.epochs_done), (1, 2));
    let req = EvalRequest {
        checkpoint: run_dir.join("best.safetensors"),
        split: savae_data::Split::Test,
        iw_samples: 10,
        svi_steps: None,
        svi_optimizer: None,
        prox: None,
        subset: Subset::Random {
            examples: 100,
            seed: 1,
        },
        elbo_samples: 2,
        refine_samples: None,
        batch_size: None,
        seed: 1,
        data_dir,
        passes: savae_train::options::Passes::Analytic,
        progress_file: None,
    };
    let e = evaluate_checkpoint(&req, &candle_core::Device::Cpu, &mut |_| {})?;
    println!("{}", e.json);
    Ok(e.report.nll_iw.unwrap_or(f64::NAN))
}

fn main() -> Result<()> {
    // One pool of CPU threads (before any thread starts: it sets environment variables).
    savae_train::configure_cpu_threads();
    train_resume_evaluate(std::env::temp_dir().join("savae-example-run"))?;
    Ok(())
}

#[test]
fn the_example_trains_resumes_and_evaluates() {
    let dir = std::env::temp_dir().join(format!("savae-example-{}", std::process::id()));
    let nll = train_resume_evaluate(dir.clone()).unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{nll}");
    let _ = std::fs::remove_dir_all(&dir);
}

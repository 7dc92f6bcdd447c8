//! The training loop: epochs of shuffled mini-batches, a step of the configured mode,
//! Adam, validation each epoch, `last.safetensors` / `best.safetensors`, and one JSON
//! line per logged step and per epoch in `RUN_DIR/metrics.jsonl`.
//!
//! Exact resume: every random draw is a function of (seed, epoch, batch) and the
//! checkpoint holds the weights, Adam's state and the position, so a resumed run
//! computes the same numbers as an uninterrupted one (bit-identical on CPU).

use crate::adam::{clip_global_norm, Adam};
use crate::batch;
use crate::batch::{Corpus, Dropout, SplitData};
use crate::checkpoint::{self, CheckpointMeta, RngState, FORMAT_VERSION};
use crate::config::{TrainConfig, TrainOverrides};
use crate::eval::{evaluate, EvalOptions};
use crate::step::{train_step_outer, EncoderLoss, Mode, StepConfig};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use savae_data::{batch_rng, epoch_order};
use savae_implicit::{CgConfig, HvpKind};
use savae_inference::{SviConfig, SviOptimizer};
use savae_model::{Batch, ModelConfig, Vae};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// How to run `savae train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub overrides: TrainOverrides,
    pub config_file: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub resume: bool,
    pub overwrite: bool,
    pub device: Device,
    pub data_dir: PathBuf,
    pub progress: bool,
    /// Consecutive non-finite batches tolerated before the run stops.
    pub max_bad_batches: usize,
}

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub epochs_done: usize,
    pub steps: u64,
    pub last_valid_elbo: Option<f64>,
    pub best_valid_elbo: Option<f64>,
    pub seconds: f64,
    pub skipped_batches: usize,
    /// Stopped by Ctrl-C / SIGTERM after saving its position.
    pub interrupted: bool,
}

/// Signals received (Ctrl-C / SIGTERM). The first asks the loop to save and stop after the
/// current step; the second exits at once.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// Installs the Ctrl-C / SIGTERM handler (once per process).
pub fn install_signal_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
                eprintln!("\nsavae: second interrupt: exiting now (the last checkpoint on disk is intact)");
                std::process::exit(130);
            }
            eprintln!("\nsavae: interrupt: finishing this step, then saving (press Ctrl-C again to exit at once)");
        });
    });
}

fn interrupted() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

/// The settings a resumed run may change; any other difference is refused.
const RESUMABLE_CHANGES: &[&str] = &["epochs", "log_every", "valid_examples"];

fn config_diff(a: &TrainConfig, b: &TrainConfig) -> Vec<String> {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let mut out = Vec::new();
    if let (Some(ma), Some(mb)) = (va.as_object(), vb.as_object()) {
        for (k, x) in ma {
            let y = mb.get(k).cloned().unwrap_or_default();
            if *x != y && !RESUMABLE_CHANGES.contains(&k.as_str()) {
                out.push(format!("{k}: checkpoint has {x}, command line gives {y}"));
            }
        }
    }
    out
}

/// The step settings of a config at a given KL weight.
pub fn step_config(cfg: &TrainConfig, beta: f64) -> Result<StepConfig> {
    Ok(StepConfig {
        mode: Mode::from_names(&cfg.model, &cfg.grad)?,
        beta,
        svi: svi_config(cfg)?,
        cg: CgConfig {
            max_iters: cfg.cg_iters,
            tol: cfg.cg_tol,
        },
        damping: cfg.cg_damping,
        hvp: HvpKind::parse(&cfg.hvp)?,
        cg_retries: cfg.cg_retries,
        stationarity_tol: cfg.stationarity_tol,
        encoder_loss: EncoderLoss::parse(&cfg.encoder_loss)?,
    })
}

pub fn svi_config(cfg: &TrainConfig) -> Result<SviConfig> {
    Ok(SviConfig {
        steps: cfg.svi_steps,
        optimizer: SviOptimizer::parse(&cfg.svi_optimizer, cfg.svi_lr)?,
        prox: cfg.prox,
        tol: cfg.svi_tol,
        batch_size: cfg.batch_size,
    })
}

struct Metrics(std::fs::File);

impl Metrics {
    fn open(path: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self(f))
    }
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.0, "{v}").context("cannot append to metrics.jsonl")?;
        self.0.flush()?;
        Ok(())
    }
}

/// Resolves the configuration of a new or resumed run and checks the run directory.
fn resolve_config(opts: &TrainOptions) -> Result<(TrainConfig, Option<checkpoint::Checkpoint>)> {
    let last = opts.run_dir.join("last.safetensors");
    let file = match &opts.config_file {
        Some(f) => Some(TrainOverrides::from_toml_file(f)?),
        None => None,
    };
    // The defaults depend on the data set (image MLP or text LSTM).
    let dataset = opts
        .overrides
        .dataset
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.dataset.clone()))
        .unwrap_or_else(|| "mnist".into());
    let mut requested = TrainConfig::defaults_for(&dataset);
    if let Some(f) = &file {
        f.apply(&mut requested);
    }
    opts.overrides.apply(&mut requested);
    if opts.resume {
        let ck = checkpoint::load(&last).with_context(|| {
            format!(
                "--resume {}: no loadable last.safetensors there",
                opts.run_dir.display()
            )
        })?;
        let mut cfg = ck.meta.config.clone();
        if let Some(f) = &opts.config_file {
            TrainOverrides::from_toml_file(f)?.apply(&mut cfg);
        }
        opts.overrides.apply(&mut cfg);
        let diff = config_diff(&ck.meta.config, &cfg);
        if !diff.is_empty() {
            bail!(
                "--resume {}: the command line contradicts the checkpoint:\n  {}\n(only --epochs, \
                 --log-every and --valid-examples may change on resume)",
                opts.run_dir.display(),
                diff.join("\n  ")
            );
        }
        cfg.validate()?;
        return Ok((cfg, Some(ck)));
    }
    requested.validate()?;
    let taken = last.exists() || opts.run_dir.join("metrics.jsonl").exists();
    if taken && !opts.overwrite {
        bail!(
            "--run-dir {} already holds a run: pass --resume to continue it or --overwrite to \
             replace it",
            opts.run_dir.display()
        );
    }
    if taken {
        for f in ["last.safetensors", "best.safetensors", "metrics.jsonl"] {
            let _ = std::fs::remove_file(opts.run_dir.join(f));
        }
    }
    Ok((requested, None))
}

/// Loads the `--init-from` checkpoint and checks that it was trained on the same data.
fn load_init(path: &Path, cfg: &TrainConfig) -> Result<(PathBuf, checkpoint::Checkpoint)> {
    let ck = checkpoint::load(path)
        .with_context(|| format!("--init-from {}: not a loadable checkpoint", path.display()))?;
    if ck.meta.dataset != cfg.dataset {
        bail!(
            "--init-from {}: it was trained on --dataset {}, this run is on --dataset {}",
            path.display(),
            ck.meta.dataset,
            cfg.dataset
        );
    }
    Ok((path.to_path_buf(), ck))
}

/// The architecture settings in which two models differ ("latent 3 there, 4 here").
fn architecture_diff(there: &ModelConfig, here: &ModelConfig) -> Vec<String> {
    let fields = [
        (
            "latent",
            there.latent_dim.to_string(),
            here.latent_dim.to_string(),
        ),
        (
            "hidden",
            format!("{:?}", there.hidden),
            format!("{:?}", here.hidden),
        ),
        (
            "activation",
            there.activation.clone(),
            here.activation.clone(),
        ),
        (
            "input",
            there.input_dim.to_string(),
            here.input_dim.to_string(),
        ),
        (
            "vocabulary",
            there.vocab_size.to_string(),
            here.vocab_size.to_string(),
        ),
        (
            "embedding",
            there.embed_dim.to_string(),
            here.embed_dim.to_string(),
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, a, b)| format!("{name} {a} there, {b} here"))
        .collect()
}

fn train_subset(data: &SplitData, cfg: &TrainConfig) -> SplitData {
    match cfg.max_train_examples {
        Some(n) if n < data.len() => {
            let order = epoch_order(cfg.seed, u64::MAX, data.len());
            data.select(&order[..n])
        }
        _ => data.clone(),
    }
}

/// Trains as configured; returns the summary. Writes into `opts.run_dir`.
pub fn train(opts: &TrainOptions) -> Result<TrainSummary> {
    let (cfg, resume_from) = resolve_config(opts)?;
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("cannot create --run-dir {}", opts.run_dir.display()))?;
    // Temporary files of checkpoint writes that a killed process left behind.
    if let Ok(entries) = std::fs::read_dir(&opts.run_dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.contains(".safetensors.tmp.") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mode = Mode::from_names(&cfg.model, &cfg.grad)?;
    if mode == Mode::SavaeImplicit && cfg.prox == 0.0 {
        eprintln!(
            "savae: --prox 0: the refined optimum does not depend on the encoder's λ0, so the \
             implicit gradient gives the encoder nothing; it trains on its own ELBO at λ0 instead"
        );
    }
    if matches!(mode, Mode::SavaeImplicit | Mode::SavaeUnrolled) {
        savae_implicit::ensure_second_order()?;
    }
    let last_path = opts.run_dir.join("last.safetensors");
    // A new run may start from another run's weights (--init-from); a resumed one has its own.
    let init_from = match (&resume_from, &cfg.init_from) {
        (None, Some(p)) => Some(load_init(Path::new(p), &cfg)?),
        _ => None,
    };
    let stored_vocab = match (&resume_from, &init_from) {
        (Some(ck), _) => ck.vocab(&last_path)?,
        (None, Some((p, ck))) => ck.vocab(p)?,
        (None, None) => None,
    };
    let data = Corpus::load(
        &cfg.dataset,
        &opts.data_dir,
        stored_vocab,
        cfg.max_vocab,
        cfg.max_len,
        true,
    )?;
    let train_split = train_subset(&data.train, &cfg);
    let valid = match cfg.valid_examples {
        Some(n) => data.valid.truncate(n),
        None => data.valid.clone(),
    };
    let device = &opts.device;
    let dtype = cfg.dtype();
    let vocab_size = data.vocab_size();
    let model_config = cfg.model_config(vocab_size);
    let model = Vae::new(&model_config, cfg.seed, dtype, device)?;
    if let Some((p, ck)) = &init_from {
        let diff = architecture_diff(&ck.meta.model, &model_config);
        if !diff.is_empty() {
            bail!(
                "--init-from {}: its architecture differs from the configured one: {}; pass the \
                 same architecture flags",
                p.display(),
                diff.join(", ")
            );
        }
        ck.load_into(&model, p)
            .with_context(|| format!("--init-from {}", p.display()))?;
        eprintln!(
            "savae: starting from the weights of {} ({} after {} epochs)",
            p.display(),
            ck.meta.model.kind,
            ck.meta.epoch
        );
    }
    let vocab_words = data.vocab.as_ref().map(|v| v.words().to_vec());
    let dropout = (vocab_size > 0 && cfg.dropout > 0.0).then(|| Dropout {
        p: cfg.dropout,
        embed: cfg.embed_dim,
        hidden: cfg.hidden[0],
    });
    let vars = model.params.vars();
    let mut adam = Adam::new(&vars, cfg.lr)?;
    let best_path = opts.run_dir.join("best.safetensors");
    let (mut epoch, mut step, mut best, mut last_valid) = (0usize, 0u64, None::<f64>, None::<f64>);
    let (mut start_batch, mut carried_loss, mut carried_n) = (0usize, 0.0f64, 0usize);
    let mut skipped = 0usize;
    if let Some(ck) = &resume_from {
        ck.load_into(&model, &last_path)?;
        ck.load_adam(&mut adam, &model, &last_path)?;
        epoch = ck.meta.epoch;
        step = ck.meta.step;
        best = ck.meta.best_valid_elbo;
        last_valid = ck.meta.valid_elbo;
        start_batch = ck.meta.rng.batch;
        carried_loss = ck.meta.epoch_loss_sum;
        carried_n = ck.meta.epoch_examples;
        skipped = ck.meta.skipped_batches;
        eprintln!(
            "savae: resuming {} at epoch {}, batch {start_batch} (step {step})",
            opts.run_dir.display(),
            epoch + 1
        );
    }
    let mut metrics = Metrics::open(&opts.run_dir.join("metrics.jsonl"))?;
    let t0 = Instant::now();
    let nb = train_split.epoch_batches(cfg.batch_size, cfg.seed, 0).len();
    let d = cfg.latent_dim;
    let mut bad_run = 0usize;
    let fresh_outer = cfg.outer_noise == "fresh" && mode.refines();
    // Testing hook: SAVAE_INJECT_NAN_FROM_STEP=N makes every loss from step N on NaN.
    let inject_nan_from: Option<u64> = std::env::var("SAVAE_INJECT_NAN_FROM_STEP")
        .ok()
        .and_then(|v| v.parse().ok());
    let meta = |epoch: usize,
                batch: usize,
                step: u64,
                adam_t: u64,
                valid: Option<f64>,
                best: Option<f64>| CheckpointMeta {
        format_version: FORMAT_VERSION,
        dataset: cfg.dataset.clone(),
        model: model_config.clone(),
        epoch,
        step,
        rng: RngState {
            seed: cfg.seed,
            epoch,
            batch,
            scheme: "chacha8(splitmix(seed, stream, epoch, batch))".into(),
        },
        adam_t,
        config: cfg.clone(),
        valid_elbo: valid,
        best_valid_elbo: best,
        epoch_loss_sum: 0.0,
        epoch_examples: 0,
        skipped_batches: 0,
        savae_version: env!("CARGO_PKG_VERSION").into(),
        vocab: vocab_words.clone(),
    };
    // The summary at the current state of the loop.
    macro_rules! summary {
        ($interrupted:expr) => {
            TrainSummary {
                run_dir: opts.run_dir.clone(),
                epochs_done: epoch,
                steps: step,
                last_valid_elbo: last_valid,
                best_valid_elbo: best,
                seconds: t0.elapsed().as_secs_f64(),
                skipped_batches: skipped,
                interrupted: $interrupted,
            }
        };
    }
    while epoch < cfg.epochs {
        if interrupted()
            && start_batch == 0
            && last_path.exists()
            && (epoch > 0 || resume_from.is_some())
        {
            eprintln!(
                "savae: interrupted after epoch {epoch}: {} holds it; continue with: savae train --run-dir {} --resume",
                last_path.display(),
                opts.run_dir.display()
            );
            return Ok(summary!(true));
        }
        let beta = cfg.beta(epoch);
        let scfg = step_config(&cfg, beta)?;
        let batches = train_split.epoch_batches(cfg.batch_size, cfg.seed, epoch as u64);
        let pb = if opts.progress {
            ProgressBar::new(nb as u64)
        } else {
            ProgressBar::hidden()
        };
        pb.set_style(ProgressStyle::with_template(&format!(
            "epoch {}/{} {{bar:25}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
            epoch + 1,
            cfg.epochs
        ))?);
        let te = Instant::now();
        let (mut sum_loss, mut sum_n) = (carried_loss, carried_n);
        // Per-epoch totals of the numerical-fault counters.
        let (mut n_resets, mut n_negcurv, mut n_nonfinite, mut n_retried, mut n_fallbacks) =
            (0usize, 0usize, 0usize, 0usize, 0usize);
        let mut n_not_stationary = 0usize;
        (carried_loss, carried_n) = (0.0, 0);
        pb.set_position(start_batch as u64);
        for (bi, idx) in batches.iter().enumerate().skip(start_batch) {
            if bi > start_batch && interrupted() {
                pb.finish_and_clear();
                let mut m = meta(epoch, bi, step, adam.t, last_valid, best);
                m.epoch_loss_sum = sum_loss;
                m.epoch_examples = sum_n;
                m.skipped_batches = skipped;
                checkpoint::save(&last_path, &model, Some(&adam), &m)?;
                metrics.write(
                    json!({"kind": "interrupt", "epoch": epoch + 1, "batch": bi, "step": step}),
                )?;
                eprintln!(
                    "savae: interrupted at epoch {}, batch {bi}: saved {}; continue with: savae train --run-dir {} --resume",
                    epoch + 1,
                    last_path.display(),
                    opts.run_dir.display()
                );
                return Ok(summary!(true));
            }
            let mut rng = batch_rng(cfg.seed, 0, epoch as u64, bi as u64);
            // Dropout masks (text) are drawn with the batch and held fixed for the step.
            let x = train_split.batch(idx, &mut rng, dtype, device, dropout)?;
            let eps = batch::noise(&mut rng, cfg.samples, idx.len(), d, dtype, device)?;
            let outer = if fresh_outer {
                Some(batch::noise(
                    &mut rng,
                    cfg.samples,
                    idx.len(),
                    d,
                    dtype,
                    device,
                )?)
            } else {
                None
            };
            let ts = Instant::now();
            let mut out = train_step_outer(&model, &x, &eps, outer.as_ref(), &scfg)?;
            if inject_nan_from.is_some_and(|n| step >= n) {
                out.loss = f64::NAN; // fault injection for the reliability tests
            }
            let gnorm = clip_global_norm(&mut out.grads, cfg.max_grad_norm)?;
            if !out.loss.is_finite() || !gnorm.is_finite() {
                skipped += 1;
                bad_run += 1;
                pb.suspend(|| {
                    eprintln!("savae: warning: epoch {} batch {bi}: non-finite loss or gradient, batch skipped", epoch + 1)
                });
                metrics.write(json!({"kind": "skip", "epoch": epoch + 1, "batch": bi, "step": step, "loss": out.loss.to_string(), "grad_norm": gnorm.to_string(), "consecutive": bad_run}))?;
                if bad_run > opts.max_bad_batches {
                    bail!(
                        "training stopped: {bad_run} consecutive batches had a non-finite loss or gradient \
                         (NaN/inf); the last good checkpoint {} is intact — try a smaller --lr or --svi-lr",
                        last_path.display()
                    );
                }
                continue;
            }
            bad_run = 0;
            if let Some(sv) = &out.svi {
                n_resets += sv.resets;
            }
            if let Some(c) = &out.cg {
                n_negcurv += c.negative_curvature;
                n_nonfinite += c.non_finite;
                n_retried += c.retried;
                n_fallbacks += c.fallbacks;
                n_not_stationary += c.not_stationary;
            }
            adam.step(&vars, &out.grads)?;
            step += 1;
            sum_loss += out.loss * idx.len() as f64;
            sum_n += idx.len();
            let secs = ts.elapsed().as_secs_f64();
            let ex_s = idx.len() as f64 / secs.max(1e-9);
            let tok_s = match &x {
                Batch::Text(t) => Some((t.len() * t.steps()) as f64 / secs.max(1e-9)),
                Batch::Images(_) => None,
            };
            let mut msg = match tok_s {
                Some(ts) => format!("loss {:.2} kl {:.2} {:.0} tok/s", out.loss, out.kl, ts),
                None => format!("loss {:.2} kl {:.2} {:.0} ex/s", out.loss, out.kl, ex_s),
            };
            if let Some(c) = &out.cg {
                msg.push_str(&format!(
                    " cg {:.1}it fail {}",
                    c.iters_mean,
                    c.negative_curvature + c.non_finite
                ));
            }
            pb.set_message(msg);
            pb.inc(1);
            if step % cfg.log_every as u64 == 0 || bi + 1 == nb {
                metrics.write(json!({
                    "kind": "step", "epoch": epoch + 1, "batch": bi + 1, "step": step,
                    "loss": out.loss, "elbo_amortized": out.elbo_amortized, "elbo_refined": out.elbo_refined,
                    "kl": out.kl, "beta": beta, "grad_norm": gnorm, "examples_per_s": ex_s, "tokens_per_s": tok_s,
                    "step_seconds": secs, "svi": out.svi, "cg": out.cg,
                }))?;
            }
        }
        pb.finish_and_clear();
        start_batch = 0;
        epoch += 1;
        let eopts = EvalOptions {
            svi: svi_config(&cfg)?,
            refine: mode.refines(),
            iw_samples: 0,
            elbo_samples: 1,
            refine_samples: cfg.samples,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            progress: false,
        };
        let v = evaluate(&model, &valid, "valid", &eopts, device)?;
        let vel = if mode.refines() {
            v.elbo_refined
        } else {
            v.elbo_amortized
        };
        last_valid = Some(vel);
        let improved = best.is_none_or(|b| vel > b);
        if improved {
            best = Some(vel);
        }
        let mut m = meta(epoch, 0, step, adam.t, last_valid, best);
        m.skipped_batches = skipped;
        checkpoint::save(&last_path, &model, Some(&adam), &m)?;
        if improved {
            checkpoint::save(&best_path, &model, Some(&adam), &m)?;
        }
        let train_elbo = -sum_loss / sum_n.max(1) as f64;
        metrics.write(json!({
            "kind": "epoch", "epoch": epoch, "step": step, "beta": beta, "train_elbo": train_elbo,
            "valid_elbo_amortized": v.elbo_amortized, "valid_elbo_refined": v.elbo_refined,
            "valid_kl": v.kl_refined, "valid_active_units": v.active_units,
            "valid_ppl_bound": v.ppl_bound, "valid_mutual_info": v.mutual_info,
            "epoch_seconds": te.elapsed().as_secs_f64(), "skipped_batches": skipped, "best": improved,
            "svi_resets": n_resets, "cg_negative_curvature": n_negcurv, "cg_non_finite": n_nonfinite,
            "cg_retried": n_retried, "cg_fallbacks": n_fallbacks, "not_stationary": n_not_stationary,
        }))?;
        if opts.progress {
            let ppl = v
                .ppl_bound
                .map(|p| format!(", ppl ≤ {p:.1}"))
                .unwrap_or_default();
            eprintln!(
                "epoch {epoch}/{}: train elbo {train_elbo:.2}, valid elbo {vel:.2} (amortized {:.2}){ppl}, kl {:.2}, {:.0}s{}",
                cfg.epochs,
                v.elbo_amortized,
                v.kl_refined,
                te.elapsed().as_secs_f64(),
                if improved { " *best" } else { "" }
            );
        }
    }
    Ok(summary!(false))
}

//! `savae train`: the settings from defaults ← `--config` TOML ← flags, then the library's
//! [`Trainer`] with the command line's observer: progress bars, one JSON line per logged
//! step, skip, interrupt and epoch in `RUN_DIR/metrics.jsonl`, the epoch lines on stderr,
//! Ctrl-C / SIGTERM as a stop request, and the tests' fault-injection hook.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use savae_train::step::StepOutput;
use savae_train::trainer::{
    EpochRecord, RunFolderTaken, RunStart, SkipRecord, StepRecord, StopRecord,
};
use savae_train::{
    Observer, RunOptions, SettingsFile, TrainConfig, TrainOverrides, TrainSummary, Trainer,
};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The flags of `savae train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// TOML file of settings: the names of the flags with underscores (run_dir too);
    /// flags given as well override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Output folder: checkpoints and metrics.jsonl [default: checkpoints/run].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in --run-dir from its last.safetensors.
    #[arg(long)]
    pub resume: bool,
    /// Replace a run already in --run-dir.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    #[command(flatten)]
    pub machine: crate::flags::Machine,
    /// Stop after this many consecutive non-finite batches.
    #[arg(long, default_value_t = 10)]
    pub max_bad_batches: usize,
    /// Also save last.safetensors mid-epoch every this many minutes, so that a killed
    /// process (a preempted job, a closed terminal) loses at most that much; 0 saves
    /// after every batch. Epoch ends and Ctrl-C save regardless.
    #[arg(long, default_value = "10", value_name = "MINUTES", value_parser = crate::flags::minutes)]
    pub save_every: std::time::Duration,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub overrides: TrainOverrides,
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

/// The requested settings of a new run: the data set's defaults, the file, the flags.
fn requested_config(a: &TrainArgs, file: Option<&TrainOverrides>) -> TrainConfig {
    let dataset = a
        .overrides
        .dataset
        .clone()
        .or_else(|| file.and_then(|f| f.dataset.clone()))
        .unwrap_or_else(|| "mnist".into());
    let mut cfg = TrainConfig::defaults_for(&dataset);
    if let Some(f) = file {
        f.apply(&mut cfg);
    }
    a.overrides.apply(&mut cfg);
    cfg
}

/// Runs `savae train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let file = a.config.as_deref().map(SettingsFile::read).transpose()?;
    let run_dir = a
        .run_dir
        .clone()
        .or_else(|| file.as_ref().and_then(|f| f.run_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("checkpoints/run"));
    let file = file.map(|f| f.settings);
    let opts = RunOptions {
        run_dir: run_dir.clone(),
        data_dir: a.machine.data_dir(),
        device: a.machine.device()?,
        max_bad_batches: a.max_bad_batches,
        save_every: Some(a.save_every),
    };
    let dir = run_dir.display().to_string();
    let mut trainer = if a.resume {
        let changes: Vec<&TrainOverrides> = file.iter().chain([&a.overrides]).collect();
        Trainer::resume(opts, &changes).with_context(|| format!("--resume --run-dir {dir}"))?
    } else {
        Trainer::create(requested_config(&a, file.as_ref()), opts, a.overwrite).map_err(
            |e| match e.downcast_ref::<RunFolderTaken>() {
                Some(_) => anyhow::anyhow!(
                    "--run-dir {dir} already holds a run: pass --resume to continue it or \
                     --overwrite to replace it"
                ),
                None => e,
            },
        )?
    };
    install_signal_handler();
    let mut obs = CliObserver::new(&run_dir, !a.quiet)?;
    let s: TrainSummary = trainer.run(&mut obs)?;
    println!("{}", serde_json::to_string(&s)?);
    if s.interrupted {
        std::process::exit(130);
    }
    if let (true, Some(best), Some(p)) = (s.early_stopped, s.best_epoch, trainer.config().patience)
    {
        eprintln!(
            "savae: stopped early after epoch {}: the validation ELBO has not improved for {p} \
             epochs (best at epoch {best})",
            s.epochs_done
        );
    }
    let prog = crate::flags::program();
    let cost = if trainer.config().is_text() {
        "the whole test split with 500 importance samples takes about half an hour on 2 CPU \
         cores for PTB"
    } else {
        "the whole test split with 500 importance samples takes about 2–3 minutes on 2 CPU cores"
    };
    eprintln!(
        "savae: done — checkpoints in {0}/last.safetensors and {0}/best.safetensors, metrics in \
         {0}/metrics.jsonl\nsavae: a first look (a random 1000 test examples, 100 importance \
         samples): {prog} eval --checkpoint {0}/best.safetensors --max-examples 1000 \
         --iw-samples 100\nsavae: the number to report ({cost}): {prog} eval --checkpoint \
         {0}/best.safetensors",
        s.run_dir.display()
    );
    Ok(())
}

/// Appends JSON lines to `metrics.jsonl`.
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

/// The command line's view of a run.
struct CliObserver {
    metrics: Metrics,
    run_dir: PathBuf,
    progress: bool,
    bar: ProgressBar,
    epochs: usize,
    batches: usize,
    /// Testing hook: `SAVAE_INJECT_NAN_FROM_STEP=N` makes every loss from step N on NaN.
    inject_nan_from: Option<u64>,
    /// Heap live when the current step's window began (the end of the previous step).
    heap_base: usize,
    /// The largest step heap of the epoch so far (bytes above its base).
    epoch_heap_peak: usize,
}

const MIB: f64 = 1024.0 * 1024.0;

impl CliObserver {
    fn new(run_dir: &Path, progress: bool) -> Result<Self> {
        Ok(Self {
            metrics: Metrics::open(&run_dir.join("metrics.jsonl"))?,
            run_dir: run_dir.to_path_buf(),
            progress,
            bar: ProgressBar::hidden(),
            epochs: 0,
            batches: 0,
            inject_nan_from: std::env::var("SAVAE_INJECT_NAN_FROM_STEP")
                .ok()
                .and_then(|v| v.parse().ok()),
            heap_base: 0,
            epoch_heap_peak: 0,
        })
    }

    /// The heap the step just done needed above what was live before it (its batch, the
    /// step and the update; bytes), and a new window for the next step.
    fn step_heap(&mut self) -> usize {
        let used = crate::heap::peak_bytes().saturating_sub(self.heap_base);
        self.heap_base = crate::heap::reset_peak();
        self.epoch_heap_peak = self.epoch_heap_peak.max(used);
        used
    }
}

impl Observer for CliObserver {
    fn on_start(&mut self, start: &RunStart) -> Result<()> {
        self.epochs = start.config.epochs;
        self.batches = start.batches_per_epoch;
        for note in start.notes {
            eprintln!("savae: {note}");
        }
        let s = start.skipped;
        if s.empty_lines > 0 || s.too_long > 0 {
            eprintln!(
                "savae: {}: skipped {} empty lines and {} train sentences over --max-len {} words",
                start.config.dataset, s.empty_lines, s.too_long, start.config.max_len
            );
        }
        if start.resumed {
            // Steps an earlier process logged after this checkpoint (it was killed between
            // saves) are taken again; readers drop them (see report::current_records).
            let st = start.state;
            self.metrics.write(
                json!({"kind": "resume", "epoch": st.epoch + 1, "batch": st.batch, "step": st.step}),
            )?;
            eprintln!(
                "savae: resuming {} at epoch {}, batch {} (step {})",
                self.run_dir.display(),
                start.state.epoch + 1,
                start.state.batch,
                start.state.step
            );
        }
        Ok(())
    }

    fn on_epoch_start(&mut self, epoch: usize, start_batch: usize) -> Result<()> {
        self.bar = if self.progress {
            ProgressBar::new(self.batches as u64)
        } else {
            ProgressBar::hidden()
        };
        self.bar.set_style(ProgressStyle::with_template(&format!(
            "epoch {}/{} {{bar:25}} {{pos}}/{{len}} [{{elapsed_precise}}<{{eta_precise}}] {{msg}}",
            epoch + 1,
            self.epochs
        ))?);
        self.bar.set_position(start_batch as u64);
        self.heap_base = crate::heap::reset_peak();
        self.epoch_heap_peak = 0;
        Ok(())
    }

    fn inspect_step(&mut self, step: u64, out: &mut StepOutput) {
        if self.inject_nan_from.is_some_and(|n| step >= n) {
            out.loss = f64::NAN; // fault injection for the reliability tests
        }
    }

    fn on_step(&mut self, r: &StepRecord) -> Result<()> {
        let out = r.output;
        let secs = r.seconds.max(1e-9);
        let ex_s = r.examples as f64 / secs;
        let tok_s = r.tokens.map(|t| t as f64 / secs);
        let mut msg = match tok_s {
            Some(ts) => format!("loss {:.2} kl {:.2} {:.0} tok/s", out.loss, out.kl, ts),
            None => format!("loss {:.2} kl {:.2} {:.0} ex/s", out.loss, out.kl, ex_s),
        };
        if let Some(c) = &out.cg {
            // Examples whose implicit gradient fell back to the identity (not stationary,
            // or a failed solve), of the batch.
            msg.push_str(&format!(
                " cg {:.1} it, {}/{} fallback",
                c.iters_mean,
                c.fallbacks + c.not_stationary,
                r.examples
            ));
        }
        self.bar.set_message(msg);
        self.bar.inc(1);
        let heap_mib = self.step_heap() as f64 / MIB;
        if r.log {
            self.metrics.write(json!({
                "kind": "step", "epoch": r.epoch + 1, "batch": r.batch + 1, "step": r.step,
                "loss": out.loss, "elbo_amortized": out.elbo_amortized, "elbo_refined": out.elbo_refined,
                "kl": out.kl, "beta": r.beta, "grad_norm": r.grad_norm, "examples_per_s": ex_s, "tokens_per_s": tok_s,
                "step_seconds": r.seconds, "heap_mib": heap_mib, "svi": out.svi, "cg": out.cg,
            }))?;
        }
        Ok(())
    }

    fn on_skip(&mut self, s: &SkipRecord) -> Result<()> {
        self.bar.suspend(|| {
            eprintln!(
                "savae: warning: epoch {} batch {}: non-finite loss or gradient, batch skipped",
                s.epoch + 1,
                s.batch
            )
        });
        self.metrics.write(json!({"kind": "skip", "epoch": s.epoch + 1, "batch": s.batch, "step": s.step, "loss": s.loss.to_string(), "grad_norm": s.grad_norm.to_string(), "consecutive": s.consecutive}))
    }

    fn on_epoch_end(&mut self, e: &EpochRecord) -> Result<()> {
        self.bar.finish_and_clear();
        let (v, st) = (e.valid, e.stats);
        let train_elbo = st.train_elbo();
        self.metrics.write(json!({
            "kind": "epoch", "epoch": e.epoch, "step": e.step, "beta": e.beta, "train_elbo": train_elbo,
            "valid_elbo_amortized": v.elbo_amortized, "valid_elbo_refined": v.elbo_refined,
            "valid_kl": v.kl_refined, "valid_active_units": v.active_units,
            "valid_ppl_bound": v.ppl_bound, "valid_mutual_info": v.mutual_info,
            "epoch_seconds": e.seconds, "skipped_batches": e.skipped_batches, "best": e.improved,
            "svi_resets": st.svi_resets, "svi_line_search_failures": st.svi_line_search_failures, "cg_negative_curvature": st.cg_negative_curvature, "cg_non_finite": st.cg_non_finite,
            "cg_retried": st.cg_retried, "cg_fallbacks": st.cg_fallbacks, "not_stationary": st.not_stationary,
            "step_heap_peak_mib": self.epoch_heap_peak as f64 / MIB,
        }))?;
        if self.progress {
            let ppl = v
                .ppl_bound
                .map(|p| format!(", ppl ≤ {p:.1}"))
                .unwrap_or_default();
            eprintln!(
                "epoch {}/{}: train elbo {train_elbo:.2}, valid elbo {:.2} (amortized {:.2}){ppl}, kl {:.2}, {:.0}s{}",
                e.epoch,
                e.epochs,
                e.valid_elbo,
                v.elbo_amortized,
                v.kl_refined,
                e.seconds,
                if e.improved { " *best" } else { "" }
            );
        }
        Ok(())
    }

    fn on_stop(&mut self, s: &StopRecord) -> Result<()> {
        self.bar.finish_and_clear();
        let dir = self.run_dir.display();
        if s.saved {
            self.metrics.write(
                json!({"kind": "interrupt", "epoch": s.epoch + 1, "batch": s.batch, "step": s.step}),
            )?;
            eprintln!(
                "savae: interrupted at epoch {}, batch {}: saved {}; continue with: {} train --run-dir {dir} --resume",
                s.epoch + 1,
                s.batch,
                s.checkpoint.display(),
                crate::flags::program(),
            );
        } else {
            eprintln!(
                "savae: interrupted after epoch {}: {} holds it; continue with: {} train --run-dir {dir} --resume",
                s.epoch,
                s.checkpoint.display(),
                crate::flags::program(),
            );
        }
        Ok(())
    }

    fn stop_requested(&mut self) -> bool {
        SIGNALS.load(Ordering::SeqCst) > 0
    }
}

//! The training loop as a value: a [`Trainer`] holds the model, Adam, the data and the
//! position of a run ([`TrainState`]); [`Trainer::run`] trains epochs of shuffled
//! mini-batches, validates after each, writes `last.safetensors` / `best.safetensors`
//! into the run folder and reports every step, skip and epoch to an [`Observer`], which
//! may also ask the loop to stop (it then saves its position and returns).
//!
//! Exact resume: every random draw is a function of (seed, stream, epoch, batch) (see
//! `savae_data::Stream`) and the checkpoint holds the weights, Adam's state and the
//! position, so a resumed run computes the same numbers as an uninterrupted one
//! (bit-identical on CPU).

use crate::adam::{clip_global_norm, Adam};
use crate::batch::{self, Corpus, Dropout, SplitData};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, RngState, FORMAT_VERSION};
use crate::config::{TrainConfig, TrainOverrides};
use crate::eval::{evaluate, EvalOptions, EvalReport};
use crate::options::{GradientKind, ModelKind, OuterNoise, SettingError};
use crate::step::{train_step_outer, StepOutput};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Var};
use savae_data::{epoch_order, Stream};
use savae_model::{Batch, ModelConfig, Vae};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where a run lives and what it runs on.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run folder: `last.safetensors`, `best.safetensors` (and whatever the observer
    /// writes, e.g. the CLI's `metrics.jsonl`).
    pub run_dir: PathBuf,
    /// The folder of the data files.
    pub data_dir: PathBuf,
    pub device: Device,
    /// Consecutive non-finite batches tolerated before the run stops with an error.
    pub max_bad_batches: usize,
    /// Also write `last.safetensors` mid-epoch once this much time has passed since the
    /// run's last save, so that a process killed without warning (a preempted job, a
    /// closed session) loses at most about this much work. `None`: save only at epoch
    /// ends and on a stop request. Saving does not change what the run computes.
    pub save_every: Option<Duration>,
}

impl RunOptions {
    /// Options for a run in `run_dir` on `device`, reading the data from `data_dir`: 10
    /// non-finite batches in a row tolerated, saves only at epoch ends and on stop requests.
    pub fn new(run_dir: PathBuf, data_dir: PathBuf, device: Device) -> Self {
        Self {
            run_dir,
            data_dir,
            device,
            max_bad_batches: 10,
            save_every: None,
        }
    }

    pub fn last_path(&self) -> PathBuf {
        self.run_dir.join("last.safetensors")
    }
    pub fn best_path(&self) -> PathBuf {
        self.run_dir.join("best.safetensors")
    }
}

/// The files of a run folder that [`Trainer::create`] refuses to replace unless asked.
pub const RUN_FILES: &[&str] = &["last.safetensors", "best.safetensors", "metrics.jsonl"];

/// [`Trainer::create`] found a run in the folder and was not asked to overwrite it.
#[derive(Debug, Clone)]
pub struct RunFolderTaken(pub PathBuf);

impl std::fmt::Display for RunFolderTaken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run folder {} already holds a run: resume it or overwrite it",
            self.0.display()
        )
    }
}

impl std::error::Error for RunFolderTaken {}

/// The settings a resumed run may change; any other difference is refused.
/// `passes` changes only the arithmetic of the same derivatives: a resume that changes
/// it continues the run, though not bit-identically.
pub const RESUMABLE_CHANGES: &[&str] = &[
    "epochs",
    "patience",
    "log_every",
    "valid_examples",
    "passes",
];

/// Σ loss · examples, examples and the numerical-fault counters of the current epoch, and
/// the seconds it ran in earlier processes: an interrupted epoch's checkpoint carries them,
/// so that the epoch's record after a resume counts the whole epoch.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct EpochStats {
    pub loss_sum: f64,
    pub examples: usize,
    pub svi_resets: usize,
    /// Newton steps (over examples) where no line-search trial passed Armijo's test.
    pub svi_line_search_failures: usize,
    pub cg_negative_curvature: usize,
    pub cg_non_finite: usize,
    pub cg_retried: usize,
    pub cg_fallbacks: usize,
    pub not_stationary: usize,
    /// Wall seconds of this epoch spent before the last resume.
    pub seconds_before: f64,
}

impl EpochStats {
    /// Adds a step on `examples` examples.
    pub fn absorb(&mut self, out: &StepOutput, examples: usize) {
        self.loss_sum += out.loss * examples as f64;
        self.examples += examples;
        if let Some(sv) = &out.svi {
            self.svi_resets += sv.resets;
            self.svi_line_search_failures += sv.line_search_failures;
        }
        if let Some(c) = &out.cg {
            self.cg_negative_curvature += c.negative_curvature;
            self.cg_non_finite += c.non_finite;
            self.cg_retried += c.retried;
            self.cg_fallbacks += c.fallbacks;
            self.not_stationary += c.not_stationary;
        }
    }

    /// The mean training ELBO of the epoch so far.
    pub fn train_elbo(&self) -> f64 {
        -self.loss_sum / self.examples.max(1) as f64
    }
}

/// The position and history of a run: everything a checkpoint holds besides the
/// weights, Adam's moments and the settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainState {
    /// Epochs completed.
    pub epoch: usize,
    /// Batches completed in the current epoch (0 at an epoch boundary).
    pub batch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub last_valid_elbo: Option<f64>,
    pub best_valid_elbo: Option<f64>,
    /// Epochs completed when `best_valid_elbo` was reached.
    pub best_epoch: Option<usize>,
    /// Batches skipped for a non-finite loss or gradient, over the whole run.
    pub skipped_batches: usize,
    /// The interrupted epoch's loss sum and examples (the fault counters restart).
    pub epoch_stats: EpochStats,
}

impl TrainState {
    /// The state a checkpoint was saved at.
    pub fn from_meta(meta: &CheckpointMeta) -> Self {
        Self {
            epoch: meta.epoch,
            batch: meta.rng.batch,
            step: meta.step,
            last_valid_elbo: meta.valid_elbo,
            best_valid_elbo: meta.best_valid_elbo,
            best_epoch: meta.best_epoch.or(meta.best_valid_elbo.map(|_| meta.epoch)),
            skipped_batches: meta.skipped_batches,
            // Checkpoints before the counters were carried hold only the loss sum.
            epoch_stats: meta.epoch_stats.clone().unwrap_or(EpochStats {
                loss_sum: meta.epoch_loss_sum,
                examples: meta.epoch_examples,
                ..EpochStats::default()
            }),
        }
    }

    /// The checkpoint metadata of this state.
    pub fn to_meta(
        &self,
        cfg: &TrainConfig,
        model: &ModelConfig,
        adam_t: u64,
        vocab: Option<Vec<String>>,
    ) -> CheckpointMeta {
        CheckpointMeta {
            format_version: FORMAT_VERSION,
            dataset: cfg.dataset.clone(),
            model: model.clone(),
            epoch: self.epoch,
            step: self.step,
            rng: RngState {
                seed: cfg.seed,
                epoch: self.epoch,
                batch: self.batch,
                scheme: "chacha8(splitmix(seed, stream, epoch, batch))".into(),
            },
            adam_t,
            config: cfg.clone(),
            valid_elbo: self.last_valid_elbo,
            best_valid_elbo: self.best_valid_elbo,
            best_epoch: self.best_epoch,
            epoch_loss_sum: self.epoch_stats.loss_sum,
            epoch_examples: self.epoch_stats.examples,
            epoch_stats: (self.epoch_stats.examples > 0).then(|| self.epoch_stats.clone()),
            skipped_batches: self.skipped_batches,
            savae_version: env!("CARGO_PKG_VERSION").into(),
            vocab,
        }
    }
}

/// How a run starts, for [`Observer::on_start`].
#[derive(Debug, Clone)]
pub struct RunStart<'a> {
    pub config: &'a TrainConfig,
    pub state: &'a TrainState,
    /// Resumed from the run folder's `last.safetensors`.
    pub resumed: bool,
    /// Batches per epoch.
    pub batches_per_epoch: usize,
    /// Things the user should know (e.g. a setting that changes what trains the encoder).
    pub notes: &'a [String],
    /// What loading a text corpus left out: empty lines, and train sentences over
    /// `config.max_len` words.
    pub skipped: &'a savae_data::LoadStats,
}

/// One optimizer step, for [`Observer::on_step`].
#[derive(Debug, Clone)]
pub struct StepRecord<'a> {
    /// 0-based epoch and batch of the step; `step` counts optimizer steps after it.
    pub epoch: usize,
    pub batch: usize,
    pub batches_per_epoch: usize,
    pub step: u64,
    pub beta: f64,
    pub output: &'a StepOutput,
    /// The model gradient's global norm before clipping.
    pub grad_norm: f64,
    pub seconds: f64,
    pub examples: usize,
    /// Tokens of a text batch.
    pub tokens: Option<usize>,
    /// Whether this step is one the settings ask to log (`log_every`, last of an epoch).
    pub log: bool,
}

/// A batch skipped for a non-finite loss or gradient.
#[derive(Debug, Clone)]
pub struct SkipRecord {
    pub epoch: usize,
    pub batch: usize,
    pub step: u64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Skipped batches in a row, this one included.
    pub consecutive: usize,
}

/// A finished epoch, after validation and the checkpoint writes.
#[derive(Debug, Clone)]
pub struct EpochRecord<'a> {
    /// Epochs completed (1-based number of this epoch).
    pub epoch: usize,
    pub epochs: usize,
    pub step: u64,
    pub beta: f64,
    pub stats: &'a EpochStats,
    pub valid: &'a EvalReport,
    /// The validation ELBO the run selects on (refined for refining modes).
    pub valid_elbo: f64,
    pub improved: bool,
    pub seconds: f64,
    pub skipped_batches: usize,
}

/// Where a stop request left the run.
#[derive(Debug, Clone)]
pub struct StopRecord {
    /// Epochs completed and batches of the current one.
    pub epoch: usize,
    pub batch: usize,
    pub step: u64,
    /// The checkpoint holding the position.
    pub checkpoint: PathBuf,
    /// A checkpoint was written for this stop (false: the last epoch's still holds it).
    pub saved: bool,
}

/// What a run reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub epochs_done: usize,
    pub steps: u64,
    pub last_valid_elbo: Option<f64>,
    pub best_valid_elbo: Option<f64>,
    /// Epochs completed when the best validation ELBO was reached.
    pub best_epoch: Option<usize>,
    pub seconds: f64,
    pub skipped_batches: usize,
    /// Stopped on request after saving its position.
    pub interrupted: bool,
    /// Ended early: the validation ELBO had not improved for `patience` epochs.
    pub early_stopped: bool,
}

/// Watches a run: progress displays, metric logs, stop requests. Every method has a
/// default that does nothing.
pub trait Observer {
    fn on_start(&mut self, _start: &RunStart) -> Result<()> {
        Ok(())
    }
    fn on_epoch_start(&mut self, _epoch: usize, _start_batch: usize) -> Result<()> {
        Ok(())
    }
    /// Sees (and may change, e.g. to inject a fault) a step's output before the NaN
    /// guard and the update.
    fn inspect_step(&mut self, _step: u64, _output: &mut StepOutput) {}
    fn on_step(&mut self, _step: &StepRecord) -> Result<()> {
        Ok(())
    }
    fn on_skip(&mut self, _skip: &SkipRecord) -> Result<()> {
        Ok(())
    }
    fn on_epoch_end(&mut self, _epoch: &EpochRecord) -> Result<()> {
        Ok(())
    }
    fn on_stop(&mut self, _stop: &StopRecord) -> Result<()> {
        Ok(())
    }
    /// Polled between steps: true saves the position and ends [`Trainer::run`].
    fn stop_requested(&mut self) -> bool {
        false
    }
}

/// An observer that watches nothing.
pub struct Silent;

impl Observer for Silent {}

/// A run: model, optimizer, data and position.
pub struct Trainer {
    cfg: TrainConfig,
    opts: RunOptions,
    model: Vae,
    model_config: ModelConfig,
    adam: Adam,
    vars: Vec<Var>,
    train: SplitData,
    valid: SplitData,
    vocab_words: Option<Vec<String>>,
    dropout: Option<Dropout>,
    state: TrainState,
    resumed: bool,
    notes: Vec<String>,
    skipped: savae_data::LoadStats,
}

/// The settings in which two configurations differ, outside [`RESUMABLE_CHANGES`].
pub fn config_diff(a: &TrainConfig, b: &TrainConfig) -> Vec<String> {
    let (va, vb) = (
        serde_json::to_value(a).unwrap_or_default(),
        serde_json::to_value(b).unwrap_or_default(),
    );
    let mut out = Vec::new();
    if let (Some(ma), Some(mb)) = (va.as_object(), vb.as_object()) {
        for (k, x) in ma {
            let y = mb.get(k).cloned().unwrap_or_default();
            if *x != y && !RESUMABLE_CHANGES.contains(&k.as_str()) {
                out.push(format!(
                    "{k}: checkpoint has {x}, the new settings give {y}"
                ));
            }
        }
    }
    out
}

/// The architecture settings in which two models differ ("latent 3 there, 4 here").
pub fn architecture_diff(there: &ModelConfig, here: &ModelConfig) -> Vec<String> {
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
            there.activation.name().into(),
            here.activation.name().into(),
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

/// Removes the temporary files of checkpoint writes that a killed process left behind.
fn remove_stale_temporaries(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.contains(".safetensors.tmp.") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A [`SettingError`] of the `init_from` checkpoint at `path`.
fn init_error(path: &Path, problem: impl std::fmt::Display) -> anyhow::Error {
    SettingError {
        setting: "init_from",
        problem: format!("{}: {problem}", path.display()),
    }
    .into()
}

/// The `init_from` checkpoint, checked to be of the same data set.
fn load_init(path: &Path, cfg: &TrainConfig) -> Result<Checkpoint> {
    let ck = checkpoint::load(path)
        .map_err(|e| init_error(path, format!("not a loadable checkpoint: {e:#}")))?;
    if ck.meta.dataset != cfg.dataset {
        return Err(init_error(
            path,
            format!(
                "it was trained on dataset {}, this run is on dataset {}",
                ck.meta.dataset, cfg.dataset
            ),
        ));
    }
    Ok(ck)
}

impl Trainer {
    /// A new run of `cfg` in `opts.run_dir`. Refuses a folder that already holds a run
    /// unless `overwrite`, which removes its [`RUN_FILES`].
    pub fn create(cfg: TrainConfig, opts: RunOptions, overwrite: bool) -> Result<Self> {
        cfg.validate()?;
        let last = opts.last_path();
        let taken = last.exists() || opts.run_dir.join("metrics.jsonl").exists();
        if taken && !overwrite {
            return Err(RunFolderTaken(opts.run_dir.clone()).into());
        }
        if taken {
            for f in RUN_FILES {
                let _ = std::fs::remove_file(opts.run_dir.join(f));
            }
        }
        Self::build(cfg, opts, None)
    }

    /// Resumes the run in `opts.run_dir` from its `last.safetensors`, with `changes`
    /// applied in order (only [`RESUMABLE_CHANGES`] may differ from the checkpoint's).
    pub fn resume(opts: RunOptions, changes: &[&TrainOverrides]) -> Result<Self> {
        let last = opts.last_path();
        let ck = checkpoint::load(&last).with_context(|| {
            format!(
                "cannot resume {}: no loadable last.safetensors there",
                opts.run_dir.display()
            )
        })?;
        let mut cfg = ck.meta.config.clone();
        for c in changes {
            c.apply(&mut cfg);
        }
        let diff = config_diff(&ck.meta.config, &cfg);
        if !diff.is_empty() {
            bail!(
                "cannot resume {}: what was asked contradicts the checkpoint:\n  {}\n(only {} \
                 may change on resume)",
                opts.run_dir.display(),
                diff.join("\n  "),
                RESUMABLE_CHANGES.join(", ")
            );
        }
        cfg.validate()?;
        Self::build(cfg, opts, Some(ck))
    }

    fn build(cfg: TrainConfig, opts: RunOptions, resume_from: Option<Checkpoint>) -> Result<Self> {
        std::fs::create_dir_all(&opts.run_dir)
            .with_context(|| format!("cannot create the run folder {}", opts.run_dir.display()))?;
        remove_stale_temporaries(&opts.run_dir);
        let mut notes = Vec::new();
        if cfg.model == ModelKind::Savae {
            if cfg.grad == GradientKind::Implicit && cfg.prox == 0.0 {
                notes.push(
                    "prox 0: the refined optimum does not depend on the encoder's λ0, so the \
                     implicit gradient gives the encoder nothing; it trains on its own ELBO at \
                     λ0 instead"
                        .to_string(),
                );
            }
            savae_implicit::ensure_second_order()?;
        }
        let last_path = opts.last_path();
        // A new run may start from another run's weights; a resumed one has its own.
        let init_from = match (&resume_from, &cfg.init_from) {
            (None, Some(p)) => Some((PathBuf::from(p), load_init(Path::new(p), &cfg)?)),
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
        )?;
        let train = match cfg.max_train_examples {
            Some(n) if n < data.train.len() => {
                let order = epoch_order(cfg.seed, u64::MAX, data.train.len());
                data.train.select(&order[..n])
            }
            _ => data.train.clone(),
        };
        let valid = match cfg.valid_examples {
            Some(n) => data.valid.truncate(n),
            None => data.valid.clone(),
        };
        let vocab_size = data.vocab_size();
        let model_config = cfg.model_config(vocab_size);
        let model = Vae::new(&model_config, cfg.seed, cfg.dtype(), &opts.device)?;
        if let Some((p, ck)) = &init_from {
            let diff = architecture_diff(&ck.meta.model, &model_config);
            if !diff.is_empty() {
                return Err(init_error(
                    p,
                    format!(
                        "its architecture differs from the configured one: {}; use the same \
                         architecture settings",
                        diff.join(", ")
                    ),
                ));
            }
            ck.load_into(&model, p)
                .map_err(|e| init_error(p, format!("{e:#}")))?;
            notes.push(format!(
                "starting from the weights of {} ({} after {} epochs)",
                p.display(),
                ck.meta.model.kind,
                ck.meta.epoch
            ));
        }
        let dropout = (vocab_size > 0 && cfg.dropout > 0.0).then(|| Dropout {
            p: cfg.dropout,
            embed: cfg.embed_dim,
            hidden: cfg.hidden[0],
        });
        let vars = model.params.vars();
        let mut adam = Adam::new(&vars, cfg.lr)?;
        let mut state = TrainState::default();
        let resumed = resume_from.is_some();
        if let Some(ck) = &resume_from {
            ck.load_into(&model, &last_path)?;
            ck.load_adam(&mut adam, &model, &last_path)?;
            state = TrainState::from_meta(&ck.meta);
        }
        Ok(Self {
            vocab_words: data.vocab.as_ref().map(|v| v.words().to_vec()),
            cfg,
            opts,
            model,
            model_config,
            adam,
            vars,
            train,
            valid,
            dropout,
            state,
            resumed,
            notes,
            skipped: data.skipped.clone(),
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    pub fn state(&self) -> &TrainState {
        &self.state
    }
    pub fn model(&self) -> &Vae {
        &self.model
    }
    pub fn options(&self) -> &RunOptions {
        &self.opts
    }

    /// The checkpoint metadata of the current state.
    fn meta(&self) -> CheckpointMeta {
        self.state.to_meta(
            &self.cfg,
            &self.model_config,
            self.adam.t,
            self.vocab_words.clone(),
        )
    }

    fn batches_per_epoch(&self) -> usize {
        self.train
            .epoch_batches(self.cfg.batch_size, self.cfg.seed, 0)
            .len()
    }

    fn summary(&self, started: Instant, interrupted: bool) -> TrainSummary {
        TrainSummary {
            run_dir: self.opts.run_dir.clone(),
            epochs_done: self.state.epoch,
            steps: self.state.step,
            last_valid_elbo: self.state.last_valid_elbo,
            best_valid_elbo: self.state.best_valid_elbo,
            best_epoch: self.state.best_epoch,
            seconds: started.elapsed().as_secs_f64(),
            skipped_batches: self.state.skipped_batches,
            interrupted,
            early_stopped: !interrupted && self.stalled(),
        }
    }

    /// Trains until `epochs` are done or `obs` asks to stop.
    pub fn run(&mut self, obs: &mut dyn Observer) -> Result<TrainSummary> {
        let started = Instant::now();
        let nb = self.batches_per_epoch();
        obs.on_start(&RunStart {
            config: &self.cfg,
            state: &self.state,
            resumed: self.resumed,
            batches_per_epoch: nb,
            notes: &self.notes,
            skipped: &self.skipped,
        })?;
        let last_path = self.opts.last_path();
        while self.state.epoch < self.cfg.epochs && !self.stalled() {
            if self.state.batch == 0
                && last_path.exists()
                && (self.state.epoch > 0 || self.resumed)
                && obs.stop_requested()
            {
                obs.on_stop(&StopRecord {
                    epoch: self.state.epoch,
                    batch: 0,
                    step: self.state.step,
                    checkpoint: last_path,
                    saved: false,
                })?;
                return Ok(self.summary(started, true));
            }
            if !self.train_epoch(obs, nb)? {
                return Ok(self.summary(started, true));
            }
        }
        Ok(self.summary(started, false))
    }

    /// Early stopping: at an epoch boundary, `patience` epochs have passed since the
    /// best validation ELBO.
    fn stalled(&self) -> bool {
        match (self.cfg.patience, self.state.best_epoch) {
            (Some(p), Some(best)) => self.state.batch == 0 && self.state.epoch >= best + p,
            _ => false,
        }
    }

    /// One epoch from the current position; false when stopped on request.
    fn train_epoch(&mut self, obs: &mut dyn Observer, nb: usize) -> Result<bool> {
        let cfg = self.cfg.clone();
        let epoch = self.state.epoch;
        let beta = cfg.beta(epoch);
        let scfg = cfg.step_config(beta);
        let batches = self
            .train
            .epoch_batches(cfg.batch_size, cfg.seed, epoch as u64);
        let (dtype, device) = (cfg.dtype(), self.opts.device.clone());
        let d = cfg.latent_dim;
        let fresh_outer = cfg.outer_noise == OuterNoise::Fresh && cfg.model.refines();
        let start_batch = self.state.batch;
        obs.on_epoch_start(epoch, start_batch)?;
        // The epoch's clock since its start or its last save (save_position restarts it).
        let mut te = Instant::now();
        let mut bad_run = 0usize;
        for (bi, idx) in batches.iter().enumerate().skip(start_batch) {
            if bi > start_batch && obs.stop_requested() {
                self.save_position(bi, &mut te)?;
                obs.on_stop(&StopRecord {
                    epoch,
                    batch: bi,
                    step: self.state.step,
                    checkpoint: self.opts.last_path(),
                    saved: true,
                })?;
                return Ok(false);
            }
            if bi > start_batch && self.opts.save_every.is_some_and(|e| te.elapsed() >= e) {
                self.save_position(bi, &mut te)?;
            }
            let mut rng = Stream::Train.rng(cfg.seed, epoch as u64, bi as u64);
            // Dropout masks (text) are drawn with the batch and held fixed for the step.
            let x = self
                .train
                .batch(idx, &mut rng, dtype, &device, self.dropout)?;
            let eps = batch::noise(&mut rng, cfg.samples, idx.len(), d, dtype, &device)?;
            let outer = if fresh_outer {
                Some(batch::noise(
                    &mut rng,
                    cfg.samples,
                    idx.len(),
                    d,
                    dtype,
                    &device,
                )?)
            } else {
                None
            };
            let ts = Instant::now();
            let mut out = train_step_outer(&self.model, &x, &eps, outer.as_ref(), &scfg)?;
            obs.inspect_step(self.state.step, &mut out);
            let gnorm = clip_global_norm(&mut out.grads, cfg.max_grad_norm)?;
            if !out.loss.is_finite() || !gnorm.is_finite() {
                self.state.skipped_batches += 1;
                bad_run += 1;
                obs.on_skip(&SkipRecord {
                    epoch,
                    batch: bi,
                    step: self.state.step,
                    loss: out.loss,
                    grad_norm: gnorm,
                    consecutive: bad_run,
                })?;
                if bad_run > self.opts.max_bad_batches {
                    bail!(
                        "training stopped: {bad_run} consecutive batches had a non-finite loss or \
                         gradient (NaN/inf); the last good checkpoint {} is intact — try a \
                         smaller learning rate (lr) or refinement step (svi_lr)",
                        self.opts.last_path().display()
                    );
                }
                continue;
            }
            bad_run = 0;
            self.adam.step(&self.vars, &out.grads)?;
            self.state.step += 1;
            self.state.epoch_stats.absorb(&out, idx.len());
            let tokens = match &x {
                Batch::Text(t) => Some(t.len() * t.steps()),
                Batch::Images(_) => None,
            };
            obs.on_step(&StepRecord {
                epoch,
                batch: bi,
                batches_per_epoch: nb,
                step: self.state.step,
                beta,
                output: &out,
                grad_norm: gnorm,
                seconds: ts.elapsed().as_secs_f64(),
                examples: idx.len(),
                tokens,
                log: self.state.step.is_multiple_of(cfg.log_every as u64) || bi + 1 == nb,
            })?;
        }
        self.finish_epoch(obs, beta, te)?;
        Ok(true)
    }

    /// Writes `last.safetensors` at the position before batch `batch` of the current
    /// epoch, with the time the epoch has run so far (moved out of `epoch_clock`, which
    /// restarts) carried in the state.
    fn save_position(&mut self, batch: usize, epoch_clock: &mut Instant) -> Result<()> {
        self.state.batch = batch;
        self.state.epoch_stats.seconds_before += epoch_clock.elapsed().as_secs_f64();
        *epoch_clock = Instant::now();
        checkpoint::save(
            &self.opts.last_path(),
            &self.model,
            Some(&self.adam),
            &self.meta(),
        )
    }

    /// Validation, checkpoints and the epoch record at the end of an epoch.
    fn finish_epoch(&mut self, obs: &mut dyn Observer, beta: f64, started: Instant) -> Result<()> {
        let cfg = &self.cfg;
        self.state.batch = 0;
        self.state.epoch += 1;
        let eopts = EvalOptions {
            svi: cfg.svi_config(),
            refine: cfg.model.refines(),
            iw_samples: 0,
            elbo_samples: 1,
            refine_samples: cfg.samples,
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            passes: cfg.passes,
        };
        let v = evaluate(&self.model, &self.valid, "valid", &eopts, &self.opts.device)?;
        let vel = if cfg.model.refines() {
            v.elbo_refined
        } else {
            v.elbo_amortized
        };
        self.state.last_valid_elbo = Some(vel);
        let improved = self.state.best_valid_elbo.is_none_or(|b| vel > b);
        if improved {
            self.state.best_valid_elbo = Some(vel);
            self.state.best_epoch = Some(self.state.epoch);
        }
        let stats = std::mem::take(&mut self.state.epoch_stats);
        let meta = self.meta();
        checkpoint::save(&self.opts.last_path(), &self.model, Some(&self.adam), &meta)?;
        if improved {
            checkpoint::save(&self.opts.best_path(), &self.model, Some(&self.adam), &meta)?;
        }
        obs.on_epoch_end(&EpochRecord {
            epoch: self.state.epoch,
            epochs: self.cfg.epochs,
            step: self.state.step,
            beta,
            stats: &stats,
            valid: &v,
            valid_elbo: vel,
            improved,
            seconds: stats.seconds_before + started.elapsed().as_secs_f64(),
            skipped_batches: self.state.skipped_batches,
        })
    }
}

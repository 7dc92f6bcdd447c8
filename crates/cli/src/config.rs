//! Training configuration: defaults ← TOML file (`--config`) ← command-line flags.

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every training setting, resolved. Stored in the checkpoint metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub dataset: String,
    /// vae | svi | vae-svi | savae | lm (text only)
    pub model: String,
    /// implicit | unrolled (savae only)
    pub grad: String,
    /// Total epochs (a resumed run trains until this many are done).
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub latent_dim: usize,
    pub hidden: Vec<usize>,
    pub activation: String,
    pub svi_steps: usize,
    pub svi_lr: f64,
    /// sgd | adam
    pub svi_optimizer: String,
    /// Early-stop tolerance of the refinement (max ‖∇F_b‖); 0 disables.
    pub svi_tol: f64,
    /// Proximal weight γ of the refinement.
    pub prox: f64,
    pub cg_iters: usize,
    pub cg_tol: f64,
    pub cg_damping: f64,
    /// Damped re-solves of examples whose CG hit negative curvature (0: fall back at once).
    #[serde(default)]
    pub cg_retries: usize,
    /// ‖∇F(λ_K)‖ above which an example is not stationary and takes the identity fallback.
    #[serde(default = "default_stationarity_tol")]
    pub stationarity_tol: f64,
    /// exact | fd
    pub hvp: String,
    /// Noise samples S per ELBO estimate.
    pub samples: usize,
    /// KL weight at the start of training.
    pub kl_start: f64,
    /// Epochs over which β rises linearly from kl_start to 1.
    pub kl_warmup_epochs: usize,
    /// Global gradient-norm clip of the model's gradient (0 = off).
    pub max_grad_norm: f64,
    pub seed: u64,
    pub dtype: String,
    pub max_train_examples: Option<usize>,
    /// Validation examples used each epoch (None = the whole split).
    pub valid_examples: Option<usize>,
    /// Write a step line to metrics.jsonl every this many steps.
    pub log_every: usize,
    /// Word-embedding size (text).
    #[serde(default)]
    pub embed_dim: usize,
    /// Decoder dropout (text).
    #[serde(default)]
    pub dropout: f64,
    /// Vocabulary size cap, special symbols included (text; None = every train word).
    #[serde(default)]
    pub max_vocab: Option<usize>,
    /// Train sentences with more words are dropped (text).
    #[serde(default)]
    pub max_len: usize,
    /// Noise of the outer loss of the refining modes: `fresh` (draws independent of the
    /// refinement's) or `same` (the refinement's own draws; runs before this option).
    #[serde(default = "same_noise")]
    pub outer_noise: String,
    /// Checkpoint whose model weights start the run (fine-tuning; a fresh optimizer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
    /// What trains the SA-VAE encoder: `refined` (the loss at λ* through λ0, SA-VAE's
    /// rule) or `amortized` (its own ELBO at λ0, as in vae-svi).
    #[serde(default = "refined_encoder")]
    pub encoder_loss: String,
}

fn refined_encoder() -> String {
    "refined".into()
}

fn same_noise() -> String {
    "same".into()
}

fn default_stationarity_tol() -> f64 {
    1.0
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            dataset: "mnist".into(),
            model: "vae".into(),
            grad: "implicit".into(),
            epochs: 20,
            batch_size: 100,
            lr: 1e-3,
            latent_dim: 32,
            hidden: vec![512, 512],
            activation: "softplus".into(),
            svi_steps: 10,
            svi_lr: 1.0,
            svi_optimizer: "sgd".into(),
            svi_tol: 0.0,
            prox: 1.0,
            cg_iters: 10,
            cg_tol: 1e-4,
            cg_damping: 0.0,
            cg_retries: 0,
            stationarity_tol: default_stationarity_tol(),
            hvp: "exact".into(),
            samples: 1,
            kl_start: 0.1,
            kl_warmup_epochs: 2,
            max_grad_norm: 5.0,
            seed: 1,
            dtype: "f32".into(),
            max_train_examples: None,
            valid_examples: Some(2000),
            log_every: 50,
            embed_dim: 0,
            dropout: 0.0,
            max_vocab: None,
            max_len: 0,
            outer_noise: "fresh".into(),
            init_from: None,
            encoder_loss: refined_encoder(),
        }
    }
}

impl TrainConfig {
    /// The defaults for `dataset`: the MNIST MLP above, or for text a one-layer LSTM VAE
    /// small enough to train on a CPU (SA-VAE's settings otherwise: batch 32, β from 0.1
    /// to 1 over 10 epochs, gradient clip 5, decoder dropout 0.5).
    pub fn defaults_for(dataset: &str) -> Self {
        let base = Self {
            dataset: dataset.to_string(),
            ..Self::default()
        };
        if !savae_data::DataSpec::parse(dataset).is_ok_and(|d| d.is_text()) {
            return base;
        }
        Self {
            epochs: 20,
            batch_size: 32,
            latent_dim: 32,
            hidden: vec![256],
            embed_dim: 256,
            dropout: 0.5,
            kl_warmup_epochs: 10,
            valid_examples: None,
            max_len: 50,
            log_every: 100,
            ..base
        }
    }

    pub fn is_text(&self) -> bool {
        savae_data::DataSpec::parse(&self.dataset).is_ok_and(|d| d.is_text())
    }
}

/// The same settings as optional values: what a TOML file or the flags give.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainOverrides {
    /// mnist (static binarization), mnist-dynamic, ptb, or text:DIR (DIR/train.txt,
    /// valid.txt, test.txt: one sentence per line).
    #[arg(long, allow_negative_numbers = true)]
    pub dataset: Option<String>,
    /// vae | svi | vae-svi | savae | lm (text: the decoder alone, a language model).
    #[arg(long, allow_negative_numbers = true)]
    pub model: Option<String>,
    /// Gradient through the refinement for --model savae: implicit | unrolled.
    #[arg(long, allow_negative_numbers = true)]
    pub grad: Option<String>,
    /// Total number of epochs.
    #[arg(long, allow_negative_numbers = true)]
    pub epochs: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Adam learning rate of the model.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub latent_dim: Option<usize>,
    /// Hidden layer sizes, comma separated (encoder order; the decoder mirrors them).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub hidden: Option<Vec<usize>>,
    /// softplus | tanh | relu | elu.
    #[arg(long, allow_negative_numbers = true)]
    pub activation: Option<String>,
    /// SVI refinement steps K.
    #[arg(long, allow_negative_numbers = true)]
    pub svi_steps: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub svi_lr: Option<f64>,
    /// sgd (momentum 0.5, clip 5, on the batch-mean loss) | adam.
    #[arg(long, allow_negative_numbers = true)]
    pub svi_optimizer: Option<String>,
    #[arg(long, allow_negative_numbers = true)]
    pub svi_tol: Option<f64>,
    /// Proximal weight γ: refine F(λ) = ELBO(λ) − γ/2 ‖λ − λ0‖².
    #[arg(long, allow_negative_numbers = true)]
    pub prox: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub cg_iters: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub cg_tol: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub cg_damping: Option<f64>,
    /// Damped re-solves after negative curvature before the fallback.
    #[arg(long, allow_negative_numbers = true)]
    pub cg_retries: Option<usize>,
    /// ‖∇F(λ_K)‖ above which an example's implicit gradient is not trusted.
    #[arg(long, allow_negative_numbers = true)]
    pub stationarity_tol: Option<f64>,
    /// Hessian-vector products: exact | fd.
    #[arg(long, allow_negative_numbers = true)]
    pub hvp: Option<String>,
    /// Noise samples S per ELBO estimate.
    #[arg(long, allow_negative_numbers = true)]
    pub samples: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub kl_start: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub kl_warmup_epochs: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub max_grad_norm: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// f32 | f64.
    #[arg(long, allow_negative_numbers = true)]
    pub dtype: Option<String>,
    /// Train on the first N examples of the shuffled training split only.
    #[arg(long, allow_negative_numbers = true)]
    pub max_train_examples: Option<usize>,
    /// Validation examples evaluated each epoch.
    #[arg(long, allow_negative_numbers = true)]
    pub valid_examples: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub log_every: Option<usize>,
    /// Word-embedding size (text).
    #[arg(long, allow_negative_numbers = true)]
    pub embed_dim: Option<usize>,
    /// Decoder dropout probability in training (text).
    #[arg(long, allow_negative_numbers = true)]
    pub dropout: Option<f64>,
    /// Vocabulary size cap, <unk> <s> </s> included (text; default: every train word).
    #[arg(long, allow_negative_numbers = true)]
    pub max_vocab: Option<usize>,
    /// Drop train sentences with more words than this (text).
    #[arg(long, allow_negative_numbers = true)]
    pub max_len: Option<usize>,
    /// Noise of the outer loss of vae-svi/savae: fresh (independent of the refinement's
    /// draws) | same (the draws the posteriors were refined on; biased upward).
    #[arg(long)]
    pub outer_noise: Option<String>,
    /// Start from the model weights of this checkpoint (same data set and architecture;
    /// Adam starts fresh and the epochs count from 0), e.g. to refine a trained VAE into an
    /// SA-VAE.
    #[arg(long)]
    pub init_from: Option<String>,
    /// What trains the encoder of --model savae: refined (the loss at the refined λ*,
    /// through λ0: SA-VAE) | amortized (its own ELBO at λ0, as vae-svi does).
    #[arg(long)]
    pub encoder_loss: Option<String>,
}

macro_rules! merge_fields {
    ($cfg:expr, $ov:expr; $($f:ident),*; $($o:ident),*) => {{
        $( if let Some(v) = $ov.$f.clone() { $cfg.$f = v; } )*
        $( if let Some(v) = $ov.$o { $cfg.$o = Some(v); } )*
    }};
}

impl TrainOverrides {
    /// Reads a TOML file of overrides.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("config file {} is not valid", path.display()))
    }

    /// Applies these overrides onto `cfg`.
    pub fn apply(&self, cfg: &mut TrainConfig) {
        merge_fields!(cfg, self;
            dataset, model, grad, epochs, batch_size, lr, latent_dim, hidden, activation,
            svi_steps, svi_lr, svi_optimizer, svi_tol, prox, cg_iters, cg_tol, cg_damping, cg_retries, stationarity_tol, hvp,
            samples, kl_start, kl_warmup_epochs, max_grad_norm, seed, dtype, log_every,
            embed_dim, dropout, max_len, outer_noise, encoder_loss;
            max_train_examples, valid_examples, max_vocab);
        if let Some(p) = &self.init_from {
            cfg.init_from = Some(p.clone());
        }
    }

    /// The names of the settings these overrides set (for resume conflict checks).
    pub fn is_empty(&self) -> bool {
        let mut probe = TrainConfig::defaults_for(self.dataset.as_deref().unwrap_or("mnist"));
        let before = probe.clone();
        self.apply(&mut probe);
        probe == before && self.max_train_examples.is_none()
    }
}

impl TrainConfig {
    /// Checks every value; errors name the flag.
    pub fn validate(&self) -> Result<()> {
        let text = savae_data::DataSpec::parse(&self.dataset)
            .context("--dataset")?
            .is_text();
        if !["vae", "svi", "vae-svi", "savae", "lm"].contains(&self.model.as_str()) {
            bail!(
                "--model {:?} is unknown: expected vae, svi, vae-svi, savae or lm",
                self.model
            );
        }
        if !["fresh", "same"].contains(&self.outer_noise.as_str()) {
            bail!(
                "--outer-noise {:?} is unknown: expected fresh or same",
                self.outer_noise
            );
        }
        crate::step::EncoderLoss::parse(&self.encoder_loss)?;
        if self.model == "lm" && !text {
            bail!("--model lm is the language-model baseline of text data sets: use --dataset ptb or text:DIR");
        }
        if text {
            if self.embed_dim == 0 {
                bail!("--embed-dim must be at least 1 for text (got 0)");
            }
            if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
                bail!("--dropout must be in [0, 1) (got {})", self.dropout);
            }
            if self.max_len == 0 {
                bail!("--max-len must be at least 1 (got 0)");
            }
            if self.max_vocab.is_some_and(|v| v < 4) {
                bail!("--max-vocab must be at least 4 (<unk>, <s>, </s> and one word)");
            }
            if self.hidden.len() != 1 {
                bail!(
                    "--hidden for a text model is one LSTM size (got {:?})",
                    self.hidden
                );
            }
        }
        if !["implicit", "unrolled"].contains(&self.grad.as_str()) {
            bail!(
                "--grad {:?} is unknown: expected implicit or unrolled",
                self.grad
            );
        }
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("--batch-size must be at least 1 (got 0)");
        }
        if self.latent_dim == 0 {
            bail!("--latent-dim must be at least 1 (got 0)");
        }
        if self.hidden.is_empty() || self.hidden.contains(&0) {
            bail!(
                "--hidden needs one or more positive sizes (got {:?})",
                self.hidden
            );
        }
        if !text {
            savae_model::Activation::parse(&self.activation).context("--activation")?;
        }
        savae_inference::SviOptimizer::parse(&self.svi_optimizer, self.svi_lr)
            .context("--svi-optimizer")?;
        savae_implicit::HvpKind::parse(&self.hvp).context("--hvp")?;
        for (name, v) in [("--lr", self.lr), ("--svi-lr", self.svi_lr)] {
            if !(v.is_finite() && v > 0.0) {
                bail!("{name} must be a positive number (got {v})");
            }
        }
        for (name, v) in [
            ("--prox", self.prox),
            ("--cg-tol", self.cg_tol),
            ("--cg-damping", self.cg_damping),
            ("--stationarity-tol", self.stationarity_tol),
            ("--svi-tol", self.svi_tol),
            ("--max-grad-norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{name} must be a non-negative number (got {v})");
            }
        }
        if !(self.kl_start.is_finite() && (0.0..=1.0).contains(&self.kl_start)) {
            bail!("--kl-start must be in [0, 1] (got {})", self.kl_start);
        }
        if self.samples == 0 {
            bail!("--samples must be at least 1");
        }
        if self.model == "savae" && self.grad == "implicit" && self.cg_iters == 0 {
            bail!("--cg-iters must be at least 1 for --grad implicit");
        }
        if self.model == "savae" && self.grad == "unrolled" && self.svi_optimizer != "sgd" {
            bail!("--grad unrolled differentiates SGD with momentum: use --svi-optimizer sgd");
        }
        if self.model != "vae" && self.svi_steps == 0 && self.model != "vae-svi" {
            bail!("--svi-steps must be at least 1 for --model {}", self.model);
        }
        if !["f32", "f64"].contains(&self.dtype.as_str()) {
            bail!("--dtype {:?} is unknown: expected f32 or f64", self.dtype);
        }
        if self.log_every == 0 {
            bail!("--log-every must be at least 1");
        }
        if self.max_train_examples == Some(0) {
            bail!("--max-train-examples must be at least 1");
        }
        Ok(())
    }

    /// KL weight β at `epoch` (0-based): linear from kl_start to 1 over the warm-up.
    pub fn beta(&self, epoch: usize) -> f64 {
        if self.kl_warmup_epochs == 0 {
            return 1.0;
        }
        let t = (epoch as f64 / self.kl_warmup_epochs as f64).min(1.0);
        self.kl_start + (1.0 - self.kl_start) * t
    }

    /// The architecture; `vocab_size` is the corpus vocabulary's size (0 for images).
    pub fn model_config(&self, vocab_size: usize) -> savae_model::ModelConfig {
        let text = vocab_size > 0;
        savae_model::ModelConfig {
            kind: self.model.clone(),
            latent_dim: self.latent_dim,
            hidden: self.hidden.clone(),
            activation: self.activation.clone(),
            input_dim: if text { 0 } else { savae_data::PIXELS },
            vocab_size,
            embed_dim: if text { self.embed_dim } else { 0 },
            dropout: if text { self.dropout } else { 0.0 },
        }
    }

    pub fn dtype(&self) -> candle_core::DType {
        if self.dtype == "f64" {
            candle_core::DType::F64
        } else {
            candle_core::DType::F32
        }
    }
}

/// Where the shipped data lives: `--data-dir`, else `$SAVAE_DATA_DIR`, else `data/` of
/// the current directory or of the source tree this binary was built from.
pub fn data_dir(flag: Option<&PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d.clone();
    }
    if let Ok(d) = std::env::var("SAVAE_DATA_DIR") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("data");
    if local.join("binarized_mnist").exists() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"))
}

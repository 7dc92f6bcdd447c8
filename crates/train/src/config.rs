//! Training settings: defaults ← TOML file ← overrides (the command line's flags).
//!
//! Every setting is declared once, in the `settings!` list below: its type, its default,
//! its documentation (which is also its `--help` line) and its serde attributes. The list
//! generates [`TrainConfig`] (every value resolved; stored in checkpoint metadata),
//! [`TrainOverrides`] (the same settings as optional values: a TOML file or the flags) and
//! [`TrainOverrides::apply`]. Adding a setting is one entry here (and its check in
//! [`TrainConfig::validate`] when it has a range).

use crate::options::{
    require, Activation, EncoderLoss, GradientKind, HvpKind, ModelKind, NewtonSolve, OuterNoise,
    Passes, Precision, SettingError, SviMethod,
};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Declares the settings: `name: one T = default;` for a value, `name: opt T = default;`
/// for an optional one (`Option<T>` in the config, set by `Some(v)`).
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $(#[serde($($serde:tt)*)])*
        $(#[arg($($arg:tt)*)])*
        $name:ident : $kind:ident $ty:ty = $default:expr $(, unset $unset:literal)?;
    )*) => {
        /// Every training setting, resolved. Stored in the checkpoint metadata (as JSON,
        /// each enum under its lower-case name).
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct TrainConfig {
            $( $(#[doc = $doc])* $(#[serde($($serde)*)])* pub $name: settings!(@ty $kind $ty), )*
        }

        impl Default for TrainConfig {
            /// The image defaults (see [`TrainConfig::defaults_for`] for text).
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// The same settings as optional values: what a TOML file or the flags give.
        #[derive(Debug, Clone, Default, clap::Args, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct TrainOverrides {
            $( $(#[doc = $doc])* #[arg(long, allow_negative_numbers = true $(, $($arg)*)*)] pub $name: Option<$ty>, )*
        }

        /// The name of every setting, in declaration order (the TOML keys; the flags with
        /// `-` for `_`).
        pub const SETTINGS: &[&str] = &[$(stringify!($name)),*];

        /// What an unset optional setting means, in a word (e.g. "all" examples).
        fn unset_text(setting: &str) -> &'static str {
            match setting {
                $( stringify!($name) => settings!(@unset $($unset)?), )*
                _ => "none",
            }
        }

        impl TrainOverrides {
            /// Applies these overrides onto `cfg`.
            pub fn apply(&self, cfg: &mut TrainConfig) {
                $( if let Some(v) = &self.$name { settings!(@set $kind cfg.$name, v); } )*
            }
        }
    };
    (@unset) => { "none" };
    (@unset $u:literal) => { $u };
    (@ty one $ty:ty) => { $ty };
    (@ty opt $ty:ty) => { Option<$ty> };
    (@set one $cfg:ident . $name:ident, $v:ident) => { $cfg.$name = $v.clone() };
    (@set opt $cfg:ident . $name:ident, $v:ident) => { $cfg.$name = Some($v.clone()) };
}

settings! {
    /// mnist (static binarization), mnist-dynamic, ptb, or text:DIR (DIR/train.txt,
    /// valid.txt, test.txt: one sentence per line).
    dataset: one String = "mnist".into();
    /// The model: vae, svi (no encoder), vae-svi, savae, lm (text: the decoder alone).
    #[arg(value_enum)]
    model: one ModelKind = ModelKind::Vae;
    /// Gradient through the refinement for --model savae: implicit or unrolled.
    #[arg(value_enum)]
    grad: one GradientKind = GradientKind::Implicit;
    /// Total number of epochs (a resumed run trains until this many are done).
    epochs: one usize = 20;
    /// Early stopping: end the run once the validation ELBO has not improved for this
    /// many epochs (best.safetensors keeps the best).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    patience: opt usize = None, unset "off";
    /// Examples per training batch.
    batch_size: one usize = 100;
    /// Adam learning rate of the model.
    lr: one f64 = 1e-3;
    /// Size d of the latent z.
    latent_dim: one usize = 32;
    /// Hidden layer sizes, comma separated (encoder order; the decoder mirrors them; text:
    /// one LSTM size).
    #[arg(value_delimiter = ',')]
    hidden: one Vec<usize> = vec![512, 512];
    /// MLP activation: softplus, tanh, relu or elu.
    #[arg(value_enum)]
    activation: one Activation = Activation::Softplus;
    /// Refinement steps K.
    svi_steps: one usize = 10;
    /// Step size of the refinement.
    svi_lr: one f64 = 1.0;
    /// Refinement optimizer: sgd (momentum 0.5, clip 5, on the batch-mean loss), adam,
    /// newton (CG on exact Hessian-vector products), or newton-ls (newton with a
    /// per-example backtracking line search on F).
    #[arg(value_enum)]
    svi_optimizer: one SviMethod = SviMethod::Sgd;
    /// How each step of the newton and newton-ls refinements solves for its direction:
    /// exact (CG to relative residual 1e-4) or inexact (per example to min(0.5, √‖∇F‖):
    /// fewer Hessian-vector products far from the optimum, superlinear convergence near it).
    #[serde(default = "exact_newton")]
    #[arg(value_enum)]
    newton_solve: one NewtonSolve = NewtonSolve::Exact;
    /// The sgd refinement's clip of each example's ‖∇F_b‖, before the step's 1/batch-size
    /// scale (0: none). SA-VAE's code clips the whole batch's scaled gradient at 5 instead,
    /// which lets an example's step grow to about √(batch size) times this one's.
    #[serde(default = "sgd_clip_5")]
    svi_clip: one f64 = 5.0;
    /// Early stop of the refinement (0: never): newton and newton-ls stop each example
    /// once its ‖∇F_b‖ is below this (and evaluate only those still moving); sgd and adam
    /// stop when every example's is.
    svi_tol: one f64 = 0.0;
    /// Proximal weight γ: refine F(λ) = ELBO(λ) − γ/2 ‖λ − λ0‖².
    prox: one f64 = 1.0;
    /// CG iterations of the implicit gradient's adjoint solve.
    cg_iters: one usize = 10;
    /// Relative residual at which CG stops.
    cg_tol: one f64 = 1e-4;
    /// Damping δ added to γ in the adjoint solve ((γ + δ)I − H) u = g.
    cg_damping: one f64 = 0.0;
    /// Damped re-solves of examples whose CG hit negative curvature (0: fall back at once).
    #[serde(default)]
    cg_retries: one usize = 0;
    /// ‖∇F(λ_K)‖ above which an example is not stationary and takes the identity fallback.
    #[serde(default = "default_stationarity_tol")]
    stationarity_tol: one f64 = default_stationarity_tol();
    /// Cap of the unrolled gradient's reverse pass (0: exact): after every reverse step,
    /// each example's adjoint λ̄ and the step's decoder term to this norm, as SA-VAE's code
    /// does (with 5). The exact one explodes where the refinement's steps are unstable.
    #[serde(default)]
    unrolled_clip: one f64 = 0.0;
    /// Hessian-vector products: exact (double backward) or fd (differences).
    #[arg(value_enum)]
    hvp: one HvpKind = HvpKind::Exact;
    /// Derivatives of the inner ELBO: analytic (hand-derived passes for its gradient,
    /// Hessian-vector and mixed products, the loss's weight gradients and the encoder's
    /// backward, MLP and LSTM models, the language model included) or autograd (candle's
    /// backward and double backward, the reference).
    #[serde(default = "autograd_passes")]
    #[arg(value_enum)]
    passes: one Passes = Passes::Analytic;
    /// Noise samples S per ELBO estimate.
    samples: one usize = 1;
    /// KL weight β at the start of training.
    kl_start: one f64 = 0.1;
    /// Epochs over which β rises linearly from kl_start to 1.
    kl_warmup_epochs: one usize = 2;
    /// Global gradient-norm clip of the model's gradient (0: off).
    max_grad_norm: one f64 = 5.0;
    /// Seed of every random draw (weights, batches, noise).
    seed: one u64 = 1;
    /// Floating-point type: f32 or f64.
    #[arg(value_enum)]
    dtype: one Precision = Precision::F32;
    /// Train on N examples of the shuffled training split only.
    max_train_examples: opt usize = None, unset "all";
    /// Validation examples evaluated each epoch: the first N of the split (the shipped
    /// MNIST valid file is in random class order).
    valid_examples: opt usize = Some(2000), unset "all";
    /// Write a step line to metrics.jsonl every this many steps.
    log_every: one usize = 50;
    /// Word-embedding size (text).
    #[serde(default)]
    embed_dim: one usize = 0;
    /// Decoder dropout probability in training (text).
    #[serde(default)]
    dropout: one f64 = 0.0;
    /// Vocabulary size cap, <unk> <s> </s> included (text).
    #[serde(default)]
    max_vocab: opt usize = None, unset "all train words";
    /// Drop train sentences with more words than this (text).
    #[serde(default)]
    max_len: one usize = 0;
    /// Noise of the outer loss of vae-svi/savae: fresh (independent of the refinement's
    /// draws) or same (the draws the posteriors were refined on; biased upward).
    #[serde(default = "same_noise")]
    #[arg(value_enum)]
    outer_noise: one OuterNoise = OuterNoise::Fresh;
    /// Start from the model weights of this checkpoint (same data set and architecture;
    /// Adam starts fresh and the epochs count from 0), e.g. to refine a trained VAE into
    /// an SA-VAE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init_from: opt String = None;
    /// What trains the encoder of --model savae: refined (the loss at the refined λ*,
    /// through λ0: SA-VAE) or amortized (its own ELBO at λ0, as vae-svi does).
    #[serde(default = "refined_encoder")]
    #[arg(value_enum)]
    encoder_loss: one EncoderLoss = EncoderLoss::Refined;
}

/// Runs written before `newton_solve` existed solved each Newton step to 1e-4.
fn exact_newton() -> NewtonSolve {
    NewtonSolve::Exact
}

/// Runs written before `svi_clip` existed clipped at 5.
fn sgd_clip_5() -> f64 {
    5.0
}

/// Runs written before `encoder_loss` existed trained through the refinement.
fn refined_encoder() -> EncoderLoss {
    EncoderLoss::Refined
}

/// Runs written before `outer_noise` existed used the refinement's own draws.
fn same_noise() -> OuterNoise {
    OuterNoise::Same
}

/// Runs written before `passes` existed used autograd (and resume with its arithmetic).
fn autograd_passes() -> Passes {
    Passes::Autograd
}

fn default_stationarity_tol() -> f64 {
    1.0
}

impl TrainConfig {
    /// The value of `setting` as a user writes it (`512,512`, `fresh`, `1e-3` as
    /// `0.001`; an unset optional setting in a word such as `all`); None for an unknown
    /// name.
    pub fn setting_text(&self, setting: &str) -> Option<String> {
        let json = serde_json::to_value(self).ok()?;
        let v = match json.get(setting) {
            Some(v) => v,
            None if SETTINGS.contains(&setting) => &serde_json::Value::Null,
            None => return None,
        };
        Some(match v {
            serde_json::Value::Null => unset_text(setting).to_string(),
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(a) => a
                .iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        })
    }

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

/// A settings file (TOML): the training settings under their names, and optionally the
/// run folder (`run_dir`, which is where a run is written rather than how it trains).
#[derive(Debug, Clone, Default)]
pub struct SettingsFile {
    pub settings: TrainOverrides,
    pub run_dir: Option<std::path::PathBuf>,
}

impl SettingsFile {
    /// Reads `path`; errors name the file (and a `run_dir` that is not a string).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read settings file {}", path.display()))?;
        let bad = || format!("settings file {} is not valid", path.display());
        let mut table: toml::Table = toml::from_str(&text).with_context(bad)?;
        let run_dir = match table.remove("run_dir") {
            None => None,
            Some(toml::Value::String(s)) => Some(std::path::PathBuf::from(s)),
            Some(other) => {
                anyhow::bail!(
                    "{}: run_dir must be a string (a folder), not {other}",
                    bad()
                )
            }
        };
        let settings = table.try_into().with_context(bad)?;
        Ok(Self { settings, run_dir })
    }
}

impl TrainConfig {
    /// Checks every value; an error names the setting ([`SettingError`]).
    pub fn validate(&self) -> Result<(), SettingError> {
        let spec = savae_data::DataSpec::parse(&self.dataset).map_err(|e| SettingError {
            setting: "dataset",
            problem: format!("{:?}: {e:#}", self.dataset),
        })?;
        let text = spec.is_text();
        let model = self.model;
        require(
            model != ModelKind::Lm || text,
            "model",
            "lm is the language-model baseline of text data sets: use the data set ptb or text:DIR",
        )?;
        if text {
            require(
                self.embed_dim > 0,
                "embed_dim",
                "must be at least 1 for text (got 0)",
            )?;
            require(
                self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout),
                "dropout",
                format!("must be in [0, 1) (got {})", self.dropout),
            )?;
            require(self.max_len > 0, "max_len", "must be at least 1 (got 0)")?;
            require(
                self.max_vocab.is_none_or(|v| v >= 4),
                "max_vocab",
                "must be at least 4 (<unk>, <s>, </s> and one word)",
            )?;
            require(
                self.hidden.len() == 1,
                "hidden",
                format!("of a text model is one LSTM size (got {:?})", self.hidden),
            )?;
        }
        require(self.epochs > 0, "epochs", "must be at least 1")?;
        require(
            self.patience != Some(0),
            "patience",
            "must be at least 1 (leave it unset for no early stop)",
        )?;
        require(
            self.batch_size > 0,
            "batch_size",
            "must be at least 1 (got 0)",
        )?;
        require(
            self.latent_dim > 0,
            "latent_dim",
            "must be at least 1 (got 0)",
        )?;
        require(
            !self.hidden.is_empty() && !self.hidden.contains(&0),
            "hidden",
            format!("needs one or more positive sizes (got {:?})", self.hidden),
        )?;
        for (name, v) in [("lr", self.lr), ("svi_lr", self.svi_lr)] {
            require(
                v.is_finite() && v > 0.0,
                name,
                format!("must be a positive number (got {v})"),
            )?;
        }
        for (name, v) in [
            ("prox", self.prox),
            ("cg_tol", self.cg_tol),
            ("cg_damping", self.cg_damping),
            ("stationarity_tol", self.stationarity_tol),
            ("svi_tol", self.svi_tol),
            ("max_grad_norm", self.max_grad_norm),
            ("unrolled_clip", self.unrolled_clip),
            ("svi_clip", self.svi_clip),
        ] {
            require(
                v.is_finite() && v >= 0.0,
                name,
                format!("must be a non-negative number (got {v})"),
            )?;
        }
        require(
            self.kl_start.is_finite() && (0.0..=1.0).contains(&self.kl_start),
            "kl_start",
            format!("must be in [0, 1] (got {})", self.kl_start),
        )?;
        require(self.samples > 0, "samples", "must be at least 1")?;
        let savae = model == ModelKind::Savae;
        require(
            !(savae && self.grad == GradientKind::Implicit && self.cg_iters == 0),
            "cg_iters",
            "must be at least 1 for the implicit gradient",
        )?;
        require(
            !(savae && self.grad == GradientKind::Unrolled && self.svi_optimizer != SviMethod::Sgd),
            "svi_optimizer",
            "must be sgd for the unrolled gradient, which differentiates SGD with momentum",
        )?;
        require(
            self.newton_solve == NewtonSolve::Exact
                || matches!(self.svi_optimizer, SviMethod::Newton | SviMethod::NewtonLs),
            "newton_solve",
            format!(
                "inexact applies to the newton and newton-ls refinements only (the refinement is {})",
                self.svi_optimizer.name()
            ),
        )?;
        require(
            !(matches!(model, ModelKind::Svi | ModelKind::Savae) && self.svi_steps == 0),
            "svi_steps",
            format!("must be at least 1 for the model {model}"),
        )?;
        require(self.log_every > 0, "log_every", "must be at least 1")?;
        require(
            self.max_train_examples != Some(0),
            "max_train_examples",
            "must be at least 1",
        )?;
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
            kind: self.model,
            latent_dim: self.latent_dim,
            hidden: self.hidden.clone(),
            activation: self.activation,
            input_dim: if text { 0 } else { savae_data::PIXELS },
            vocab_size,
            embed_dim: if text { self.embed_dim } else { 0 },
            dropout: if text { self.dropout } else { 0.0 },
        }
    }

    pub fn dtype(&self) -> candle_core::DType {
        self.dtype.dtype()
    }

    /// The refinement optimizer `method` with this run's step size and Newton solve (the
    /// run's own, or another method asked for at evaluation).
    pub fn svi_optimizer_of(&self, method: SviMethod) -> savae_inference::SviOptimizer {
        let clip = if self.svi_clip > 0.0 {
            self.svi_clip
        } else {
            f64::INFINITY
        };
        method
            .with_lr(self.svi_lr)
            .with_newton_solve(self.newton_solve)
            .with_sgd_clip(clip)
    }

    /// The refinement of this run.
    pub fn svi_config(&self) -> savae_inference::SviConfig {
        savae_inference::SviConfig {
            steps: self.svi_steps,
            optimizer: self.svi_optimizer_of(self.svi_optimizer),
            prox: self.prox,
            tol: self.svi_tol,
            batch_size: self.batch_size,
        }
    }

    /// The training mode: the model and, for SA-VAE, how its gradient is taken.
    pub fn mode(&self) -> crate::step::Mode {
        use crate::step::{ImplicitGradient, Mode, SavaeGradient};
        match self.model {
            ModelKind::Lm => Mode::Lm,
            ModelKind::Vae => Mode::Vae,
            ModelKind::Svi => Mode::Svi,
            ModelKind::VaeSvi => Mode::VaeSvi,
            ModelKind::Savae => Mode::Savae {
                gradient: match self.grad {
                    GradientKind::Unrolled => SavaeGradient::Unrolled {
                        reverse_clip: (self.unrolled_clip > 0.0).then_some(
                            savae_inference::ReverseClip {
                                norm: self.unrolled_clip,
                            },
                        ),
                    },
                    GradientKind::Implicit => SavaeGradient::Implicit(ImplicitGradient {
                        solve: savae_implicit::ShiftedSolve {
                            cg: savae_implicit::CgConfig {
                                max_iters: self.cg_iters,
                                tol: self.cg_tol,
                                ..Default::default()
                            },
                            damping: self.cg_damping,
                            retries: self.cg_retries,
                        },
                        hvp: self.hvp,
                        stationarity_tol: self.stationarity_tol,
                    }),
                },
                encoder_loss: self.encoder_loss,
            },
        }
    }

    /// The step settings at KL weight `beta`.
    pub fn step_config(&self, beta: f64) -> crate::step::StepConfig {
        crate::step::StepConfig {
            mode: self.mode(),
            beta,
            svi: self.svi_config(),
            passes: self.passes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_a_text_and_unset_options_a_word() {
        let img = TrainConfig::default();
        for s in SETTINGS {
            assert!(img.setting_text(s).is_some_and(|t| !t.is_empty()), "{s}");
        }
        assert_eq!(img.setting_text("hidden").unwrap(), "512,512");
        assert_eq!(img.setting_text("model").unwrap(), "vae");
        assert_eq!(img.setting_text("valid_examples").unwrap(), "2000");
        assert_eq!(img.setting_text("max_train_examples").unwrap(), "all");
        assert_eq!(img.setting_text("init_from").unwrap(), "none");
        let text = TrainConfig::defaults_for("ptb");
        assert_eq!(text.setting_text("valid_examples").unwrap(), "all");
        assert_eq!(text.setting_text("hidden").unwrap(), "256");
        assert_eq!(img.setting_text("no_such_setting"), None);
    }

    #[test]
    fn unrolled_clip_chooses_the_reverse_pass_and_is_checked() {
        use crate::step::{Mode, SavaeGradient};
        use savae_inference::ReverseClip;
        let mut cfg = TrainConfig {
            model: ModelKind::Savae,
            grad: GradientKind::Unrolled,
            ..TrainConfig::default()
        };
        let clip = |c: &TrainConfig| match c.mode() {
            Mode::Savae {
                gradient: SavaeGradient::Unrolled { reverse_clip },
                ..
            } => reverse_clip,
            other => panic!("{other:?}"),
        };
        assert_eq!(clip(&cfg), None, "0 (the default): the exact recursion");
        cfg.unrolled_clip = 5.0;
        assert_eq!(clip(&cfg), Some(ReverseClip { norm: 5.0 }));
        cfg.validate().unwrap();
        cfg.unrolled_clip = -1.0;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("unrolled_clip"), "{err}");
        // Checkpoints written before the setting existed resume with the exact recursion.
        let mut old = serde_json::to_value(TrainConfig::default()).unwrap();
        old.as_object_mut().unwrap().remove("unrolled_clip");
        let back: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(back.unrolled_clip, 0.0);
    }

    #[test]
    fn svi_clip_sets_sgds_per_example_clip_and_is_checked() {
        use savae_inference::SviOptimizer;
        let mut cfg = TrainConfig::default();
        let clip = |c: &TrainConfig| match c.svi_config().optimizer {
            SviOptimizer::Sgd { clip, .. } => clip,
            other => panic!("{other:?}"),
        };
        assert_eq!(clip(&cfg), 5.0);
        cfg.svi_clip = 28.0;
        assert_eq!(clip(&cfg), 28.0);
        cfg.svi_clip = 0.0;
        assert_eq!(clip(&cfg), f64::INFINITY, "0: no clip");
        cfg.svi_clip = f64::NAN;
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("svi_clip"), "{err}");
        let mut old = serde_json::to_value(TrainConfig::default()).unwrap();
        old.as_object_mut().unwrap().remove("svi_clip");
        let back: TrainConfig = serde_json::from_value(old).unwrap();
        assert_eq!(back.svi_clip, 5.0, "runs before the setting clipped at 5");
    }
}

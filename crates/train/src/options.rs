//! The option enums of a training run, declared once: each serializes (checkpoint
//! metadata, TOML settings) and parses on the command line (clap `ValueEnum`) under the
//! same lower-case name. The enums of the lower crates are re-exported here so that one
//! `use savae_train::options::*` names every choice a run has.

use serde::{Deserialize, Serialize};

pub use savae_implicit::HvpKind;
pub use savae_inference::{NewtonSolve, SviMethod};
pub use savae_model::{Activation, ModelKind, Passes};

/// How the SA-VAE loss is differentiated through the refinement (`savae` only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum GradientKind {
    /// The implicit function theorem at the refined optimum: one adjoint solve by CG.
    Implicit,
    /// Backpropagation through the K SGD steps (memory grows with K).
    Unrolled,
}

/// The noise of the outer loss of the refining modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OuterNoise {
    /// Draws independent of the refinement's: an unbiased estimate of −ELBO(λ*).
    Fresh,
    /// The draws λ* was refined on (biased upward; the behaviour of runs before the option).
    Same,
}

/// What trains the SA-VAE encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EncoderLoss {
    /// The loss at the refined λ*, through λ0: ∂L/∂φ = (∂L/∂λ0)ᵀ ∂λ0/∂φ (SA-VAE). With
    /// the implicit gradient ∂L/∂λ0 = γu, which vanishes as γ → 0 and is small wherever
    /// the refinement reaches an optimum that hardly depends on its start.
    Refined,
    /// The encoder's own ELBO at λ0 with the decoder held fixed, as in vae-svi: the
    /// encoder is trained to be a good posterior, the decoder by the loss at λ*.
    Amortized,
}

/// The floating-point type of the weights and of every computation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F64,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::F32 => candle_core::DType::F32,
            Self::F64 => candle_core::DType::F64,
        }
    }
}

/// How an exported (weights-only) checkpoint stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum StoredPrecision {
    /// The training precision (f32 or f64): the exported model is the trained one, bit
    /// for bit.
    AsTrained,
    /// IEEE half precision: half the size of f32; each weight rounded to 11 significant
    /// bits (relative error ≤ 2⁻¹¹), so evaluations move slightly. Loading converts back
    /// to the training precision.
    F16,
}

/// `Display` as the command-line (and serialized) name.
macro_rules! display_as_value_name {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                use clap::ValueEnum;
                match self.to_possible_value() {
                    Some(v) => f.write_str(v.get_name()),
                    None => write!(f, "{self:?}"),
                }
            }
        }
    )*};
}

display_as_value_name!(
    GradientKind,
    OuterNoise,
    EncoderLoss,
    Precision,
    StoredPrecision
);

/// A setting whose value is out of range, in terms of the setting's name (the TOML key,
/// e.g. `batch_size`); a front end renders it in its own terms (the CLI: `--batch-size`).
#[derive(Debug, Clone, PartialEq)]
pub struct SettingError {
    /// The field of [`crate::TrainConfig`].
    pub setting: &'static str,
    /// What is wrong, starting with the value or a verb ("must be at least 1 (got 0)").
    pub problem: String,
}

impl std::fmt::Display for SettingError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "setting {} {}", self.setting, self.problem)
    }
}

impl std::error::Error for SettingError {}

/// Fails with a [`SettingError`] of `setting` unless `ok`.
pub(crate) fn require(
    ok: bool,
    setting: &'static str,
    problem: impl Into<String>,
) -> Result<(), SettingError> {
    if ok {
        Ok(())
    } else {
        Err(SettingError {
            setting,
            problem: problem.into(),
        })
    }
}

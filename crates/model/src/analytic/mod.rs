//! Hand-derived derivatives in λ of the ELBO of a decoder with constant weights: the
//! value and gradient, Hessian-vector products at a fixed λ by a forward tangent pass
//! (the R-operator) and a reverse pass with second derivatives, and the mixed product
//! ∇_θ(vᵀ∇_λ f). What depends only on λ is computed once per point and reused by every
//! product (`../shared/design/second-order-passes.md`).
//!
//! [`latent`] is the part every decoder shares (z = μ + σ ⊙ ε and the KL term); [`mlp`]
//! is the Bernoulli MLP decoder, [`lstm`] the LSTM text decoder. [`DecoderElbo`] and
//! [`ElboPoint`] choose between them.

mod latent;
pub mod lstm;
pub mod mlp;

pub use lstm::{LstmElbo, LstmElboPoint};
pub use mlp::{MlpElbo, MlpElboPoint};

use anyhow::Result;
use candle_core::Tensor;

/// How the derivatives of the inner ELBO in λ are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Passes {
    /// Hand-derived passes (the MLP and the LSTM decoder with a latent).
    Analytic,
    /// candle's autograd (double backward for Hessian-vector products): the reference.
    Autograd,
}

impl Passes {
    pub fn name(self) -> &'static str {
        match self {
            Self::Analytic => "analytic",
            Self::Autograd => "autograd",
        }
    }
}

/// The inner ELBO of a decoder that has analytic passes.
pub enum DecoderElbo<'a> {
    Mlp(MlpElbo<'a>),
    Lstm(LstmElbo<'a>),
}

/// The ELBO at one λ, with (when asked for) what its products reuse.
pub enum ElboPoint {
    Mlp(MlpElboPoint),
    Lstm(LstmElboPoint),
}

impl DecoderElbo<'_> {
    /// The value and gradient at `lambda: [B, 2d]`, and with `for_hessian` what the
    /// products need.
    pub fn at(&self, lambda: &Tensor, for_hessian: bool) -> Result<ElboPoint> {
        Ok(match self {
            Self::Mlp(m) => ElboPoint::Mlp(m.at(lambda, for_hessian)?),
            Self::Lstm(l) => ElboPoint::Lstm(l.at(lambda, for_hessian)?),
        })
    }
}

impl ElboPoint {
    /// f_b(λ_b): `[B]`.
    pub fn values(&self) -> &Tensor {
        match self {
            Self::Mlp(p) => &p.values,
            Self::Lstm(p) => &p.values,
        }
    }

    /// ∇_λ Σ_b f_b: `[B, 2d]`.
    pub fn grad(&self) -> &Tensor {
        match self {
            Self::Mlp(p) => &p.grad,
            Self::Lstm(p) => &p.grad,
        }
    }

    /// H v for `v: [B, 2d]` (row b: the Hessian of f_b at λ_b times v_b).
    pub fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mlp(p) => p.hvp(v),
            Self::Lstm(p) => p.hvp(v),
        }
    }

    /// H v and the mixed product ∇_θ(vᵀ∇_λ f) for the decoder's parameters, in the
    /// order of its `decoder.*` parameters.
    pub fn hvp_and_mixed(&self, v: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        match self {
            Self::Mlp(p) => p.hvp_and_mixed(v),
            Self::Lstm(p) => p.hvp_and_mixed(v),
        }
    }
}

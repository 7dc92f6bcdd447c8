//! The evidence lower bound of a Gaussian posterior and a Bernoulli decoder.
//!
//! For one example x with λ = (μ, log σ²) ∈ R^{2d} and fixed noise ε_1..S:
//!   ELBO_S(λ) = (1/S) Σ_s log p(x | z_s) − β · KL(N(μ, σ²) ‖ N(0, I)),  z_s = μ + σ ⊙ ε_s,
//!   KL = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)   (analytic),
//!   log p(x | z) = Σ_pixels x·ℓ − softplus(ℓ),  ℓ = decoder logits.

use crate::activation::softplus;
use candle_core::{Tensor, D};

/// Per-example variational parameters `λ = (μ, log σ²)`, one row per example:
/// shape `[B, 2d]`, first half μ, second half log σ².
#[derive(Debug, Clone)]
pub struct VariationalParams(pub Tensor);

impl VariationalParams {
    pub fn latent_dim(&self) -> usize {
        self.0.dim(1).map(|n| n / 2).unwrap_or(0)
    }
    /// `μ: [B, d]`.
    pub fn mu(&self) -> candle_core::Result<Tensor> {
        let d = self.latent_dim();
        self.0.narrow(1, 0, d)
    }
    /// `log σ²: [B, d]`.
    pub fn logvar(&self) -> candle_core::Result<Tensor> {
        let d = self.latent_dim();
        self.0.narrow(1, d, d)
    }
    /// `z = μ + σ ⊙ ε` for `ε: [S, B, d]` → `[S, B, d]`.
    pub fn sample(&self, eps: &Noise) -> candle_core::Result<Tensor> {
        let std = (self.logvar()? * 0.5)?.exp()?;
        eps.0.broadcast_mul(&std)?.broadcast_add(&self.mu()?)
    }
}

/// Standard normal noise `ε: [S, B, d]`, held fixed during one refinement.
#[derive(Debug, Clone)]
pub struct Noise(pub Tensor);

impl Noise {
    /// The noise of the examples at `rows` (a `[r]` u32 tensor): `[S, r, d]`.
    pub fn select(&self, rows: &Tensor) -> candle_core::Result<Noise> {
        Ok(Noise(self.0.index_select(rows, 1)?))
    }
}

/// Per-example terms of the ELBO, each of shape `[B]`.
#[derive(Debug, Clone)]
pub struct ElboTerms {
    /// (1/S) Σ_s log p(x | z_s).
    pub log_lik: Tensor,
    /// KL(q ‖ p), unweighted.
    pub kl: Tensor,
    /// log_lik − β KL.
    pub elbo: Tensor,
}

/// Σ_pixels x·ℓ − softplus(ℓ): `logits: [..., P]`, `x` broadcastable → `[...]`.
pub fn bernoulli_log_lik(logits: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    (logits.broadcast_mul(x)? - softplus(logits)?)?.sum(D::Minus1)
}

/// Analytic KL(N(μ, σ²) ‖ N(0, I)) per example: `[B]`.
pub fn gaussian_kl(lambda: &VariationalParams) -> candle_core::Result<Tensor> {
    let mu = lambda.mu()?;
    let logvar = lambda.logvar()?;
    let terms = ((mu.sqr()? + logvar.exp()?)? - logvar)?;
    ((terms - 1.0)? * 0.5)?.sum(1)
}

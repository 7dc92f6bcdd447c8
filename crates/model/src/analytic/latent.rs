//! The part of the ELBO's derivatives in λ that every decoder shares: the
//! reparameterisation z_s = μ + σ ⊙ ε_s (σ = exp(ℓ/2)) and the KL term.
//!
//! A decoder supplies per draw the value log p(x | z_s), the gradient g_s = ∇_z log p and,
//! along a tangent z'_s, the product g'_s = ∇²_z log p · z'_s. With them:
//!   f(λ) = (1/S) Σ_s log p(x | z_s) − β KL(N(μ, σ²) ‖ N(0, I)),
//!   ∇_μ f = (1/S) Σ_s g_s − β μ,   ∇_ℓ f = (1/S) Σ_s g_s ⊙ ε_s σ/2 − β (e^ℓ − 1)/2,
//! and along v = (v_μ, v_ℓ), with z'_s = v_μ + ε_s σ/2 ⊙ v_ℓ:
//!   (Hv)_μ = (1/S) Σ_s g'_s − β v_μ,
//!   (Hv)_ℓ = (1/S) Σ_s [g'_s ⊙ ε_s σ/2 + g_s ⊙ ε_s σ/4 ⊙ v_ℓ] − β e^ℓ/2 ⊙ v_ℓ.

use crate::Noise;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// λ = (μ, ℓ) of a batch with its draws: what the value and gradient need.
pub(crate) struct Reparam {
    mu: Tensor,
    logvar: Tensor,
    /// e^ℓ: `[B, d]`.
    var: Tensor,
    /// ε σ/2: `[S, B, d]`.
    eps_half_sigma: Tensor,
    beta: f64,
    /// S, B, d.
    pub dims: (usize, usize, usize),
}

/// What the Hessian-vector products of a point keep from its reparameterisation.
pub(crate) struct LatentCurvature {
    /// ε σ/2: `[S, B, d]`.
    eps_half_sigma: Tensor,
    /// (1/S) Σ_s g_s ⊙ ε σ/4: `[B, d]`.
    gz_eps_quarter: Tensor,
    /// β e^ℓ/2: `[B, d]`.
    kl_logvar_curv: Tensor,
    beta: f64,
    /// S, B, d.
    pub dims: (usize, usize, usize),
}

impl Reparam {
    /// The draws z: `[S·B, d]` (sample-major) at `lambda: [B, 2d]` with `eps: [S, B, d]`.
    pub fn new(lambda: &Tensor, eps: &Noise, beta: f64) -> Result<(Self, Tensor)> {
        let (b, n2) = lambda.dims2()?;
        let d = n2 / 2;
        let (s, eb, ed) = eps.0.dims3()?;
        if eb != b || ed != d || n2 != 2 * d {
            bail!("noise of shape [{s}, {eb}, {ed}] for λ of shape [{b}, {n2}]");
        }
        let mu = lambda.narrow(1, 0, d)?;
        let logvar = lambda.narrow(1, d, d)?;
        let var = logvar.exp()?;
        let sigma = (&logvar * 0.5)?.exp()?;
        let z = eps.0.broadcast_mul(&sigma)?.broadcast_add(&mu)?;
        let eps_half_sigma = eps.0.broadcast_mul(&(&sigma * 0.5)?)?;
        let r = Self {
            mu,
            logvar,
            var,
            eps_half_sigma,
            beta,
            dims: (s, b, d),
        };
        Ok((r, z.reshape((s * b, d))?))
    }

    /// f_b = (1/S) Σ_s log p(x_b | z_sb) − β KL_b from `log_lik: [S, B]` → `[B]`.
    pub fn values(&self, log_lik: &Tensor) -> Result<Tensor> {
        let s = self.dims.0 as f64;
        let kl = ((((self.mu.sqr()? + &self.var)? - &self.logvar)? - 1.0)? * 0.5)?.sum(1)?;
        Ok(((log_lik.sum(0)? / s)? - (kl * self.beta)?)?)
    }

    /// ∇_λ Σ_b f_b: `[B, 2d]` from `gz: [S·B, d]`, and with `for_hessian` what the
    /// products need.
    pub fn grad(self, gz: &Tensor, for_hessian: bool) -> Result<(Tensor, Option<LatentCurvature>)> {
        let (s, b, d) = self.dims;
        let gz = gz.reshape((s, b, d))?;
        let grad_mu = ((gz.sum(0)? / s as f64)? - (&self.mu * self.beta)?)?;
        let gz_eps = ((&gz * &self.eps_half_sigma)?.sum(0)? / s as f64)?;
        let grad_logvar = (&gz_eps - ((&self.var - 1.0)? * (0.5 * self.beta))?)?;
        let grad = Tensor::cat(&[&grad_mu, &grad_logvar], 1)?;
        let curv = for_hessian
            .then(|| -> Result<LatentCurvature> {
                Ok(LatentCurvature {
                    eps_half_sigma: self.eps_half_sigma,
                    gz_eps_quarter: (gz_eps * 0.5)?,
                    kl_logvar_curv: (&self.var * (0.5 * self.beta))?,
                    beta: self.beta,
                    dims: self.dims,
                })
            })
            .transpose()?;
        Ok((grad, curv))
    }
}

impl LatentCurvature {
    /// z'_s = v_μ + ε_s σ/2 ⊙ v_ℓ: `[S·B, d]` for `v: [B, 2d]`.
    pub fn tangent(&self, v: &Tensor) -> Result<Tensor> {
        let (s, b, d) = self.dims;
        let zt = self
            .eps_half_sigma
            .broadcast_mul(&v.narrow(1, d, d)?)?
            .broadcast_add(&v.narrow(1, 0, d)?)?;
        Ok(zt.reshape((s * b, d))?)
    }

    /// H v: `[B, 2d]` from the decoder's g' = ∇²_z log p · z': `[S·B, d]`.
    pub fn hvp(&self, v: &Tensor, gzt: &Tensor) -> Result<Tensor> {
        let (s, b, d) = self.dims;
        let v_mu = v.narrow(1, 0, d)?;
        let v_lv = v.narrow(1, d, d)?;
        let gzt = gzt.reshape((s, b, d))?;
        let h_mu = ((gzt.sum(0)? / s as f64)? - (&v_mu * self.beta)?)?;
        let h_lv = ((((&gzt * &self.eps_half_sigma)?.sum(0)? / s as f64)?
            + (&self.gz_eps_quarter * &v_lv)?)?
            - (&self.kl_logvar_curv * &v_lv)?)?;
        Ok(Tensor::cat(&[&h_mu, &h_lv], 1)?)
    }
}

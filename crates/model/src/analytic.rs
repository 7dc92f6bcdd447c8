//! Hand-derived derivatives in λ of the ELBO of an MLP Bernoulli decoder with constant
//! weights: the value and gradient, and Hessian-vector products at a fixed λ by a
//! forward tangent pass (the R-operator) and a reverse pass with the activations'
//! second derivatives. What depends only on λ is computed once per point and reused by
//! every product (`../shared/design/second-order-passes.md`, the MLP section).
//!
//! Per example, with S fixed draws ε_s, σ = exp(ℓ/2), z_s = μ + σ ⊙ ε_s and the network
//! a_1 = z W_1ᵀ + b_1, h_i = φ(a_i), a_{i+1} = h_i W_{i+1}ᵀ + b_{i+1}, logits o = a_L:
//!   f(λ) = (1/S) Σ_s Σ_p [x_p o_sp − softplus(o_sp)] − β KL(N(μ, σ²) ‖ N(0, I)).
//! Reverse: δ_L = x − sigmoid(o), g_{h_{i−1}} = δ_i W_i, δ_i = g_{h_i} ⊙ φ'(a_i), g_z = g_{h_0}:
//!   ∇_μ f = (1/S) Σ_s g_z − β μ,   ∇_ℓ f = (1/S) Σ_s g_z ⊙ ε σ/2 − β (e^ℓ − 1)/2.
//! Along v = (v_μ, v_ℓ): z' = v_μ + ε σ/2 ⊙ v_ℓ, a'_1 = z' W_1ᵀ, h'_i = φ'(a_i) a'_i,
//! a'_{i+1} = h'_i W_{i+1}ᵀ; δ'_L = −s(1 − s) ⊙ o' (s = sigmoid(o)),
//! δ'_i = g'_{h_i} ⊙ φ'(a_i) + g_{h_i} ⊙ φ''(a_i) ⊙ a'_i, g'_{h_{i−1}} = δ'_i W_i:
//!   (Hv)_μ = (1/S) Σ_s g'_z − β v_μ,
//!   (Hv)_ℓ = (1/S) Σ_s [g'_z ⊙ ε σ/2 + g_z ⊙ ε σ/4 ⊙ v_ℓ] − β e^ℓ/2 ⊙ v_ℓ.
//! No weight gradient is formed: every matmul is one the math needs (two per layer for
//! the gradient, two more per product).

use crate::activation::softplus;
use crate::{Activation, Mlp, Noise};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// How the derivatives of the inner ELBO in λ are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Passes {
    /// Hand-derived passes where the decoder has them (the MLP), else autograd.
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

/// φ'(a) and φ''(a) of an activation, from its input `a` and output `h = φ(a)`.
fn derivatives(act: Activation, a: &Tensor, h: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
    Ok(match act {
        Activation::Softplus => {
            let s = candle_nn::ops::sigmoid(a)?;
            let d2 = (&s * (1.0 - &s)?)?;
            (s, Some(d2))
        }
        Activation::Tanh => {
            let d1 = (1.0 - h.sqr()?)?;
            let d2 = ((h * &d1)? * -2.0)?;
            (d1, Some(d2))
        }
        Activation::Relu => (a.gt(0.0)?.to_dtype(a.dtype())?, None),
        Activation::Elu => {
            // a > 0: φ = a, φ' = 1, φ'' = 0; a ≤ 0: φ = e^a − 1, φ' = φ'' = e^a = h + 1.
            let pos = a.gt(0.0)?;
            let e = (h + 1.0)?;
            let d1 = pos.where_cond(&e.ones_like()?, &e)?;
            let d2 = pos.where_cond(&e.zeros_like()?, &e)?;
            (d1, Some(d2))
        }
    })
}

/// The ELBO of a fixed MLP decoder as a function of λ (weights are constants).
pub struct MlpElbo<'a> {
    pub mlp: &'a Mlp,
    /// `x: [B, P]` (0/1).
    pub x: &'a Tensor,
    /// `ε: [S, B, d]`.
    pub eps: &'a Noise,
    pub beta: f64,
}

/// The ELBO at one λ with what its Hessian-vector products reuse.
pub struct MlpElboPoint {
    /// f_b(λ_b): `[B]`.
    pub values: Tensor,
    /// ∇_λ Σ_b f_b: `[B, 2d]`.
    pub grad: Tensor,
    /// Kept only when asked for (see [`MlpElbo::at`]).
    cache: Option<HessianCache>,
    beta: f64,
}

struct HessianCache {
    /// W_i per layer, `[out, in]`.
    weights: Vec<Tensor>,
    /// φ'(a_i) per hidden layer: `[N, H_i]`, N = S·B.
    dphi: Vec<Tensor>,
    /// g_{h_i} ⊙ φ''(a_i) per hidden layer (None where φ'' = 0).
    gh_d2phi: Vec<Option<Tensor>>,
    /// s(1 − s) of the logits: `[N, P]`.
    sig_var: Tensor,
    /// ε σ/2: `[S, B, d]`.
    eps_half_sigma: Tensor,
    /// (1/S) Σ_s g_z ⊙ ε σ/4: `[B, d]`.
    gz_eps_quarter: Tensor,
    /// β e^ℓ/2: `[B, d]`.
    kl_logvar_curv: Tensor,
    /// S, B, d.
    dims: (usize, usize, usize),
}

impl<'a> MlpElbo<'a> {
    /// The value and gradient at `lambda: [B, 2d]`, and with `for_hessian` what
    /// [`MlpElboPoint::hvp`] needs.
    pub fn at(&self, lambda: &Tensor, for_hessian: bool) -> Result<MlpElboPoint> {
        let (b, n2) = lambda.dims2()?;
        let d = n2 / 2;
        let (s, eb, ed) = self.eps.0.dims3()?;
        if eb != b || ed != d {
            bail!("noise of shape [{s}, {eb}, {ed}] for λ of shape [{b}, {n2}]");
        }
        let mu = lambda.narrow(1, 0, d)?;
        let logvar = lambda.narrow(1, d, d)?;
        let var = logvar.exp()?;
        let sigma = (&logvar * 0.5)?.exp()?;
        let z = self.eps.0.broadcast_mul(&sigma)?.broadcast_add(&mu)?;
        let n = s * b;
        // Forward, keeping a_i and h_i of the hidden layers.
        let layers = &self.mlp.layers;
        let last = layers.len() - 1;
        let mut h = z.reshape((n, d))?;
        let mut pre = Vec::with_capacity(last);
        let mut post = Vec::with_capacity(last);
        for layer in &layers[..last] {
            let a = layer.forward(&h)?;
            h = self.mlp.activation.apply(&a)?;
            pre.push(a);
            post.push(h.clone());
        }
        let logits = layers[last].forward(&h)?;
        let p = logits.dim(1)?;
        let o = logits.reshape((s, b, p))?;
        let log_lik = ((o.broadcast_mul(self.x)? - softplus(&o)?)?
            .sum(D::Minus1)?
            .sum(0)?
            / s as f64)?;
        let kl = ((((mu.sqr()? + &var)? - &logvar)? - 1.0)? * 0.5)?.sum(1)?;
        let values = (&log_lik - (&kl * self.beta)?)?;
        // Reverse.
        let sig = candle_nn::ops::sigmoid(&logits)?;
        let delta = (self.x.broadcast_sub(&sig.reshape((s, b, p))?)?).reshape((n, p))?;
        let mut gh = delta.matmul(&layers[last].weight)?;
        let mut dphi = Vec::with_capacity(last);
        let mut gh_d2phi = Vec::with_capacity(last);
        for i in (0..last).rev() {
            let (d1, d2) = derivatives(self.mlp.activation, &pre[i], &post[i])?;
            if for_hessian {
                gh_d2phi.push(d2.map(|d2| &gh * d2).transpose()?);
            }
            let delta_i = (&gh * &d1)?;
            if for_hessian {
                dphi.push(d1);
            }
            gh = delta_i.matmul(&layers[i].weight)?;
        }
        dphi.reverse();
        gh_d2phi.reverse();
        let gz = gh.reshape((s, b, d))?;
        let eps_half_sigma = self.eps.0.broadcast_mul(&(&sigma * 0.5)?)?;
        let grad_mu = ((gz.sum(0)? / s as f64)? - (&mu * self.beta)?)?;
        let gz_eps = ((&gz * &eps_half_sigma)?.sum(0)? / s as f64)?;
        let grad_logvar = (&gz_eps - ((&var - 1.0)? * (0.5 * self.beta))?)?;
        let grad = Tensor::cat(&[&grad_mu, &grad_logvar], 1)?;
        let cache = if for_hessian {
            Some(HessianCache {
                weights: layers.iter().map(|l| l.weight.clone()).collect(),
                dphi,
                gh_d2phi,
                sig_var: (&sig * (1.0 - &sig)?)?,
                eps_half_sigma,
                gz_eps_quarter: (gz_eps * 0.5)?,
                kl_logvar_curv: (&var * (0.5 * self.beta))?,
                dims: (s, b, d),
            })
        } else {
            None
        };
        Ok(MlpElboPoint {
            values,
            grad,
            cache,
            beta: self.beta,
        })
    }
}

impl MlpElboPoint {
    /// H v for `v: [B, 2d]` (row b: the Hessian of f_b at λ_b times v_b). Needs a point
    /// made with `for_hessian`.
    pub fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        let Some(c) = &self.cache else {
            bail!("this ELBO point was evaluated without its Hessian cache");
        };
        let (s, b, d) = c.dims;
        let n = s * b;
        let v_mu = v.narrow(1, 0, d)?;
        let v_lv = v.narrow(1, d, d)?;
        // Forward tangent.
        let zt = c
            .eps_half_sigma
            .broadcast_mul(&v_lv)?
            .broadcast_add(&v_mu)?;
        let last = c.weights.len() - 1;
        let mut ht = zt.reshape((n, d))?;
        let mut at = Vec::with_capacity(last);
        for i in 0..last {
            let a = ht.matmul(&c.weights[i].t()?)?;
            ht = (&a * &c.dphi[i])?;
            at.push(a);
        }
        let ot = ht.matmul(&c.weights[last].t()?)?;
        // Reverse tangent.
        let delta = (ot * &c.sig_var)?.neg()?;
        let mut gh = delta.matmul(&c.weights[last])?;
        for i in (0..last).rev() {
            let mut delta_i = (&gh * &c.dphi[i])?;
            if let Some(k) = &c.gh_d2phi[i] {
                delta_i = (delta_i + (k * &at[i])?)?;
            }
            gh = delta_i.matmul(&c.weights[i])?;
        }
        let gzt = gh.reshape((s, b, d))?;
        let h_mu = ((gzt.sum(0)? / s as f64)? - (&v_mu * self.beta)?)?;
        let h_lv = ((((&gzt * &c.eps_half_sigma)?.sum(0)? / s as f64)?
            + (&c.gz_eps_quarter * &v_lv)?)?
            - (&c.kl_logvar_curv * &v_lv)?)?;
        Ok(Tensor::cat(&[&h_mu, &h_lv], 1)?)
    }
}

//! The MLP Bernoulli decoder's passes: the value and gradient, and Hessian-vector
//! products at a fixed λ by a forward tangent pass (the R-operator) and a reverse pass
//! with the activations' second derivatives (`../shared/design/second-order-passes.md`,
//! the MLP section); the λ part is [`super::latent`].
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
//! No weight gradient is formed for these: every matmul is one the math needs (two per
//! layer for the gradient, two more per product).
//!
//! The mixed product ∇_θ(vᵀ∇_λ f) (the decoder's term of the implicit gradient, and of
//! each step of the unrolled backward) is, by the symmetry of mixed partials, the tangent
//! of the weight gradient along v: with δ_i = ∂(S·f)/∂a_i and h_0 = z,
//!   ∂f/∂W_i = (1/S) Σ_n δ_iᵀ h_{i−1}  ⇒  mixed_{W_i} = (1/S) Σ_n (δ'_iᵀ h_{i−1} + δ_iᵀ h'_{i−1}),
//!   mixed_{b_i} = (1/S) Σ_n δ'_i,
//! from the tangents the product already computes (two more matmuls per layer).

use super::latent::{LatentCurvature, Reparam};
use crate::kernels::bernoulli_terms;
use crate::{Activation, Mlp, Noise};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// φ''(a) (None where it is 0) of an activation from its input `a`, output `h = φ(a)`
/// and derivative `d1 = φ'(a)` (the taped forward's).
fn second_derivative(
    act: Activation,
    a: &Tensor,
    h: &Tensor,
    d1: &Tensor,
) -> Result<Option<Tensor>> {
    Ok(match act {
        Activation::Softplus => Some((d1 * (1.0 - d1)?)?),
        Activation::Tanh => Some(((h * d1)? * -2.0)?),
        Activation::Relu => None,
        // a > 0: φ'' = 0; a ≤ 0: φ'' = eᵃ = h + 1.
        Activation::Elu => {
            let e = (h + 1.0)?;
            Some(a.gt(0.0)?.where_cond(&e.zeros_like()?, &e)?)
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
    latent: LatentCurvature,
    /// The input of each layer (h_0 = z, h_1, …, h_{L−1}): `[N, in_i]`.
    inputs: Vec<Tensor>,
    /// δ_i = ∂(S·f)/∂a_i of each layer (the last: x − sigmoid(o)): `[N, out_i]`.
    deltas: Vec<Tensor>,
}

impl<'a> MlpElbo<'a> {
    /// [`MlpElbo::at`] for the examples `start .. start + len` alone (`lambda` holds
    /// their rows).
    pub fn rows_at(
        &self,
        start: usize,
        len: usize,
        lambda: &Tensor,
        for_hessian: bool,
    ) -> Result<MlpElboPoint> {
        let x = self.x.narrow(0, start, len)?;
        let eps = Noise(self.eps.0.narrow(1, start, len)?);
        MlpElbo {
            x: &x,
            eps: &eps,
            ..*self
        }
        .at(lambda, for_hessian)
    }

    /// The value and gradient at `lambda: [B, 2d]`, and with `for_hessian` what
    /// [`MlpElboPoint::hvp`] needs.
    pub fn at(&self, lambda: &Tensor, for_hessian: bool) -> Result<MlpElboPoint> {
        let (reparam, z) = Reparam::new(lambda, self.eps, self.beta)?;
        let (s, b, _) = reparam.dims;
        // Forward, keeping each layer's input (z, h_1, …), and the a_i and φ'(a_i) of the
        // hidden layers.
        let layers = &self.mlp.layers;
        let last = layers.len() - 1;
        let (logits, tape) = self.mlp.forward_taped(&z)?;
        let (pre, inputs, first) = (tape.pre, tape.inputs, tape.dphi);
        let terms = bernoulli_terms(&logits, self.x, for_hessian)?;
        let values = reparam.values(&terms.log_lik.reshape((s, b))?)?;
        // Reverse.
        let delta = terms.delta;
        let mut gh = delta.matmul(&layers[last].weight)?;
        let mut dphi = Vec::with_capacity(last);
        let mut gh_d2phi = Vec::with_capacity(last);
        let mut deltas = vec![delta];
        for i in (0..last).rev() {
            let d1 = first[i].clone();
            let d2 = if for_hessian {
                second_derivative(self.mlp.activation, &pre[i], &inputs[i + 1], &d1)?
            } else {
                None
            };
            if for_hessian {
                gh_d2phi.push(d2.map(|d2| &gh * d2).transpose()?);
            }
            let delta_i = (&gh * &d1)?;
            if for_hessian {
                dphi.push(d1);
                deltas.push(delta_i.clone());
            }
            gh = delta_i.matmul(&layers[i].weight)?;
        }
        dphi.reverse();
        gh_d2phi.reverse();
        deltas.reverse();
        let (grad, latent) = reparam.grad(&gh, for_hessian)?;
        let cache = match (latent, terms.sig_var) {
            (Some(latent), Some(sig_var)) => Some(HessianCache {
                weights: layers.iter().map(|l| l.weight.clone()).collect(),
                dphi,
                gh_d2phi,
                sig_var,
                latent,
                inputs,
                deltas,
            }),
            _ => None,
        };
        Ok(MlpElboPoint {
            values,
            grad,
            cache,
        })
    }
}

impl MlpElboPoint {
    /// ∇_θ Σ_b f_b for the decoder's parameters (weight, bias of each layer, in order):
    /// ∂/∂W_i = (1/S) Σ_n δ_iᵀ h_{i−1}, ∂/∂b_i = (1/S) Σ_n δ_i. Needs a point made with
    /// `for_hessian` (which keeps δ_i and the layer inputs).
    pub fn weight_grads(&self) -> Result<Vec<Tensor>> {
        let Some(c) = &self.cache else {
            bail!("this ELBO point was evaluated without its cache");
        };
        let inv_s = 1.0 / c.latent.dims.0 as f64;
        let mut out = Vec::with_capacity(2 * c.deltas.len());
        for (delta, input) in c.deltas.iter().zip(&c.inputs) {
            out.push((delta.t()?.matmul(input)? * inv_s)?);
            out.push((delta.sum(0)? * inv_s)?);
        }
        Ok(out)
    }

    /// H v for `v: [B, 2d]` (row b: the Hessian of f_b at λ_b times v_b). Needs a point
    /// made with `for_hessian`.
    pub fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        Ok(self.products(v, false)?.0)
    }

    /// H v and the mixed product ∇_θ(vᵀ∇_λ f) for the decoder's parameters, in the
    /// order weight, bias of each layer (`decoder.layers.{i}.weight|bias`).
    pub fn hvp_and_mixed(&self, v: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.products(v, true)
    }

    fn products(&self, v: &Tensor, mixed: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let Some(c) = &self.cache else {
            bail!("this ELBO point was evaluated without its Hessian cache");
        };
        let s = c.latent.dims.0;
        // Forward tangent: a'_i and h'_{i−1} (the tangent of each layer's input).
        let last = c.weights.len() - 1;
        let mut ht = c.latent.tangent(v)?;
        let mut at = Vec::with_capacity(last);
        let mut input_t = Vec::with_capacity(last + 1);
        for i in 0..last {
            let a = ht.matmul(&c.weights[i].t()?)?;
            input_t.push(ht);
            ht = (&a * &c.dphi[i])?;
            at.push(a);
        }
        let ot = ht.matmul(&c.weights[last].t()?)?;
        input_t.push(ht);
        // Reverse tangent: δ'_i, and the mixed product from δ'_i, δ_i and the inputs.
        let inv_s = 1.0 / s as f64;
        let mut grads = Vec::new();
        let mut delta_t = (ot * &c.sig_var)?.neg()?;
        for i in (0..=last).rev() {
            if i < last {
                let gh = delta_t.matmul(&c.weights[i + 1])?;
                let mut dt = (&gh * &c.dphi[i])?;
                if let Some(k) = &c.gh_d2phi[i] {
                    dt = (dt + (k * &at[i])?)?;
                }
                delta_t = dt;
            }
            if mixed {
                let w =
                    (delta_t.t()?.matmul(&c.inputs[i])? + c.deltas[i].t()?.matmul(&input_t[i])?)?;
                grads.push(((w * inv_s)?, (delta_t.sum(0)? * inv_s)?));
            }
        }
        let hv = c.latent.hvp(v, &delta_t.matmul(&c.weights[0])?)?;
        Ok((
            hv,
            grads.into_iter().rev().flat_map(|(w, b)| [w, b]).collect(),
        ))
    }
}

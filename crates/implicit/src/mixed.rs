//! The mixed second derivative ∇_θ(uᵀ ∇_λ f(λ; θ)) for model parameters θ.

use crate::autodiff::grads_of_dot;
use crate::{row_norms, ValueGrad};
use anyhow::Result;
use candle_core::Tensor;

/// By double backward through a gradient with its graph kept: returns one gradient per
/// entry of `params` (zeros where θ does not reach ∇_λ f).
pub fn mixed_product_exact(vg: &ValueGrad, u: &Tensor, params: &[&Tensor]) -> Result<Vec<Tensor>> {
    grads_of_dot(&vg.grad, &u.detach(), params)
}

/// By central differences of ∇_θ Σ f along u:
/// (∇_θ f(λ + h u) − ∇_θ f(λ − h u)) / 2h with one step h = rel · (1 + rms λ) / rms u
/// for the whole batch (∇_θ sums over examples, so h cannot differ between them).
pub fn mixed_product_fd(
    theta_grad_fn: impl Fn(&Tensor) -> Result<Vec<Tensor>>,
    lambda: &Tensor,
    u: &Tensor,
    rel_step: f64,
) -> Result<Vec<Tensor>> {
    let rms = |t: &Tensor| -> Result<f64> {
        let n = row_norms(t)?;
        let cnt = t.elem_count().max(1) as f64;
        Ok((n.iter().map(|x| x * x).sum::<f64>() / cnt).sqrt())
    };
    let u_rms = rms(u)?;
    if u_rms == 0.0 {
        return theta_grad_fn(lambda)?
            .iter()
            .map(|g| Ok(g.zeros_like()?))
            .collect();
    }
    let h = rel_step * (1.0 + rms(lambda)?) / u_rms;
    let step = (u * h)?;
    let plus = theta_grad_fn(&(lambda + &step)?)?;
    let minus = theta_grad_fn(&(lambda - &step)?)?;
    plus.iter()
        .zip(&minus)
        .map(|(p, m)| Ok(((p - m)? * (0.5 / h))?))
        .collect()
}

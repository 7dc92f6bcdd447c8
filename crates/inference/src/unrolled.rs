//! Reverse-mode differentiation through the K steps of SGD with momentum
//! (Algorithm 1 of Kim et al. 2018, with exact Hessian-vector products).
//!
//! Forward (see [`crate::svi`]): m_{k+1} = μ m_k + s c_k ∇F(λ_k), λ_{k+1} = λ_k + α m_{k+1},
//! with ∇F(λ) = ∇f(λ; θ) − γ(λ − λ0) and c_k the per-example clip scale (held constant in
//! the backward pass, exact whenever clipping is inactive). Backward, from λ̄ = ∂L/∂λ_K,
//! m̄ = 0, for k = K−1 … 0:
//!   m̄ += α λ̄;   w = s c_k ⊙ m̄;
//!   λ̄ += H_f(λ_k) w − γ w;   λ̄0 += γ w;   θ̄ += ∇_θ(wᵀ ∇_λ f(λ_k; θ));   m̄ = μ m̄.
//! The gradient for the encoder is λ̄ + λ̄0 (λ_0 = λ0). Memory holds the K iterates
//! λ_k, so it grows with K.

use crate::{Refinement, SviConfig, SviOptimizer};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// λ ↦ w ↦ (H_f(λ) w, ∇_θ(wᵀ∇_λ f(λ; θ)) for each θ tensor).
pub type SecondOrderFn<'a> = dyn Fn(&Tensor, &Tensor) -> Result<(Tensor, Vec<Tensor>)> + 'a;

/// Gradients of the outer loss through the unrolled refinement.
#[derive(Debug, Clone)]
pub struct UnrolledGrad {
    /// ∂L/∂λ0 (through every step): `[B, n]`.
    pub lambda0_grad: Tensor,
    /// The contributions to ∂L/∂θ through the refinement path (to be added to ∂_θ L).
    pub theta_grads: Vec<Tensor>,
}

/// Runs the backward recursion. `theta_zeros` gives the shapes of θ's gradients.
pub fn unrolled_backward(
    second_order: &SecondOrderFn<'_>,
    refinement: &Refinement,
    lambda_bar: &Tensor,
    cfg: &SviConfig,
    theta_zeros: Vec<Tensor>,
) -> Result<UnrolledGrad> {
    let SviOptimizer::Sgd { lr, momentum, .. } = cfg.optimizer else {
        bail!("the unrolled gradient needs --svi-optimizer sgd (Adam's recursion is not unrolled)");
    };
    let Some(path) = refinement.path.as_ref() else {
        bail!("internal: the refinement did not record its path (keep_path = false)");
    };
    let scale = 1.0 / cfg.batch_size.max(1) as f64;
    let mut lbar = lambda_bar.clone();
    let mut mbar = lbar.zeros_like()?;
    let mut l0bar = lbar.zeros_like()?;
    let mut theta = theta_zeros;
    for (lambda_k, clip) in path.iter().rev() {
        mbar = (&mbar + (&lbar * lr)?)?;
        let w = mbar.broadcast_mul(&(clip * scale)?)?;
        let (hw, tg) = second_order(lambda_k, &w)?;
        lbar = (&lbar + hw)?;
        if cfg.prox > 0.0 {
            let gw = (&w * cfg.prox)?;
            lbar = (&lbar - &gw)?;
            l0bar = (&l0bar + &gw)?;
        }
        for (acc, g) in theta.iter_mut().zip(tg) {
            *acc = (&*acc + g)?;
        }
        mbar = (&mbar * momentum)?;
    }
    Ok(UnrolledGrad {
        lambda0_grad: (lbar + l0bar)?,
        theta_grads: theta,
    })
}

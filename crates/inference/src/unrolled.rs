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
//!
//! Where a step of the forward pass is unstable (α s ‖H_f‖ above about 1 + μ, e.g. a
//! sharply curved text ELBO at small batch-mean steps), the exact recursion multiplies λ̄
//! by about α s ‖H_f‖ per step and explodes with K: on PTB at K = 10 the model
//! gradient's norm reached 10³–10⁶ on most batches of an epoch. SA-VAE's code caps the
//! reverse pass at every step (`optim_n2n.py`: λ̄ and the step's θ term, each to norm 5);
//! [`ReverseClip`] does the same, λ̄ per example (so that no example's gradient depends on
//! the others of its batch, as in the forward clip) and the step's θ term as a whole. The
//! result is then a bounded surrogate of the gradient, not the gradient.

use crate::svi::clip_scales;
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

/// Norm caps of the reverse pass, applied after every reverse step k: each example's λ̄_b
/// to at most `norm`, and the step's contribution ∇_θ(wᵀ∇_λ f(λ_k; θ)) (all θ tensors
/// together) to at most `norm`. SA-VAE's code uses 5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReverseClip {
    pub norm: f64,
}

/// Runs the backward recursion, exact (`reverse_clip` = None) or capped at every reverse step.
/// `theta_zeros` gives the shapes of θ's gradients.
pub fn unrolled_backward(
    second_order: &SecondOrderFn<'_>,
    refinement: &Refinement,
    lambda_bar: &Tensor,
    cfg: &SviConfig,
    reverse_clip: Option<ReverseClip>,
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
        let (hw, mut tg) = second_order(lambda_k, &w)?;
        lbar = (&lbar + hw)?;
        if cfg.prox > 0.0 {
            let gw = (&w * cfg.prox)?;
            lbar = (&lbar - &gw)?;
            l0bar = (&l0bar + &gw)?;
        }
        if let Some(ReverseClip { norm }) = reverse_clip {
            lbar = clip_rows(&lbar, norm)?;
            tg = clip_together(tg, norm)?;
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

/// Each row of `x` `[B, n]` scaled to norm at most `norm` (the forward clip's rule).
fn clip_rows(x: &Tensor, norm: f64) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_mul(&clip_scales(&n, norm)?)?)
}

/// The tensors scaled together to global norm at most `norm`.
fn clip_together(ts: Vec<Tensor>, norm: f64) -> Result<Vec<Tensor>> {
    let mut sq = 0.0;
    for t in &ts {
        sq += t
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let total = sq.sqrt();
    if total <= norm {
        return Ok(ts);
    }
    let c = norm / total;
    Ok(ts
        .into_iter()
        .map(|t| t * c)
        .collect::<candle_core::Result<Vec<_>>>()?)
}

//! The adjoint solve of the implicit gradient, with its fallback for failed examples.
//!
//! Solve ((γ + δ) I − H) u = g per example with batched CG. Fallback, per example whose
//! solve failed (negative curvature or non-finite): retry with ten times more damping,
//! up to `retries` times (δ_r = 10^r (γ + δ)); an example that still fails gets the
//! steepest-descent approximation u = g / (γ + δ_r) (H taken as 0), and is counted in
//! [`AdjointSolution::fallbacks`]. Examples the caller marks as untrusted (their inner
//! problem is not stationary, so the implicit function theorem does not apply) skip the
//! solve and take that fallback directly: ∂L/∂λ0 = γ/(γ+δ) g, i.e. the refinement is
//! treated as the identity. Fallback examples contribute no mixed term (see
//! [`AdjointSolution::u_solved`]). No example ever returns a zero or NaN u silently.

use crate::{
    batched_cg, column,
    operator::{BatchedOperator, ShiftedNegHessian},
    CgConfig, CgReport,
};
use anyhow::Result;
use candle_core::Tensor;

/// Result of [`solve_adjoint`].
#[derive(Debug, Clone)]
pub struct AdjointSolution {
    /// u = ((γ + δ)I − H)⁻¹ g: `[B, n]`.
    pub u: Tensor,
    /// ∂L/∂λ0 = γ u: `[B, n]`.
    pub lambda0_grad: Tensor,
    /// The first solve's per-example report.
    pub report: CgReport,
    /// Examples re-solved with more damping.
    pub retried: usize,
    /// Examples that ended on the steepest-descent fallback.
    pub fallbacks: usize,
    /// Examples skipped because the caller did not trust their optimum.
    pub untrusted: usize,
    /// u with the rows of fallback examples (untrusted or failed) set to zero: use it for
    /// the mixed term ∇_θ(uᵀ∇_λ f), which has no meaning away from an optimum (there it
    /// pushes θ to grow ‖∇_λ f‖ and feeds back into divergence).
    pub u_solved: Tensor,
}

/// How the shifted system ((γ + δ) I − H) u = g is solved: by batched CG, with damping δ
/// and up to `retries` re-solves of failed examples at ten times the shift each.
/// The adjoint of the implicit gradient and the Newton refinement use the same solve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShiftedSolve {
    pub cg: CgConfig,
    /// δ ≥ 0, added to γ.
    pub damping: f64,
    /// Damped re-solves before the steepest-descent fallback (0: fall back at once).
    pub retries: usize,
}

/// Solves ((γ + δ) I − H) u = g for `g: [B, n]` with Hessian-vector products `hvp`;
/// examples marked in `untrusted` (missing entries: trusted) skip the solve.
pub fn solve_adjoint(
    hvp: &dyn BatchedOperator,
    g: &Tensor,
    gamma: f64,
    solve: &ShiftedSolve,
    untrusted: &[bool],
) -> Result<AdjointSolution> {
    let (cfg, retries) = (&solve.cg, solve.retries);
    let shift = gamma + solve.damping;
    let op = ShiftedNegHessian { hvp, shift };
    let nb = g.dim(0)?;
    let skip: Vec<bool> = (0..nb)
        .map(|i| untrusted.get(i).copied().unwrap_or(false))
        .collect();
    let n_untrusted = skip.iter().filter(|&&s| s).count();
    let rhs = if n_untrusted > 0 {
        let keep: Vec<f64> = skip.iter().map(|&s| if s { 0.0 } else { 1.0 }).collect();
        g.broadcast_mul(&column(&keep, g)?)?
    } else {
        g.clone()
    };
    let (mut u, report) = batched_cg(&op, &rhs, cfg)?;
    let mut failed: Vec<bool> = report.status.iter().map(|s| s.failed()).collect();
    let retried = if retries > 0 {
        failed.iter().filter(|&&f| f).count()
    } else {
        0
    };
    let mut last_shift = shift;
    let base = if shift > 0.0 { shift } else { 1.0 };
    for r in 1..=retries {
        if !failed.iter().any(|&f| f) {
            break;
        }
        last_shift = base * 10f64.powi(r as i32);
        let keep: Vec<f64> = failed.iter().map(|&f| f as u8 as f64).collect();
        let rhs = g.broadcast_mul(&column(&keep, g)?)?;
        let op = ShiftedNegHessian {
            hvp,
            shift: last_shift,
        };
        let (ur, rep) = batched_cg(&op, &rhs, cfg)?;
        u = (&u + ur.broadcast_mul(&column(&keep, g)?)?)?;
        for (f, st) in failed.iter_mut().zip(&rep.status) {
            if *f && !st.failed() {
                *f = false;
            }
        }
    }
    let fallbacks = failed.iter().filter(|&&f| f).count();
    let keep: Vec<f64> = (0..nb)
        .map(|i| if skip[i] || failed[i] { 0.0 } else { 1.0 })
        .collect();
    let u_solved = u.broadcast_mul(&column(&keep, g)?)?;
    if fallbacks + n_untrusted > 0 {
        let w: Vec<f64> = (0..nb)
            .map(|i| {
                if skip[i] {
                    1.0 / base
                } else if failed[i] {
                    1.0 / last_shift
                } else {
                    0.0
                }
            })
            .collect();
        u = (&u + g.broadcast_mul(&column(&w, g)?)?)?;
    }
    let lambda0_grad = (&u * gamma)?;
    Ok(AdjointSolution {
        u,
        lambda0_grad,
        report,
        retried,
        fallbacks,
        untrusted: n_untrusted,
        u_solved,
    })
}

//! Batched conjugate gradient for block-diagonal systems `A_b x_b = b_b`, b = 1..B.
//!
//! All examples iterate together (one operator call per iteration applies every block),
//! each with its own α_b = r_bᵀr_b / p_bᵀA_b p_b and β_b = r'_bᵀr'_b / r_bᵀr_b. An
//! example stops on its own: converged (‖r_b‖ ≤ tol·‖b_b‖), negative curvature
//! (p_bᵀA_b p_b ≤ 0: A_b is not positive definite), or non-finite arithmetic; the others
//! carry on unaffected. Examples still running after `max_iters` end as `MaxIterations`
//! with their current iterate and residual reported.

use crate::{column, operator::BatchedOperator, row_dot};
use anyhow::Result;
use candle_core::Tensor;

/// CG settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgConfig {
    /// Iteration limit.
    pub max_iters: usize,
    /// Relative residual tolerance ‖r_b‖ ≤ tol · ‖b_b‖.
    pub tol: f64,
}

impl Default for CgConfig {
    fn default() -> Self {
        Self {
            max_iters: 20,
            tol: 1e-5,
        }
    }
}

/// How one example's solve ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgStatus {
    Converged,
    MaxIterations,
    NegativeCurvature,
    NonFinite,
}

impl CgStatus {
    /// Whether the iterate is unusable (the caller must fall back).
    pub fn failed(self) -> bool {
        matches!(self, Self::NegativeCurvature | Self::NonFinite)
    }
}

/// Per-example outcome of a batched solve.
#[derive(Debug, Clone)]
pub struct CgReport {
    pub status: Vec<CgStatus>,
    pub iterations: Vec<usize>,
    /// Final relative residual ‖r_b‖ / ‖b_b‖ (0 when b_b = 0).
    pub residual: Vec<f64>,
}

impl CgReport {
    pub fn count(&self, s: CgStatus) -> usize {
        self.status.iter().filter(|&&x| x == s).count()
    }
    pub fn failures(&self) -> usize {
        self.status.iter().filter(|s| s.failed()).count()
    }
    pub fn mean_iterations(&self) -> f64 {
        self.iterations.iter().sum::<usize>() as f64 / self.iterations.len().max(1) as f64
    }
    pub fn max_iterations(&self) -> usize {
        self.iterations.iter().copied().max().unwrap_or(0)
    }
    pub fn max_residual(&self) -> f64 {
        self.residual
            .iter()
            .copied()
            .filter(|r| r.is_finite())
            .fold(0.0, f64::max)
    }
}

fn mask_rows(mask: &[bool], like: &Tensor) -> Result<Tensor> {
    let m: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
    Ok(Tensor::from_vec(m, (mask.len(), 1), like.device())?
        .broadcast_as(like.shape())?
        .contiguous()?)
}

/// Solves `A x = b` for `b: [B, n]`; returns `x: [B, n]` and the report. Rows that fail
/// are returned as zeros (never NaN) with their status set: the caller decides.
pub fn batched_cg(
    op: &dyn BatchedOperator,
    b: &Tensor,
    cfg: &CgConfig,
) -> Result<(Tensor, CgReport)> {
    let nb = b.dim(0)?;
    let mut x = b.zeros_like()?;
    let mut r = b.clone();
    let mut p = b.clone();
    let mut rs = row_dot(&r, &r)?;
    let bnorm: Vec<f64> = rs.iter().map(|v| v.sqrt()).collect();
    let mut status = vec![CgStatus::MaxIterations; nb];
    let mut active = vec![false; nb];
    for i in 0..nb {
        if !bnorm[i].is_finite() {
            status[i] = CgStatus::NonFinite;
        } else if bnorm[i] == 0.0 {
            status[i] = CgStatus::Converged;
        } else {
            active[i] = true;
        }
    }
    let mut iterations = vec![0usize; nb];
    for _ in 0..cfg.max_iters {
        if !active.iter().any(|&a| a) {
            break;
        }
        let ap = op.apply(&p)?;
        let pap = row_dot(&p, &ap)?;
        let mut alpha = vec![0.0; nb];
        for i in 0..nb {
            if !active[i] {
                continue;
            }
            if !pap[i].is_finite() {
                status[i] = CgStatus::NonFinite;
                active[i] = false;
            } else if pap[i] <= 0.0 {
                status[i] = CgStatus::NegativeCurvature;
                active[i] = false;
            } else {
                alpha[i] = rs[i] / pap[i];
            }
        }
        let mask = mask_rows(&active, b)?;
        let acol = column(&alpha, b)?;
        x = mask.where_cond(&(&x + p.broadcast_mul(&acol)?)?, &x)?;
        r = mask.where_cond(&(&r - ap.broadcast_mul(&acol)?)?, &r)?;
        let rs_new = row_dot(&r, &r)?;
        let mut beta = vec![0.0; nb];
        for i in 0..nb {
            if !active[i] {
                continue;
            }
            iterations[i] += 1;
            if !rs_new[i].is_finite() {
                status[i] = CgStatus::NonFinite;
                active[i] = false;
            } else if rs_new[i].sqrt() <= cfg.tol * bnorm[i] {
                status[i] = CgStatus::Converged;
                active[i] = false;
            } else {
                beta[i] = rs_new[i] / rs[i];
            }
            rs[i] = rs_new[i];
        }
        let mask = mask_rows(&active, b)?;
        let pnew = (&r + p.broadcast_mul(&column(&beta, b)?)?)?;
        p = mask.where_cond(&pnew, &p.zeros_like()?)?;
    }
    let failed: Vec<bool> = status.iter().map(|s| s.failed()).collect();
    if failed.iter().any(|&f| f) {
        x = mask_rows(&failed, b)?.where_cond(&x.zeros_like()?, &x)?;
    }
    let residual = (0..nb)
        .map(|i| {
            if bnorm[i] > 0.0 {
                rs[i].sqrt() / bnorm[i]
            } else {
                0.0
            }
        })
        .collect();
    Ok((
        x,
        CgReport {
            status,
            iterations,
            residual,
        },
    ))
}

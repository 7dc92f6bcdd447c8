//! Batched conjugate gradient for block-diagonal systems `A_b x_b = b_b`, b = 1..B.
//!
//! All examples iterate together (one operator call per iteration applies every block),
//! each with its own α_b = r_bᵀr_b / p_bᵀA_b p_b and β_b = r'_bᵀr'_b / r_bᵀr_b. An
//! example stops on its own: converged (‖r_b‖ ≤ η_b·‖b_b‖, η_b by the [`StopRule`]),
//! negative curvature (p_bᵀA_b p_b ≤ 0: A_b is not positive definite), or non-finite
//! arithmetic; the others carry on unaffected. Examples still running after `max_iters`
//! end as `MaxIterations` with their current iterate and residual reported.

use crate::operator::BatchedOperator;
use anyhow::Result;
use candle_core::{DType, Tensor};

/// CG settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CgConfig {
    /// Iteration limit.
    pub max_iters: usize,
    /// Relative residual tolerance: an example converges at ‖r_b‖ ≤ η_b · ‖b_b‖ with
    /// η_b = tol, or as `rule` says.
    pub tol: f64,
    /// How η_b follows from `tol` and the right-hand side.
    pub rule: StopRule,
}

impl Default for CgConfig {
    fn default() -> Self {
        Self {
            max_iters: 20,
            tol: 1e-5,
            rule: StopRule::Relative,
        }
    }
}

/// The relative residual η_b at which example b's solve stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRule {
    /// η_b = tol for every example.
    Relative,
    /// η_b = min(tol, √‖b_b‖): the forcing term of inexact Newton (Nocedal & Wright,
    /// *Numerical Optimization*, 2nd ed., (7.3)), for a system whose right-hand side is a
    /// gradient — loose far from the optimum, where a rough direction does, and tighter as
    /// ‖b_b‖ → 0, which keeps Newton's local convergence superlinear (their Theorem 7.2).
    NewtonForcing,
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
    /// Operator applications (each applies every example's block): what the solve cost.
    pub products: usize,
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

/// How often (in iterations) the solver asks the host whether any example still runs:
/// the only host round trip inside the loop. On a GPU that is a synchronisation, so it is
/// asked every 4 iterations (a converged batch may run up to 3 masked products more); on
/// the CPU it costs nothing and is asked every iteration.
fn check_every(t: &Tensor) -> usize {
    if t.device().is_cpu() {
        1
    } else {
        4
    }
}

/// Status codes of the per-example state held on the device.
const RUNNING: f64 = 0.0;
const CONVERGED: f64 = 1.0;
const NEGATIVE_CURVATURE: f64 = 2.0;
const NON_FINITE: f64 = 3.0;

/// 1 where `t` is finite, else 0 (0·t is 0 for finite t, NaN for ±inf and NaN).
fn finite(t: &Tensor) -> Result<Tensor> {
    Ok((t * 0.0)?.eq(0.0)?.to_dtype(t.dtype())?)
}

/// Solves `A x = b` for `b: [B, n]`; returns `x: [B, n]` and the report. Rows that fail
/// are returned as zeros (never NaN) with their status set: the caller decides.
///
/// The per-example scalars (r_bᵀr_b, p_bᵀA_b p_b, α_b, β_b, status, iteration count)
/// live on the device as `[B, 1]` columns, in f64 whatever the system's dtype (the
/// products are summed in the system's dtype, as the operator's arithmetic is): the loop
/// brings nothing to the host but one "still running?" count every few iterations
/// ([`check_every`]), and the report is read once at the end.
pub fn batched_cg(
    op: &dyn BatchedOperator,
    b: &Tensor,
    cfg: &CgConfig,
) -> Result<(Tensor, CgReport)> {
    let nb = b.dim(0)?;
    let dt = b.dtype();
    let dot = |u: &Tensor, v: &Tensor| -> Result<Tensor> {
        Ok((u * v)?.sum_keepdim(1)?.to_dtype(DType::F64)?)
    };
    let mut x = b.zeros_like()?;
    let mut r = b.clone();
    let mut p = b.clone();
    let mut rs = dot(&r, &r)?;
    let bnorm = rs.sqrt()?;
    let tol_b = match cfg.rule {
        StopRule::Relative => (&bnorm * cfg.tol)?,
        StopRule::NewtonForcing => (&bnorm * bnorm.sqrt()?.clamp(0.0, cfg.tol)?)?,
    };
    // Status: non-finite right-hand sides fail, zero ones have converged.
    let zero = bnorm.zeros_like()?;
    let b_finite = finite(&bnorm)?;
    let b_zero = bnorm.eq(0.0)?.to_dtype(DType::F64)?;
    let mut status = ((&b_zero * CONVERGED)? + ((1.0 - &b_finite)? * NON_FINITE)?)?;
    let mut active = (&b_finite * (1.0 - &b_zero)?)?;
    let mut iterations = zero.clone();
    let every = check_every(b);
    let mut products = 0;
    for it in 0..cfg.max_iters {
        if it % every == 0 && active.sum_all()?.to_scalar::<f64>()? == 0.0 {
            break;
        }
        let ap = op.apply(&p)?;
        products += 1;
        let pap = dot(&p, &ap)?;
        let pap_finite = finite(&pap)?;
        let pap_pos = pap.gt(0.0)?.to_dtype(DType::F64)?;
        let bad_nf = (&active * (1.0 - &pap_finite)?)?;
        let bad_nc = ((&active * &pap_finite)? * (1.0 - &pap_pos)?)?;
        status = ((status + (&bad_nf * NON_FINITE)?)? + (&bad_nc * NEGATIVE_CURVATURE)?)?;
        let ok = ((&active * &pap_finite)? * &pap_pos)?;
        let ok_mask = ok.ne(0.0)?;
        let alpha = ok_mask.where_cond(&(&rs / &pap)?, &zero)?.to_dtype(dt)?;
        let mask = ok_mask.broadcast_as(b.shape())?.contiguous()?;
        x = mask.where_cond(&(&x + p.broadcast_mul(&alpha)?)?, &x)?;
        r = mask.where_cond(&(&r - ap.broadcast_mul(&alpha)?)?, &r)?;
        let rs_new = dot(&r, &r)?;
        iterations = (iterations + &ok)?;
        let rs_finite = finite(&rs_new)?;
        let now_nf = (&ok * (1.0 - &rs_finite)?)?;
        let conv = rs_new.sqrt()?.le(&tol_b)?.to_dtype(DType::F64)?;
        let now_conv = ((&ok * &rs_finite)? * &conv)?;
        status = ((status + (&now_nf * NON_FINITE)?)? + (&now_conv * CONVERGED)?)?;
        active = ((&ok * &rs_finite)? * (1.0 - &conv)?)?;
        let act_mask = active.ne(0.0)?;
        let beta = act_mask
            .where_cond(&(&rs_new / &rs)?, &zero)?
            .to_dtype(dt)?;
        rs = ok_mask.where_cond(&rs_new, &rs)?;
        let pnew = (&r + p.broadcast_mul(&beta)?)?;
        p = act_mask
            .broadcast_as(b.shape())?
            .contiguous()?
            .where_cond(&pnew, &p.zeros_like()?)?;
    }
    // Failed rows become zeros.
    let failed = status.ge(NEGATIVE_CURVATURE)?;
    x = failed
        .broadcast_as(b.shape())?
        .contiguous()?
        .where_cond(&x.zeros_like()?, &x)?;
    // The report, read once.
    let host = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.flatten_all()?.to_vec1::<f64>()?) };
    let (codes, iters, rs_h, bn) = (
        host(&status)?,
        host(&iterations)?,
        host(&rs)?,
        host(&bnorm)?,
    );
    let status = codes
        .iter()
        .map(|&c| match c {
            c if c == CONVERGED => CgStatus::Converged,
            c if c == NEGATIVE_CURVATURE => CgStatus::NegativeCurvature,
            c if c == NON_FINITE => CgStatus::NonFinite,
            _ => {
                debug_assert_eq!(c, RUNNING);
                CgStatus::MaxIterations
            }
        })
        .collect();
    let residual = (0..nb)
        .map(|i| {
            if bn[i] > 0.0 {
                rs_h[i].sqrt() / bn[i]
            } else {
                0.0
            }
        })
        .collect();
    Ok((
        x,
        CgReport {
            status,
            iterations: iters.iter().map(|&k| k as usize).collect(),
            products,
            residual,
        },
    ))
}

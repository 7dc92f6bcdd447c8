//! The Newton refinement ([`SviOptimizer::Newton`]), example by example.
//!
//! A batch's examples are independent: f(λ) = Σ_b f_b(λ_b), and the Hessian is block
//! diagonal. So each example stops on its own, once ‖∇F_b‖ < `tol` (with `tol` = 0 every
//! example takes every step), and the objective is evaluated only for the examples still
//! moving: at a Newton step for those not yet done, and at each line-search trial for
//! those whose previous trial was rejected. The Hessian of the moving examples is
//! assembled from the evaluations that last covered each ([`RowBlocks`]), or evaluated
//! again for them alone where those cover far more examples. An evaluation
//! of every example is asked for with `rows` = None, so an objective that cannot evaluate
//! part of a batch only has to answer that.
//!
//! Per step, for the moving examples M: solve ((γ + δ)I − H_M) d = ∇F_M by CG (δ = 1e-3;
//! a failed solve falls back to d = ∇F/(γ + δ)), cap ‖d_b‖ at `max_step`, and step
//! λ_b += t_b · lr · d_b with t_b = 1, or with a line search the largest
//! t_b ∈ {1, ½, …} with F(λ_b + t_b d_b) ≥ F(λ_b) + c t_b ∇F_b·d_b − 8u|F(λ_b)|, or the
//! smallest t_b where none passes, counted in [`crate::Refinement::line_search_failures`].

use crate::svi::{Refinement, SviConfig, SviStep};
use crate::{Backtracking, NewtonSolve};
use anyhow::Result;
use candle_core::{DType, Tensor};
use savae_implicit::{solve_adjoint, BatchedOperator, RowBlocks, Rows, ShiftedSolve};

/// λ: `[B, n]` (the whole batch), rows (None: all) ↦ (f: `[r]`, ∇_λ Σ f: `[r, n]`) of
/// those rows at their λ, detached.
pub type RowsGradFn<'a> = dyn Fn(&Tensor, Option<&Tensor>) -> Result<(Tensor, Tensor)> + 'a;

/// [`RowsGradFn`] with the Hessian of those rows as an operator on `[r, n]`.
pub type RowsHvpOracle<'a> =
    dyn Fn(&Tensor, Option<&Tensor>) -> Result<(Tensor, Tensor, Box<dyn BatchedOperator>)> + 'a;

/// The Newton method's settings (the fields of [`crate::SviOptimizer::Newton`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewtonSettings {
    pub lr: f64,
    pub cg_iters: usize,
    pub max_step: f64,
    pub line_search: Option<Backtracking>,
    pub solve: NewtonSolve,
}

/// f, ∇f (and H where another step follows) of some rows.
struct Evaluation {
    values: Tensor,
    grad: Tensor,
    hessian: Option<Box<dyn BatchedOperator>>,
}

/// The batch as the refinement stands: λ, f and ∇f at λ, and the Hessian blocks there.
struct Current {
    lambda: Tensor,
    values: Tensor,
    grad: Tensor,
    blocks: RowBlocks,
}

impl Current {
    /// Takes the evaluation `e` of `rows` at λ rows `at` for the rows at positions
    /// `claim` of `rows`.
    fn take(&mut self, rows: &Rows, at: &Tensor, e: Evaluation, claim: &[usize]) -> Result<()> {
        // The claimed rows and their parts of `at` and `e` (all of them as they are when
        // every row is claimed).
        let (taken, at, values, grad) = if claim.len() == rows.len() {
            (rows.clone(), at.clone(), e.values, e.grad)
        } else {
            let pos = Rows::of(
                claim.iter().map(|&p| p as u32).collect(),
                rows.len(),
                at.device(),
            )?;
            (
                rows.subset(claim)?,
                pos.gather(at)?,
                pos.gather(&e.values)?,
                pos.gather(&e.grad)?,
            )
        };
        self.lambda = taken.put(&self.lambda, &at)?;
        self.values = taken.put(&self.values, &values)?;
        self.grad = taken.put(&self.grad, &grad)?;
        if let Some(h) = e.hessian {
            self.blocks.cover(rows, h, claim);
        }
        Ok(())
    }
}

/// The Newton refinement of `lambda0` (detached), each example stopping on its own.
pub(crate) fn refine_newton(
    grad_fn: &RowsGradFn<'_>,
    hvp: &RowsHvpOracle<'_>,
    lambda0: &Tensor,
    cfg: &SviConfig,
    newton: NewtonSettings,
) -> Result<Refinement> {
    let lambda0 = lambda0.detach();
    let nb = lambda0.dim(0)?;
    let device = lambda0.device().clone();
    let gamma = cfg.prox;
    // Step k's evaluation: with the Hessian where a Newton step may follow.
    let evaluate = |lambda: &Tensor, rows: &Rows, k: usize| -> Result<Evaluation> {
        if k < cfg.steps {
            let (values, grad, h) = hvp(lambda, rows.index())?;
            Ok(Evaluation {
                values,
                grad,
                hessian: Some(h),
            })
        } else {
            let (values, grad) = grad_fn(lambda, rows.index())?;
            Ok(Evaluation {
                values,
                grad,
                hessian: None,
            })
        }
    };
    let all = Rows::all(nb, &device);
    let first = evaluate(&lambda0, &all, 0)?;
    let mut evaluated_rows = nb;
    let mut cur = Current {
        lambda: lambda0.clone(),
        values: first.values.clone(),
        grad: first.grad.clone(),
        blocks: RowBlocks::new(nb),
    };
    if let Some(h) = first.hessian {
        cur.blocks.cover(&all, h, &(0..nb).collect::<Vec<_>>());
    }
    let mut moving = vec![true; nb];
    let (mut steps, mut backtracks, mut hessian_products) = (0, 0, 0);
    let mut line_search_failures = 0;
    let mut trace = Vec::with_capacity(cfg.steps + 1);
    let mut norms;
    let mut k = 0;
    loop {
        // ∇F = ∇f − γ(λ − λ0) and its per-example norms.
        let g = prox_grad(&cur.grad, &cur.lambda, &lambda0, gamma)?;
        norms = savae_implicit::row_norms(&g)?;
        trace.push(SviStep {
            step: k,
            mean_objective: cur
                .values
                .to_dtype(DType::F64)?
                .mean_all()?
                .to_scalar::<f64>()?,
            max_grad_norm: norms.iter().copied().fold(f64::NAN, f64::max),
        });
        if k == cfg.steps {
            break;
        }
        for (m, n) in moving.iter_mut().zip(&norms) {
            if !n.is_finite() || (cfg.tol > 0.0 && *n < cfg.tol) {
                *m = false;
            }
        }
        if !moving.iter().any(|&m| m) {
            break;
        }
        // A done example's block is never applied again: drop the evaluations that only
        // they still held.
        cur.blocks.retain(&moving)?;
        let rows = Rows::where_true(&moving, &device)?;
        // The Newton direction of the moving examples. Their Hessian blocks come from the
        // evaluations that last covered them, and every product applies those
        // evaluations' whole operators; where they cover more than twice the examples
        // still moving, the blocks of these alone are evaluated again (at the same λ),
        // which costs about one product of theirs and saves every product the rest.
        if 2 * rows.len() <= cur.blocks.rows_applied(&rows)? {
            // (Their old blocks, the only ones left, go first.)
            cur.blocks.clear();
            let (_, _, h) = hvp(&cur.lambda, rows.index())?;
            evaluated_rows += rows.len();
            cur.blocks
                .cover(&rows, h, &(0..rows.len()).collect::<Vec<_>>());
        }
        let g_m = rows.gather(&g)?;
        let h_m = cur.blocks.on(&rows)?;
        let solve = ShiftedSolve {
            cg: newton.solve.cg(newton.cg_iters),
            damping: 1e-3,
            retries: 0,
        };
        let sol = solve_adjoint(&h_m, &g_m, gamma, &solve, &[])?;
        hessian_products += sol.report.products;
        // Every block is stale once the direction is solved for (the moving examples step,
        // and their trial points' evaluations bring their next blocks): dropping them now,
        // before those evaluations, keeps one step's Hessian evaluations alive, not two.
        drop(h_m);
        cur.blocks.clear();
        let dn = sol.u.sqr()?.sum_keepdim(1)?.sqrt()?;
        let cap = (dn.recip()? * newton.max_step)?.clamp(0.0, 1.0)?;
        let d = (sol.u.broadcast_mul(&cap)? * newton.lr)?;
        let lambda_m = rows.gather(&cur.lambda)?;
        match newton.line_search {
            None => {
                let next = (&lambda_m + d)?;
                let e = evaluate(&rows.put(&cur.lambda, &next)?, &rows, k + 1)?;
                evaluated_rows += rows.len();
                cur.take(&rows, &next, e, &(0..rows.len()).collect::<Vec<_>>())?;
            }
            Some(ls) => {
                let f0 = proximal_objective(
                    &rows.gather(&cur.values)?,
                    &lambda_m,
                    &rows.gather(&lambda0)?,
                    gamma,
                )?;
                let search = LineSearch {
                    rows: &rows,
                    lambda: &lambda_m,
                    lambda0: &lambda0,
                    gamma,
                    f0: &f0,
                    g: &g_m,
                    d: &d,
                    ls: &ls,
                };
                let out = search.run(&mut cur, &|l, r| evaluate(l, r, k + 1))?;
                backtracks += out.halvings;
                evaluated_rows += out.evaluated;
                line_search_failures += out.exhausted;
            }
        }
        steps += 1;
        k += 1;
    }
    let mut r = Refinement {
        lambda: cur.lambda,
        steps,
        trace,
        final_grad_norm: norms,
        resets: 0,
        backtracks,
        line_search_failures,
        hessian_products,
        evaluated_rows,
        path: None,
    };
    r.reset_diverged(&lambda0)?;
    Ok(r)
}

/// ∇F = ∇f − γ (λ − λ0).
fn prox_grad(grad: &Tensor, lambda: &Tensor, lambda0: &Tensor, gamma: f64) -> Result<Tensor> {
    Ok(if gamma > 0.0 {
        (grad - ((lambda - lambda0)? * gamma)?)?
    } else {
        grad.clone()
    })
}

/// The unit roundoff of `dtype` (half the gap between 1 and the next number).
fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        // Half-precision types: 2^-11 (f16), 2^-8 (bf16).
        DType::F16 => 4.9e-4,
        _ => 3.9e-3,
    }
}

/// F(λ) = f(λ) − γ/2 ‖λ − λ0‖² per example: `[r, 1]`.
fn proximal_objective(
    values: &Tensor,
    lambda: &Tensor,
    lambda0: &Tensor,
    prox: f64,
) -> Result<Tensor> {
    let f = values.reshape((values.elem_count(), 1))?;
    if prox > 0.0 {
        let sq = (lambda - lambda0)?.sqr()?.sum_keepdim(1)?;
        Ok((f - (sq * (prox / 2.0))?)?)
    } else {
        Ok(f)
    }
}

/// Per-example Armijo backtracking of the moving rows from `lambda` along `d` (an ascent
/// direction of F, whose gradient there is `g`, value `f0: [m, 1]`).
struct LineSearch<'a> {
    rows: &'a Rows,
    /// λ of the moving rows: `[m, n]`.
    lambda: &'a Tensor,
    /// λ0 of the whole batch.
    lambda0: &'a Tensor,
    gamma: f64,
    f0: &'a Tensor,
    g: &'a Tensor,
    d: &'a Tensor,
    ls: &'a Backtracking,
}

impl LineSearch<'_> {
    /// Moves every row of `cur` in `rows` to its accepted trial, taking that trial's
    /// evaluation; a row that passes no trial takes the last (t = 2^−`max_halvings`).
    fn run(
        &self,
        cur: &mut Current,
        evaluate: &dyn Fn(&Tensor, &Rows) -> Result<Evaluation>,
    ) -> Result<SearchOutcome> {
        let device = self.lambda.device();
        let m = self.rows.len();
        // Armijo's bound per unit step: c ∇F·d, [m, 1].
        let slope = ((self.g * self.d)?.sum_keepdim(1)? * self.ls.armijo)?;
        // Accepted where F rose by Armijo's margin, up to the rounding of F itself: near
        // the optimum a step's true gain falls below one ulp of F (f32: 1e-5 at F ≈ 100),
        // and comparing rounded values would reject it for noise and halve for nothing.
        let rounding = (self.f0.abs()? * (8.0 * unit_roundoff(self.f0.dtype())))?;
        let mut t = vec![1.0f64; m];
        // Positions (in the moving rows) still searching.
        let mut open: Vec<usize> = (0..m).collect();
        let (mut halvings, mut evaluated) = (0, 0);
        let mut exhausted = 0;
        for trial in 0..=self.ls.max_halvings {
            let at = Rows::of(open.iter().map(|&p| p as u32).collect(), m, device)?;
            let rows = self.rows.subset(&open)?;
            let t_open: Vec<f64> = open.iter().map(|&p| t[p]).collect();
            let t_col = savae_implicit::column(&t_open, self.lambda)?;
            let candidate =
                (at.gather(self.lambda)? + at.gather(self.d)?.broadcast_mul(&t_col)?)?;
            let e = evaluate(&rows.put(&cur.lambda, &candidate)?, &rows)?;
            evaluated += rows.len();
            let f1 = proximal_objective(
                &e.values,
                &candidate,
                &rows.gather(self.lambda0)?,
                self.gamma,
            )?;
            let bound = ((at.gather(self.f0)? + (at.gather(&slope)? * &t_col)?)?
                - at.gather(&rounding)?)?;
            // A NaN compares false: rejected.
            let passed: Vec<bool> = f1
                .ge(&bound)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .iter()
                .map(|&a| a != 0.0)
                .collect();
            // The last trial is taken whatever it gives, and counted. Refusing it where it
            // lowers F, by stopping the example where it was, left more examples
            // non-stationary: 8 against 2 of 3 456 on the PTB SA-VAE's epoch-4 weights (7
            // examples stopped); from the lower point later steps mostly recover. A retry
            // along the steepest ascent did no better (2 of 3 488 either way).
            let last = trial == self.ls.max_halvings;
            let claim: Vec<usize> = (0..open.len()).filter(|&i| passed[i] || last).collect();
            if !claim.is_empty() {
                cur.take(&rows, &candidate, e, &claim)?;
            }
            let rejected: Vec<usize> = (0..open.len())
                .filter(|&i| !passed[i])
                .map(|i| open[i])
                .collect();
            if last {
                exhausted = rejected.len();
                break;
            }
            if rejected.is_empty() {
                break;
            }
            halvings += rejected.len();
            for &p in &rejected {
                t[p] *= 0.5;
            }
            open = rejected;
        }
        Ok(SearchOutcome {
            halvings,
            evaluated,
            exhausted,
        })
    }
}

/// What a step's line search did.
struct SearchOutcome {
    /// Halvings, summed over the rows.
    halvings: usize,
    /// Rows evaluated, summed over the trials.
    evaluated: usize,
    /// Rows whose every trial, the last one taken included, failed Armijo's test.
    exhausted: usize,
}

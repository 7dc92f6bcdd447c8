//! K steps of per-example gradient ascent on F(λ) = f(λ) − γ/2 ‖λ − λ0‖².
//!
//! SGD with momentum (SA-VAE): with G_k = s · clip_5(∇F(λ_k)) and s = 1 / batch size
//! (the step acts on the batch-mean loss, as in SA-VAE),
//!   m_{k+1} = μ m_k + G_k,   λ_{k+1} = λ_k + α m_{k+1},   m_0 = 0.
//! Clipping is per example (‖∇F_b‖ ≤ 5 before scaling), so that no example's refinement
//! depends on the others in its batch. Adam uses the usual bias-corrected moments per
//! coordinate. Their early stop: when every example's ‖∇F_b(λ_k)‖ is below `tol` (the
//! steps couple the batch: SGD's acts on the batch-mean loss).
//! Examples whose λ or f becomes non-finite are reset to λ0 and counted.
//!
//! Newton (see [`SviOptimizer::Newton`], [`crate::newton`]) steps along
//! d = ((γ + δ)I − H)⁻¹ ∇F, solved by CG exactly or to inexact Newton's forcing term
//! ([`NewtonSolve`]). Optionally each example backtracks (Armijo): the step t·d is taken
//! with the largest t ∈ {1, ½, ¼, …} such that F(λ + t d) ≥ F(λ) + c t ∇F·d (or the
//! smallest t tried, where none passes). A trial
//! point's evaluation is the next step's (the value, gradient and Hessian it needs are the
//! same), so a step every example accepts at t = 1 costs nothing more than plain Newton.
//! Newton's early stop is per example: each stops once its own ‖∇F_b‖ < `tol`, and only
//! the examples still moving are evaluated.

use crate::newton::{refine_newton, NewtonSettings, RowsGradFn, RowsHvpOracle};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use savae_implicit::{column, row_norms, BatchedOperator, CgConfig, Rows, RowsOf, StopRule};

/// The inner optimizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SviOptimizer {
    /// SGD with momentum on the batch-mean loss, per-example gradient clipping.
    Sgd { lr: f64, momentum: f64, clip: f64 },
    /// Adam with per-coordinate moments.
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
    /// Damped Newton ascent with exact Hessian-vector products: per example solve
    /// (γ + δ − H) d = ∇F by CG (at most `cg_iters` iterations, to the residual `solve`
    /// asks for, δ = 1e-3; a failed solve falls back to d = ∇F/(γ+δ)), cap ‖d‖ at
    /// `max_step`, and step λ += t·lr·d with t = 1, or with `line_search` the per-example
    /// backtracked t. It reaches stationarity in a few steps where SGD does not, which
    /// the implicit gradient needs.
    Newton {
        lr: f64,
        cg_iters: usize,
        max_step: f64,
        /// Per-example backtracking on F (None: the full step, always).
        line_search: Option<Backtracking>,
        /// How closely each step's direction solves the Newton system.
        solve: NewtonSolve,
    },
}

/// How closely a Newton step's CG solves ((γ + δ)I − H) d = ∇F: every iteration is one
/// Hessian-vector product for the whole batch, the refinement's main cost, and the batch
/// iterates until its slowest example has converged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum NewtonSolve {
    /// To relative residual 1e-4: the Newton direction itself (newton's and newton-ls's
    /// behaviour before this option).
    Exact,
    /// Inexact (truncated) Newton: each example to relative residual
    /// η_b = min(½, √‖∇F_b‖) ([`StopRule::NewtonForcing`]) — a rough direction while the
    /// example is far from its optimum, a tighter one as ‖∇F_b‖ → 0, where the local
    /// convergence stays superlinear.
    Inexact,
}

impl NewtonSolve {
    /// The CG settings of a step's solve, at most `max_iters` products.
    pub fn cg(self, max_iters: usize) -> CgConfig {
        match self {
            Self::Exact => CgConfig {
                max_iters,
                tol: 1e-4,
                rule: StopRule::Relative,
            },
            Self::Inexact => CgConfig {
                max_iters,
                tol: 0.5,
                rule: StopRule::NewtonForcing,
            },
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Inexact => "inexact",
        }
    }
}

/// Per-example Armijo backtracking of a Newton step: halve t while
/// F(λ + t d) < F(λ) + `armijo` · t · ∇F·d − 8u|F(λ)| (u the unit roundoff of the dtype: a
/// gain below F's rounding is no evidence of a bad step), at most `max_halvings` times. The
/// last trial is taken whatever it gives, and counted where it fails the test too
/// ([`Refinement::line_search_failures`]): refusing it, by stopping the example where it
/// was, left more examples non-stationary on PTB than taking it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backtracking {
    pub max_halvings: usize,
    pub armijo: f64,
}

impl Default for Backtracking {
    fn default() -> Self {
        Self {
            max_halvings: 4,
            armijo: 1e-4,
        }
    }
}

/// Which inner optimizer, by name (`sgd`, `adam`, `newton`, `newton-ls`): the option a
/// user sets.
/// [`SviMethod::with_lr`] gives the optimizer with its SA-VAE / PyTorch defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum SviMethod {
    /// SGD with momentum 0.5, per-example clip 5, on the batch-mean loss (SA-VAE).
    Sgd,
    /// Adam (β1 0.9, β2 0.999).
    Adam,
    /// Damped Newton ascent: CG on exact Hessian-vector products, steps capped at 2.
    Newton,
    /// Newton with a per-example backtracking (Armijo) line search on F.
    #[serde(rename = "newton-ls")]
    #[cfg_attr(feature = "clap", value(name = "newton-ls"))]
    NewtonLs,
}

impl SviMethod {
    /// Every method, in the order the help lists them.
    pub const ALL: [SviMethod; 4] = [Self::Sgd, Self::Adam, Self::Newton, Self::NewtonLs];

    /// The optimizer with learning rate `lr` and this method's defaults.
    pub fn with_lr(self, lr: f64) -> SviOptimizer {
        match self {
            Self::Sgd => SviOptimizer::Sgd {
                lr,
                momentum: 0.5,
                clip: 5.0,
            },
            Self::Adam => SviOptimizer::Adam {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
            },
            Self::Newton => SviOptimizer::Newton {
                lr,
                cg_iters: 10,
                max_step: 2.0,
                line_search: None,
                solve: NewtonSolve::Exact,
            },
            Self::NewtonLs => SviOptimizer::Newton {
                lr,
                cg_iters: 10,
                max_step: 2.0,
                line_search: Some(Backtracking::default()),
                solve: NewtonSolve::Exact,
            },
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sgd => "sgd",
            Self::Adam => "adam",
            Self::Newton => "newton",
            Self::NewtonLs => "newton-ls",
        }
    }
}

impl SviOptimizer {
    /// `sgd`, `adam`, `newton` or `newton-ls` with the SA-VAE / PyTorch defaults and
    /// learning rate `lr`.
    pub fn parse(name: &str, lr: f64) -> Result<Self> {
        let Some(method) = SviMethod::ALL.into_iter().find(|m| m.name() == name) else {
            let names: Vec<&str> = SviMethod::ALL.iter().map(|m| m.name()).collect();
            bail!(
                "refinement optimizer {name:?} is unknown: expected one of {}",
                names.join(", ")
            )
        };
        Ok(method.with_lr(lr))
    }

    /// Which method this is.
    pub fn method(&self) -> SviMethod {
        match self {
            Self::Sgd { .. } => SviMethod::Sgd,
            Self::Adam { .. } => SviMethod::Adam,
            Self::Newton {
                line_search: None, ..
            } => SviMethod::Newton,
            Self::Newton {
                line_search: Some(_),
                ..
            } => SviMethod::NewtonLs,
        }
    }

    /// The name [`SviOptimizer::parse`] takes.
    pub fn name(&self) -> &'static str {
        self.method().name()
    }

    /// This optimizer with its Newton steps solved as `solve` says (SGD and Adam: as is).
    pub fn with_newton_solve(mut self, solve: NewtonSolve) -> Self {
        if let Self::Newton { solve: s, .. } = &mut self {
            *s = solve;
        }
        self
    }

    /// This optimizer with SGD's per-example clip at `clip` (∞: none; Adam and Newton: as
    /// is).
    pub fn with_sgd_clip(mut self, clip: f64) -> Self {
        if let Self::Sgd { clip: c, .. } = &mut self {
            *c = clip;
        }
        self
    }
}

/// Per-example clip scales c_b = min(1, clip / n_b) of the row norms `norms` `[B, 1]`
/// (clip ∞: ones).
pub(crate) fn clip_scales(norms: &Tensor, clip: f64) -> Result<Tensor> {
    Ok(if clip.is_finite() {
        (norms.recip()? * clip)?.clamp(0.0, 1.0)?
    } else {
        norms.ones_like()?
    })
}

/// Refinement settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SviConfig {
    pub steps: usize,
    pub optimizer: SviOptimizer,
    /// Proximal weight γ ≥ 0.
    pub prox: f64,
    /// Early-stop tolerance on ‖∇F_b‖ (0 disables): Newton stops each example once its
    /// own is below it; SGD and Adam stop the batch once every example's is.
    pub tol: f64,
    /// The nominal batch size; SGD's step acts on the loss averaged over it.
    pub batch_size: usize,
}

/// One step's trace.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SviStep {
    pub step: usize,
    /// Mean f over the batch at λ_k (before the step).
    pub mean_objective: f64,
    /// Max over examples of ‖∇F_b(λ_k)‖.
    pub max_grad_norm: f64,
}

/// The refined λ and what happened on the way.
#[derive(Debug, Clone)]
pub struct Refinement {
    /// λ_K: `[B, n]`.
    pub lambda: Tensor,
    /// Steps actually taken (≤ K with early stop).
    pub steps: usize,
    pub trace: Vec<SviStep>,
    /// Per-example ‖∇F_b(λ_K)‖ at the end (the stationarity of the optimum).
    pub final_grad_norm: Vec<f64>,
    /// Examples reset to λ0 because they diverged.
    pub resets: usize,
    /// Halvings of the Newton line search, summed over examples and steps.
    pub backtracks: usize,
    /// Newton steps, summed over examples, where no line-search trial passed Armijo's test
    /// and the last was taken anyway (Newton with a line search only).
    pub line_search_failures: usize,
    /// Hessian-vector products of the Newton steps' solves, each for the examples still
    /// moving (the CG iterations of the slowest, summed over steps; 0 for SGD and Adam).
    pub hessian_products: usize,
    /// Examples evaluated (value and gradient, with the Hessian for Newton), summed over
    /// the evaluations: (K + 1)·B for SGD and Adam; for Newton fewer as examples stop.
    pub evaluated_rows: usize,
    /// For the unrolled backward (SGD only, when asked): λ_0..λ_{K−1} and each step's
    /// per-example clip scale `[B, 1]`.
    pub path: Option<Vec<(Tensor, Tensor)>>,
}

/// Refines `lambda0` (detached) with `grad_fn: λ ↦ (f(λ): [B], ∇_λ Σ f: [B, n])`.
/// With `keep_path`, records what [`crate::unrolled_backward`] needs.
pub fn refine(
    grad_fn: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    lambda0: &Tensor,
    cfg: &SviConfig,
    keep_path: bool,
) -> Result<Refinement> {
    refine_with_hvp(grad_fn, None, lambda0, cfg, keep_path)
}

/// λ ↦ (f(λ): [B], ∇_λ Σ f (detached), H_f(λ) as a batched operator), for Newton steps.
pub type HvpOracle<'a> = dyn Fn(&Tensor) -> Result<(Tensor, Tensor, Box<dyn BatchedOperator>)> + 'a;

/// [`refine`] with Hessian-vector products available (needed by the Newton optimizer).
/// The objective is evaluated for the whole batch each time: [`refine_rows`] with an
/// objective that can evaluate some of its rows saves the work on the examples done.
pub fn refine_with_hvp(
    grad_fn: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    hvp: Option<&HvpOracle<'_>>,
    lambda0: &Tensor,
    cfg: &SviConfig,
    keep_path: bool,
) -> Result<Refinement> {
    let nb = lambda0.dim(0)?;
    let device = lambda0.device().clone();
    let rows_of = |index: Option<&Tensor>| -> Result<Rows> {
        match index {
            None => Ok(Rows::all(nb, &device)),
            Some(i) => Rows::of(i.to_vec1::<u32>()?, nb, &device),
        }
    };
    let gf = |l: &Tensor, index: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
        let rows = rows_of(index)?;
        let (v, g) = grad_fn(l)?;
        Ok((rows.gather(&v)?, rows.gather(&g)?))
    };
    let oracle = hvp.map(|h| {
        move |l: &Tensor,
              index: Option<&Tensor>|
              -> Result<(Tensor, Tensor, Box<dyn BatchedOperator>)> {
            let rows = rows_of(index)?;
            let (v, g, op) = h(l)?;
            if rows.is_all() {
                return Ok((v, g, op));
            }
            Ok((
                rows.gather(&v)?,
                rows.gather(&g)?,
                Box::new(RowsOf { op, rows }),
            ))
        }
    });
    refine_rows(
        &gf,
        oracle.as_ref().map(|o| o as &RowsHvpOracle<'_>),
        lambda0,
        cfg,
        keep_path,
    )
}

/// Refines `lambda0` (detached) with an objective that evaluates the rows it is asked for
/// ([`RowsGradFn`], [`RowsHvpOracle`]; Newton needs the latter). With `keep_path`
/// (SGD only), records what [`crate::unrolled_backward`] needs.
pub fn refine_rows(
    grad_fn: &RowsGradFn<'_>,
    hvp: Option<&RowsHvpOracle<'_>>,
    lambda0: &Tensor,
    cfg: &SviConfig,
    keep_path: bool,
) -> Result<Refinement> {
    match (cfg.optimizer, hvp) {
        (
            SviOptimizer::Newton {
                lr,
                cg_iters,
                max_step,
                line_search,
                solve,
            },
            Some(h),
        ) => {
            let settings = NewtonSettings {
                lr,
                cg_iters,
                max_step,
                line_search,
                solve,
            };
            refine_newton(grad_fn, h, lambda0, cfg, settings)
        }
        (SviOptimizer::Newton { .. }, None) => {
            bail!("internal: the Newton refinement needs Hessian-vector products")
        }
        _ => refine_first_order(&|l| grad_fn(l, None), lambda0, cfg, keep_path),
    }
}

/// SGD or Adam: every example takes every step until all are below `tol`.
fn refine_first_order(
    grad_fn: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    lambda0: &Tensor,
    cfg: &SviConfig,
    keep_path: bool,
) -> Result<Refinement> {
    let lambda0 = lambda0.detach();
    let nb = lambda0.dim(0)?;
    let mut lambda = lambda0.clone();
    let mut m = lambda.zeros_like()?;
    let mut v = lambda.zeros_like()?;
    let mut path = keep_path.then(Vec::new);
    let scale = 1.0 / cfg.batch_size.max(1) as f64;
    let mut steps = 0;
    // Per-step statistics stay on the device until the end (no host sync per step,
    // unless early stopping needs the norms).
    let mut means = Vec::with_capacity(cfg.steps + 1);
    let mut maxes = Vec::with_capacity(cfg.steps + 1);
    let mut last_norms_t = None;
    let mut evaluated_rows = 0;
    for k in 0..=cfg.steps {
        let (values, g) = grad_fn(&lambda)?;
        evaluated_rows += nb;
        let g = if cfg.prox > 0.0 {
            (g - ((&lambda - &lambda0)? * cfg.prox)?)?
        } else {
            g
        };
        let norms = g.sqr()?.sum_keepdim(1)?.sqrt()?; // [B, 1]
        means.push(values.mean_all()?.to_dtype(DType::F64)?);
        maxes.push(norms.max_all()?.to_dtype(DType::F64)?);
        let stop = k == cfg.steps
            || (cfg.tol > 0.0 && {
                let n = norms
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                n.iter().all(|&x| x < cfg.tol)
            });
        last_norms_t = Some(norms.clone());
        if stop {
            break;
        }
        match cfg.optimizer {
            SviOptimizer::Sgd { lr, momentum, clip } => {
                // c_b = min(1, clip / ‖∇F_b‖), scaled by 1/batch size.
                let c = clip_scales(&norms, clip)?;
                if let Some(p) = path.as_mut() {
                    p.push((lambda.clone(), c.clone()));
                }
                m = ((&m * momentum)? + g.broadcast_mul(&(c * scale)?)?)?;
                lambda = (&lambda + (&m * lr)?)?;
            }
            SviOptimizer::Adam {
                lr,
                beta1,
                beta2,
                eps,
            } => {
                let t = (k + 1) as i32;
                m = ((&m * beta1)? + (&g * (1.0 - beta1))?)?;
                v = ((&v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let mhat = (&m / (1.0 - beta1.powi(t)))?;
                let vhat = (&v / (1.0 - beta2.powi(t)))?;
                lambda = (&lambda + (mhat / (vhat.sqrt()? + eps)?)?.affine(lr, 0.0)?)?;
            }
            SviOptimizer::Newton { .. } => {
                bail!("internal: Newton refines in refine_newton")
            }
        }
        steps += 1;
    }
    let means = Tensor::stack(&means, 0)?.to_vec1::<f64>()?;
    let maxes = Tensor::stack(&maxes, 0)?.to_vec1::<f64>()?;
    let trace = (0..means.len())
        .map(|k| SviStep {
            step: k,
            mean_objective: means[k],
            max_grad_norm: maxes[k],
        })
        .collect();
    let last_norms = match last_norms_t {
        Some(t) => t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?,
        None => vec![f64::NAN; nb],
    };
    let mut r = Refinement {
        lambda,
        steps,
        trace,
        final_grad_norm: last_norms,
        resets: 0,
        backtracks: 0,
        line_search_failures: 0,
        hessian_products: 0,
        evaluated_rows,
        path,
    };
    r.reset_diverged(&lambda0)?;
    Ok(r)
}

impl Refinement {
    /// Resets the examples whose ‖∇F_b‖ or λ_b is not finite to λ0 (their norm becomes
    /// NaN) and counts them in `resets`.
    pub(crate) fn reset_diverged(&mut self, lambda0: &Tensor) -> Result<()> {
        let lam_ok = row_norms(&self.lambda)?;
        let bad: Vec<bool> = self
            .final_grad_norm
            .iter()
            .zip(&lam_ok)
            .map(|(n, l)| !n.is_finite() || !l.is_finite())
            .collect();
        let resets = bad.iter().filter(|&&b| b).count();
        if resets == 0 {
            return Ok(());
        }
        let keep: Vec<f64> = bad.iter().map(|&b| if b { 0.0 } else { 1.0 }).collect();
        let mask = column(&keep, &self.lambda)?
            .ne(0.0)?
            .broadcast_as(self.lambda.shape())?
            .contiguous()?;
        self.lambda = mask.where_cond(&self.lambda, lambda0)?;
        for (n, b) in self.final_grad_norm.iter_mut().zip(&bad) {
            if *b {
                *n = f64::NAN;
            }
        }
        self.resets += resets;
        Ok(())
    }
}

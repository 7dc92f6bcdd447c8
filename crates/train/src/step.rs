//! One training step of each mode: the loss, its gradient for every model parameter,
//! and the diagnostics of the refinement and the adjoint solve.
//!
//! The loss is L = −(1/B) Σ_b ELBO_β(λ_b), at λ0 = enc(x) (vae), or at the refined
//! λ* (svi, vae-svi, savae). Gradients are returned in the order of `model.params`.

pub use crate::options::EncoderLoss;
use crate::options::{HvpKind, ModelKind};
use anyhow::Result;
use candle_core::{backprop::GradStore, DType, Tensor};
use savae_implicit::{
    autodiff::grads_of_dot, mixed_product_exact, mixed_product_fd, solve_adjoint, value_and_grad,
    BatchedOperator, ExactHvp, FdHvp, ShiftedSolve, ValueGrad,
};
use savae_inference::{
    refine_rows, refine_with_hvp, unrolled_backward, Refinement, ReverseClip, SviConfig,
    SviOptimizer,
};
use savae_model::{
    elbo, Batch, Decoder, DecoderElbo, ElboPoint, Encoder, LstmElbo, LstmEncoder, LstmEncoderTape,
    Mlp, MlpElbo, MlpTape, Noise, Passes, Vae, VariationalParams,
};
use serde::Serialize;

/// The training mode: the model, and for SA-VAE the gradient strategy through the
/// refinement and what trains its encoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// The text decoder alone (no latent): the language-model baseline.
    Lm,
    Vae,
    Svi,
    VaeSvi,
    Savae {
        gradient: SavaeGradient,
        encoder_loss: EncoderLoss,
    },
}

/// How the SA-VAE loss at λ* is differentiated with respect to θ and λ0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SavaeGradient {
    /// The implicit function theorem at λ*: one adjoint solve.
    Implicit(ImplicitGradient),
    /// Backpropagation through the SGD steps of the refinement, exact or with the reverse
    /// pass capped at every step (SA-VAE's code).
    Unrolled { reverse_clip: Option<ReverseClip> },
}

/// The settings of the implicit gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImplicitGradient {
    /// The adjoint solve ((γ + δ) I − H) u = g: CG, damping, retries.
    pub solve: ShiftedSolve,
    pub hvp: HvpKind,
    /// Examples whose ‖∇F(λ_K)‖ exceeds this are not stationary: the implicit gradient
    /// does not apply to them and they take the adjoint's identity fallback.
    pub stationarity_tol: f64,
}

impl Mode {
    /// The model this mode trains.
    pub fn kind(self) -> ModelKind {
        match self {
            Self::Lm => ModelKind::Lm,
            Self::Vae => ModelKind::Vae,
            Self::Svi => ModelKind::Svi,
            Self::VaeSvi => ModelKind::VaeSvi,
            Self::Savae { .. } => ModelKind::Savae,
        }
    }
    pub fn refines(self) -> bool {
        self.kind().refines()
    }
    /// The name benchmarks report: the model, and for SA-VAE its gradient.
    pub fn name(self) -> &'static str {
        match self {
            Self::Savae {
                gradient: SavaeGradient::Implicit(_),
                ..
            } => "savae-implicit",
            Self::Savae {
                gradient: SavaeGradient::Unrolled { .. },
                ..
            } => "savae-unrolled",
            other => other.kind().name(),
        }
    }
}

/// What a step needs besides the model and the batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    pub mode: Mode,
    /// KL weight β.
    pub beta: f64,
    /// The refinement (refining modes).
    pub svi: SviConfig,
    /// How the inner ELBO's derivatives in λ are computed (refinement, Newton, adjoint).
    pub passes: Passes,
}

/// Refinement diagnostics of a step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SviStats {
    pub steps: usize,
    /// max_b ‖∇F_b(λ_K)‖.
    pub final_grad_norm_max: f64,
    pub final_grad_norm_mean: f64,
    pub resets: usize,
    /// Halvings of the Newton line search (`newton-ls`), over examples and steps.
    pub backtracks: usize,
    /// Newton steps (over examples) where no line-search trial passed Armijo's test: the
    /// last was taken.
    pub line_search_failures: usize,
    /// Batched Hessian-vector products of the Newton steps' solves (the refinement's main
    /// cost with newton and newton-ls), each for the examples still moving.
    pub hessian_products: usize,
    /// Examples evaluated over the refinement's evaluations ((K + 1)·B for SGD; fewer for
    /// Newton, which stops evaluating an example once it is done).
    pub evaluated_rows: usize,
}

/// Adjoint-solve diagnostics of a step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CgStats {
    /// Mean and largest CG iterations over the examples.
    pub iters_mean: f64,
    pub iters_max: usize,
    /// Largest relative residual at the end.
    pub residual_max: f64,
    /// Examples (of the batch) whose solve converged…
    pub converged: usize,
    /// …stopped at the iteration cap without converging…
    pub stopped_at_cap: usize,
    /// …met negative curvature, or non-finite values.
    pub negative_curvature: usize,
    pub non_finite: usize,
    /// Examples re-solved with more damping.
    pub retried: usize,
    /// Examples whose solve failed (after any retries): identity fallback.
    pub fallbacks: usize,
    /// Examples not stationary at λ_K (‖∇F‖ > stationarity_tol): identity fallback.
    pub not_stationary: usize,
}

impl CgStats {
    /// The statistics of an adjoint solve.
    pub fn of(sol: &savae_implicit::AdjointSolution) -> Self {
        use savae_implicit::CgStatus;
        let rep = &sol.report;
        Self {
            iters_mean: rep.mean_iterations(),
            iters_max: rep.max_iterations(),
            residual_max: rep.max_residual(),
            converged: rep.count(CgStatus::Converged),
            stopped_at_cap: rep.count(CgStatus::MaxIterations),
            negative_curvature: rep.count(CgStatus::NegativeCurvature),
            non_finite: rep.count(CgStatus::NonFinite),
            retried: sol.retried,
            fallbacks: sol.fallbacks,
            not_stationary: sol.untrusted,
        }
    }
}

/// The outcome of one step.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// ∂loss/∂θ for each entry of `model.params`, in order.
    pub grads: Vec<Tensor>,
    /// The loss the gradient is of (−mean ELBO_β at the refined λ, or at λ0 for vae).
    pub loss: f64,
    /// Mean ELBO_β at λ0.
    pub elbo_amortized: f64,
    /// Mean ELBO_β at λ* (refining modes).
    pub elbo_refined: Option<f64>,
    /// Mean KL at the λ the loss is taken at.
    pub kl: f64,
    pub svi: Option<SviStats>,
    pub cg: Option<CgStats>,
    /// Detached refined λ (for gradcheck's output).
    pub lambda_refined: Option<Tensor>,
    pub lambda0: Tensor,
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.mean_all()?.to_scalar::<f64>()?)
}

/// The ELBO of `decoder` at `lambda` with its gradient, the graph kept (see
/// [`value_and_grad`]); parameter gradients are in the store unless `decoder` is detached.
fn elbo_vg(
    decoder: &Decoder,
    x: &Batch,
    eps: &Noise,
    beta: f64,
    lambda: &Tensor,
) -> Result<ValueGrad> {
    value_and_grad(
        |l| Ok(elbo(decoder, x, &VariationalParams(l.clone()), eps, beta)?.elbo),
        lambda,
    )
}

/// The inner objective λ ↦ ELBO_β(λ) of a decoder held constant (detached), per
/// example, with its derivatives in λ computed by `passes`: the hand-derived passes of
/// [`savae_model::analytic`] where the decoder has them (the MLP, the LSTM with a latent),
/// else candle's autograd (the reference). This is the seam between the objective and
/// what differentiates it: the refinement and the adjoint solve see only values,
/// gradients and operators.
#[derive(Clone, Copy)]
pub struct InnerElbo<'a> {
    pub decoder: &'a Decoder,
    pub x: &'a Batch,
    pub eps: &'a Noise,
    pub beta: f64,
    pub passes: Passes,
}

/// Analytic points of a refinement's λ_k, by the id of the λ tensor they were taken at.
#[derive(Default)]
struct Points(std::cell::RefCell<std::collections::HashMap<candle_core::TensorId, ElboPoint>>);

impl Points {
    /// The point at `lambda` if the refinement kept it (taken out: each is used once).
    fn take(&self, lambda: &Tensor) -> Option<ElboPoint> {
        self.0.borrow_mut().remove(&lambda.id())
    }
}

/// Hessian-vector products of the analytic passes at a fixed λ: the point owned, or
/// borrowed where it serves more (the mixed product).
struct PointHvp<P>(P);

impl<P: std::borrow::Borrow<ElboPoint>> BatchedOperator for PointHvp<P> {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        self.0.borrow().hvp(v)
    }
}

/// Whether hand-derived passes serve `decoder` on `x` when `passes` asks for them (the
/// MLP decoder on images, the LSTM decoder with a latent on text).
fn has_analytic_passes(passes: Passes, decoder: &Decoder, x: &Batch) -> bool {
    passes == Passes::Analytic
        && match (decoder, x) {
            (Decoder::Mlp(_), Batch::Images(_)) => true,
            (Decoder::Lstm(d), Batch::Text(_)) => d.init.is_some(),
            _ => false,
        }
}

impl<'a> InnerElbo<'a> {
    /// The analytic passes, when `passes` asks for them and the decoder has them.
    fn analytic(&self) -> Option<DecoderElbo<'a>> {
        if !has_analytic_passes(self.passes, self.decoder, self.x) {
            return None;
        }
        let (eps, beta) = (self.eps, self.beta);
        match (self.decoder, self.x) {
            (Decoder::Mlp(mlp), Batch::Images(x)) => {
                Some(DecoderElbo::Mlp(MlpElbo { mlp, x, eps, beta }))
            }
            (Decoder::Lstm(decoder), Batch::Text(x)) => Some(DecoderElbo::Lstm(LstmElbo {
                decoder,
                x,
                eps,
                beta,
            })),
            _ => None,
        }
    }

    /// The analytic point at λ with its Hessian cache (for products and mixed
    /// products), when the analytic passes apply.
    fn analytic_point(&self, lambda: &Tensor) -> Result<Option<ElboPoint>> {
        self.analytic().map(|a| a.at(lambda, true)).transpose()
    }

    /// (f(λ): [B], ∇_λ Σ f: [B, n]), detached.
    pub fn value_and_grad(&self, lambda: &Tensor) -> Result<(Tensor, Tensor)> {
        match self.analytic() {
            Some(a) => {
                let p = a.at(lambda, false)?;
                Ok((p.values().clone(), p.grad().clone()))
            }
            None => {
                let vg = elbo_vg(self.decoder, self.x, self.eps, self.beta, lambda)?;
                Ok((vg.values.detach(), vg.grad.detach()))
            }
        }
    }

    /// The value, the gradient and the Hessian at λ as an operator (the work that
    /// depends only on λ done once, for every product).
    pub fn with_hessian(
        &self,
        lambda: &Tensor,
    ) -> Result<(Tensor, Tensor, Box<dyn BatchedOperator>)> {
        match self.analytic() {
            Some(a) => {
                let p = a.at(lambda, true)?;
                Ok((p.values().clone(), p.grad().clone(), Box::new(PointHvp(p))))
            }
            None => {
                let vg = elbo_vg(self.decoder, self.x, self.eps, self.beta, lambda)?;
                let (v, g) = (vg.values.detach(), vg.grad.detach());
                Ok((
                    v,
                    g,
                    Box::new(ExactHvp {
                        lambda: vg.lambda,
                        grad: vg.grad,
                    }),
                ))
            }
        }
    }

    /// `f` of this objective on the examples at `rows` (None: all), at their rows of
    /// `lambda: [B, n]`.
    fn on_rows<T>(
        &self,
        lambda: &Tensor,
        rows: Option<&Tensor>,
        f: impl FnOnce(&InnerElbo<'_>, &Tensor) -> Result<T>,
    ) -> Result<T> {
        let Some(rows) = rows else {
            return f(self, lambda);
        };
        let (x, eps) = (self.x.select(rows)?, self.eps.select(rows)?);
        let part = InnerElbo {
            x: &x,
            eps: &eps,
            ..*self
        };
        f(&part, &lambda.index_select(rows, 0)?)
    }

    /// Refines `lambda0` on this objective with `svi` (Newton gets its Hessians, and
    /// evaluates only the examples still moving).
    pub fn refine(&self, lambda0: &Tensor, svi: &SviConfig, keep_path: bool) -> Result<Refinement> {
        let gf =
            |l: &Tensor, rows: Option<&Tensor>| self.on_rows(l, rows, |e, l| e.value_and_grad(l));
        let oracle =
            |l: &Tensor, rows: Option<&Tensor>| self.on_rows(l, rows, |e, l| e.with_hessian(l));
        refine_rows(&gf, Some(&oracle), lambda0, svi, keep_path)
    }

    /// [`InnerElbo::refine`] with ∇_λ Σ f at λ0 (`[B, n]`, detached), which its first
    /// evaluation, of every example at λ0, took: the encoder's own loss needs it.
    fn refine_keeping_start(
        &self,
        lambda0: &Tensor,
        svi: &SviConfig,
    ) -> Result<(Refinement, Tensor)> {
        let first = std::cell::RefCell::new(None);
        let keep = |rows: Option<&Tensor>, grad: &Tensor| {
            let mut f = first.borrow_mut();
            if rows.is_none() && f.is_none() {
                *f = Some(grad.clone());
            }
        };
        let gf = |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
            let out = self.on_rows(l, rows, |e, l| e.value_and_grad(l))?;
            keep(rows, &out.1);
            Ok(out)
        };
        let oracle = |l: &Tensor, rows: Option<&Tensor>| {
            let out = self.on_rows(l, rows, |e, l| e.with_hessian(l))?;
            keep(rows, &out.1);
            Ok(out)
        };
        let r = refine_rows(&gf, Some(&oracle), lambda0, svi, false)?;
        let start = match first.into_inner() {
            Some(g) => g,
            None => self.value_and_grad(lambda0)?.1,
        };
        Ok((r, start))
    }

    /// [`InnerElbo::refine`] keeping, for Newton refinements on the analytic passes, the
    /// point (with its Hessian cache) at the λ it ends on, which the implicit gradient's
    /// adjoint solve and mixed product need: without it they evaluate the same λ again.
    /// None for SGD and Adam (whose every step would pay for the cache), on autograd, and
    /// where λ_K is not the last λ evaluated (an example was reset to λ0).
    fn refine_keeping_last(
        &self,
        lambda0: &Tensor,
        svi: &SviConfig,
    ) -> Result<(Refinement, Option<ElboPoint>)> {
        let newton = matches!(svi.optimizer, SviOptimizer::Newton { .. });
        let Some(a) = self.analytic().filter(|_| newton) else {
            return Ok((self.refine(lambda0, svi, false)?, None));
        };
        // The λ-id and point of the latest value-and-gradient evaluation, the Hessian cache
        // included. Newton asks for these only at the end (the last step's trial points and
        // λ_K); each replaces the previous one.
        // Evaluations of some of the rows are not kept (λ_K is then put together from
        // several evaluations, and the adjoint evaluates it again).
        let last = std::cell::RefCell::new(None);
        let gf = |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
            if rows.is_some() {
                return self.on_rows(l, rows, |e, l| e.value_and_grad(l));
            }
            let p = a.at(l, true)?;
            let out = (p.values().clone(), p.grad().clone());
            *last.borrow_mut() = Some((l.id(), p));
            Ok(out)
        };
        let oracle =
            |l: &Tensor, rows: Option<&Tensor>| self.on_rows(l, rows, |e, l| e.with_hessian(l));
        let r = refine_rows(&gf, Some(&oracle), lambda0, svi, false)?;
        let point = match last.into_inner() {
            Some((id, p)) if id == r.lambda.id() => Some(p),
            _ => None,
        };
        Ok((r, point))
    }

    /// [`InnerElbo::refine`] keeping its path for the unrolled backward and, on the
    /// analytic passes, the point (with its Hessian cache) of every λ_k it visited, so
    /// that the backward does not recompute the forward at each step.
    fn refine_for_unrolled(
        &self,
        lambda0: &Tensor,
        svi: &SviConfig,
    ) -> Result<(Refinement, Points)> {
        let points = Points::default();
        let r = match self.analytic() {
            Some(a) => {
                let gf = |l: &Tensor| -> Result<(Tensor, Tensor)> {
                    let p = a.at(l, true)?;
                    let out = (p.values().clone(), p.grad().clone());
                    points.0.borrow_mut().insert(l.id(), p);
                    Ok(out)
                };
                let oracle = |l: &Tensor| self.with_hessian(l);
                refine_with_hvp(&gf, Some(&oracle), lambda0, svi, true)?
            }
            None => self.refine(lambda0, svi, true)?,
        };
        Ok((r, points))
    }
}

/// Refines `lambda0` on the ELBO of `decoder` (detached) with `svi`, derivatives by
/// `passes`; the Newton optimizer gets Hessian-vector products of the same ELBO.
#[allow(clippy::too_many_arguments)]
pub fn refine_elbo(
    decoder: &Decoder,
    x: &Batch,
    eps: &Noise,
    beta: f64,
    lambda0: &Tensor,
    svi: &SviConfig,
    keep_path: bool,
    passes: Passes,
) -> Result<Refinement> {
    InnerElbo {
        decoder,
        x,
        eps,
        beta,
        passes,
    }
    .refine(lambda0, svi, keep_path)
}

fn collect(store: &GradStore, model: &Vae, scale: f64) -> Result<Vec<Tensor>> {
    model
        .params
        .iter()
        .map(|(_, v)| match store.get(v.as_tensor()) {
            Some(g) => Ok((g.detach() * scale)?),
            None => Ok(v.as_tensor().zeros_like()?),
        })
        .collect()
}

/// Gradient sums for every parameter of a model, in `model.params` order; a parameter
/// nothing was added to is zero. The first term is kept as it is (0 + g = g), which saves
/// a zero-filled tensor and an addition per parameter on every step.
struct GradSum(Vec<Option<Tensor>>);

impl GradSum {
    fn new(model: &Vae) -> Self {
        Self(vec![None; model.params.len()])
    }

    /// Every parameter's gradient, given.
    fn of(grads: Vec<Tensor>) -> Self {
        Self(grads.into_iter().map(Some).collect())
    }

    /// Adds `extra`, the gradients of the parameters named `prefix…` in order.
    fn add(&mut self, model: &Vae, prefix: &str, extra: Vec<Tensor>) -> Result<()> {
        let idx = model
            .params
            .iter()
            .enumerate()
            .filter(|(_, (n, _))| n.starts_with(prefix))
            .map(|(i, _)| i);
        for (i, g) in idx.zip(extra) {
            self.0[i] = Some(match self.0[i].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        Ok(())
    }

    fn finish(self, model: &Vae) -> Result<Vec<Tensor>> {
        self.0
            .into_iter()
            .zip(model.params.iter())
            .map(|(g, (_, v))| match g {
                Some(g) => Ok(g),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect()
    }
}

fn svi_stats(r: &Refinement) -> SviStats {
    let finite: Vec<f64> = r
        .final_grad_norm
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    SviStats {
        steps: r.steps,
        final_grad_norm_max: finite.iter().copied().fold(0.0, f64::max),
        final_grad_norm_mean: finite.iter().sum::<f64>() / finite.len().max(1) as f64,
        resets: r.resets,
        backtracks: r.backtracks,
        line_search_failures: r.line_search_failures,
        hessian_products: r.hessian_products,
        evaluated_rows: r.evaluated_rows,
    }
}

/// Computes the loss and gradients of one step on a batch of B examples with noise
/// `eps: [S, B, d]`, the outer loss taken with the refinement's own draws.
pub fn train_step(model: &Vae, x: &Batch, eps: &Noise, cfg: &StepConfig) -> Result<StepOutput> {
    train_step_outer(model, x, eps, None, cfg)
}

/// [`train_step`] with the outer loss L(λ*, θ) = −ELBO(λ*; θ) of the refining modes
/// estimated with `outer_eps: [S', B, d]`, draws independent of the refinement's `eps`
/// (None: `eps` itself). λ* fits the draws it was refined on, so the ELBO at λ* on those
/// same draws is biased upward and its θ-gradient rewards decoders whose posteriors fit
/// a few draws; with independent draws the loss is an unbiased estimate of −ELBO(λ*).
/// The implicit gradient is unchanged in form: g = ∇_λ L uses `outer_eps`, the Hessian and
/// the mixed term ∇_θ(uᵀ∇_λ ELBO_S) use `eps` (the inner objective).
pub fn train_step_outer(
    model: &Vae,
    x: &Batch,
    eps: &Noise,
    outer_eps: Option<&Noise>,
    cfg: &StepConfig,
) -> Result<StepOutput> {
    let outer = outer_eps.unwrap_or(eps);
    let beta = cfg.beta;
    let dec_det = model.decoder.detached();
    let hand = HandEncoder::of(model, x, cfg.passes);
    // λ0 = enc(x). On the analytic passes the encoder's forward is taped for its hand
    // backward; otherwise autograd trains the encoder.
    let (lambda0, tape) = match &hand {
        Some(enc) => {
            if cfg.mode == Mode::Vae {
                return vae_step_analytic(model, enc, &dec_det, x, eps, beta);
            }
            let (l, t) = enc.forward_taped(x)?;
            (VariationalParams(l), Some(t))
        }
        _ => (model.encode(x)?, None),
    };
    match cfg.mode {
        Mode::Lm if cfg.passes == Passes::Analytic => lm_step_analytic(model, &dec_det, x),
        Mode::Lm | Mode::Vae => {
            // L = −(1/B) Σ ELBO_β(λ0), or −(1/B) Σ log p(x_b) for the language model.
            let (objective, kl) = if cfg.mode == Mode::Lm {
                (model.decoder.log_lik(x, None)?, 0.0)
            } else {
                let t = elbo(&model.decoder, x, &lambda0, eps, beta)?;
                (t.elbo, mean(&t.kl)?)
            };
            let loss_t = (objective.mean_all()? * -1.0)?;
            let store = loss_t.backward()?;
            let e = -loss_t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            Ok(StepOutput {
                grads: collect(&store, model, 1.0)?,
                loss: -e,
                elbo_amortized: e,
                elbo_refined: None,
                kl,
                svi: None,
                cg: None,
                lambda_refined: None,
                lambda0: lambda0.0.detach(),
            })
        }
        Mode::Svi | Mode::VaeSvi => {
            let inner = InnerElbo {
                decoder: &dec_det,
                x,
                eps,
                beta,
                passes: cfg.passes,
            };
            let (r, grad0) = inner.refine_keeping_start(&lambda0.0, &cfg.svi)?;
            let e0 = r
                .trace
                .first()
                .map(|s| s.mean_objective)
                .unwrap_or(f64::NAN);
            let on_outer = InnerElbo {
                eps: outer,
                ..inner
            };
            if let Some(a) = on_outer.analytic() {
                // The decoder's gradient from the analytic point at λ*; the encoder's by
                // its hand backward of its own loss −(1/B) Σ ELBO(λ0), decoder constant.
                let (er, mut grads, _) = analytic_loss(model, &a, &r.lambda)?;
                match (&model.encoder, &hand, &tape) {
                    (None, _, _) => {}
                    (Some(_), Some(enc), Some(tape)) => {
                        // −(1/B) ∇_λ Σ ELBO at λ0: the refinement's first evaluation.
                        let own = (&grad0 * (-1.0 / lambda0.0.dim(0)? as f64))?;
                        grads.add(model, "encoder.", enc.backward(tape, &own)?)?;
                    }
                    _ => anyhow::bail!("internal: the encoder has no taped forward"),
                }
                let kl = savae_model::gaussian_kl(&VariationalParams(r.lambda.clone()))?;
                return Ok(StepOutput {
                    grads: grads.finish(model)?,
                    loss: -er,
                    elbo_amortized: e0,
                    elbo_refined: Some(er),
                    kl: mean(&kl)?,
                    svi: Some(svi_stats(&r)),
                    cg: None,
                    lambda_refined: Some(r.lambda),
                    lambda0: lambda0.0.detach(),
                });
            }
            let refined = VariationalParams(r.lambda.clone());
            let t = elbo(&model.decoder, x, &refined, outer, beta)?;
            let mut loss_t = (t.elbo.mean_all()? * -1.0)?;
            if model.encoder.is_some() {
                // The encoder trains on its own ELBO at λ0 (decoder detached there).
                let t0 = elbo(&dec_det, x, &lambda0, eps, beta)?;
                loss_t = (loss_t - t0.elbo.mean_all()?)?;
            }
            let store = loss_t.backward()?;
            let er = mean(&t.elbo)?;
            Ok(StepOutput {
                grads: collect(&store, model, 1.0)?,
                loss: -er,
                elbo_amortized: e0,
                elbo_refined: Some(er),
                kl: mean(&t.kl)?,
                svi: Some(svi_stats(&r)),
                cg: None,
                lambda_refined: Some(r.lambda),
                lambda0: lambda0.0.detach(),
            })
        }
        Mode::Savae {
            gradient,
            encoder_loss,
        } => {
            let inputs = SavaeInputs {
                model,
                x,
                eps,
                outer_eps,
                beta,
                lambda0: &lambda0,
                dec_det: &dec_det,
                passes: cfg.passes,
                hand: hand.as_ref(),
                tape: tape.as_ref(),
            };
            savae_step(&inputs, &cfg.svi, gradient, encoder_loss)
        }
    }
}

/// The encoder with its weights detached, when the whole step runs on the analytic
/// passes (they are asked for and the decoder has them): its forward is taped and its
/// gradient formed by hand, so no autograd graph hangs on λ0.
enum HandEncoder {
    Mlp(Mlp),
    Lstm(LstmEncoder),
}

/// What [`HandEncoder::forward_taped`] keeps.
enum EncoderTape {
    Mlp(MlpTape),
    Lstm(LstmEncoderTape),
}

impl HandEncoder {
    fn of(model: &Vae, x: &Batch, passes: Passes) -> Option<Self> {
        if !has_analytic_passes(passes, &model.decoder, x) {
            return None;
        }
        match (&model.encoder, x) {
            (Some(Encoder::Mlp(e)), Batch::Images(_)) => Some(Self::Mlp(e.detached())),
            (Some(Encoder::Lstm(e)), Batch::Text(_)) => Some(Self::Lstm(e.detached())),
            _ => None,
        }
    }

    /// λ0 = enc(x): `[B, 2d]`, and the tape of its forward.
    fn forward_taped(&self, x: &Batch) -> Result<(Tensor, EncoderTape)> {
        match (self, x) {
            (Self::Mlp(e), Batch::Images(x)) => {
                let (l, t) = e.forward_taped(x)?;
                Ok((l, EncoderTape::Mlp(t)))
            }
            (Self::Lstm(e), Batch::Text(x)) => {
                let (l, t) = e.forward_taped(x)?;
                Ok((l, EncoderTape::Lstm(t)))
            }
            _ => anyhow::bail!("the batch does not match the encoder (images vs text)"),
        }
    }

    /// The encoder's parameter gradients of Σ (upstream ⊙ λ0), in `encoder.*` order.
    fn backward(&self, tape: &EncoderTape, upstream: &Tensor) -> Result<Vec<Tensor>> {
        match (self, tape) {
            (Self::Mlp(e), EncoderTape::Mlp(t)) => e.backward(t, upstream),
            (Self::Lstm(e), EncoderTape::Lstm(t)) => e.backward(t, upstream),
            _ => anyhow::bail!("the tape is not this encoder's"),
        }
    }
}

/// ∂/∂λ0 of the encoder's own loss −(1/B) Σ_b ELBO(λ0_b), the decoder constant: what its
/// hand backward takes when it trains on its own ELBO.
fn amortized_upstream(inner: &InnerElbo, lambda0: &Tensor) -> Result<Tensor> {
    let b = lambda0.dim(0)? as f64;
    Ok((inner.value_and_grad(lambda0)?.1 * (-1.0 / b))?)
}

fn scaled(ts: Vec<Tensor>, k: f64) -> Result<Vec<Tensor>> {
    ts.into_iter().map(|t| Ok((t * k)?)).collect()
}

/// L = −(1/B) Σ_b ELBO_β(λ_b) on the analytic passes of `elbo` (in row blocks): the
/// mean ELBO, ∂L/∂θ (the decoder's entries) and ∂L/∂λ.
fn analytic_loss(
    model: &Vae,
    elbo: &DecoderElbo,
    lambda: &Tensor,
) -> Result<(f64, GradSum, Tensor)> {
    loss_at_point(model, &elbo.at(lambda, true)?)
}

/// [`analytic_loss`] from the point at λ (made with its Hessian cache), `pt.values()`:
/// `[B]`.
fn loss_at_point(model: &Vae, pt: &ElboPoint) -> Result<(f64, GradSum, Tensor)> {
    let b = pt.values().dim(0)? as f64;
    let mut grads = GradSum::new(model);
    grads.add(model, "decoder.", scaled(pt.weight_grads()?, -1.0 / b)?)?;
    Ok((mean(pt.values())?, grads, (pt.grad() * (-1.0 / b))?))
}

/// The vae step on the analytic passes: L = −(1/B) Σ ELBO_β(λ0), λ0 = enc(x), with the
/// decoder's gradient from the point at λ0 and the encoder's by its hand backward of
/// ∂L/∂λ0. Every part is per example, so the whole step runs per row block
/// ([`savae_model::analytic::row_blocks`], two threads on a large enough CPU batch), and
/// the blocks' gradients are added in block order.
fn vae_step_analytic(
    model: &Vae,
    enc: &HandEncoder,
    dec_det: &Decoder,
    x: &Batch,
    eps: &Noise,
    beta: f64,
) -> Result<StepOutput> {
    use savae_model::analytic::{per_block, row_blocks, sum_in_order};
    let whole = InnerElbo {
        decoder: dec_det,
        x,
        eps,
        beta,
        passes: Passes::Analytic,
    }
    .analytic()
    .ok_or_else(|| anyhow::anyhow!("the decoder has no analytic passes"))?;
    let b = x.len();
    let scale = -1.0 / b as f64;
    let blocks = row_blocks(b, eps.0.device());
    let parts = per_block(&blocks, |start, len| {
        let (lambda0, tape) = enc.forward_taped(&x.rows(start, len)?)?;
        let pt = whole.rows_at(start, len, &lambda0, true)?;
        let enc_grads = enc.backward(&tape, &(pt.grad() * scale)?)?;
        Ok((pt.values().clone(), lambda0, pt.weight_grads()?, enc_grads))
    })?;
    // The decoder's block sum is scaled once; the encoder's came from scaled upstreams.
    let mut grads = GradSum::new(model);
    let (mut values, mut lambda0, mut dec) = (Vec::new(), Vec::new(), Vec::new());
    for (v, l, dec_grads, enc_grads) in parts {
        grads.add(model, "encoder.", enc_grads)?;
        dec.push(dec_grads);
        values.push(v);
        lambda0.push(l);
    }
    grads.add(model, "decoder.", scaled(sum_in_order(dec)?, scale)?)?;
    let e = mean(&Tensor::cat(&values, 0)?)?;
    let lambda0 = VariationalParams(Tensor::cat(&lambda0, 0)?);
    Ok(StepOutput {
        grads: grads.finish(model)?,
        loss: -e,
        elbo_amortized: e,
        elbo_refined: None,
        kl: mean(&savae_model::gaussian_kl(&lambda0)?)?,
        svi: None,
        cg: None,
        lambda_refined: None,
        lambda0: lambda0.0,
    })
}

/// The language model's step on the hand-derived passes: L = −(1/B) Σ_b log p(x_b) and
/// its gradient ([`savae_model::LstmDecoder::lm_log_lik_and_grads`]), per row block like
/// [`vae_step_analytic`].
fn lm_step_analytic(model: &Vae, dec_det: &Decoder, x: &Batch) -> Result<StepOutput> {
    use savae_model::analytic::{per_block, row_blocks, sum_in_order};
    let (Decoder::Lstm(dec), Batch::Text(text)) = (dec_det, x) else {
        anyhow::bail!("the language model reads text");
    };
    let b = x.len();
    let blocks = row_blocks(b, text.targets.device());
    let parts = per_block(&blocks, |start, len| {
        dec.lm_log_lik_and_grads(&text.rows(start, len)?)
    })?;
    let (values, dec): (Vec<Tensor>, Vec<Vec<Tensor>>) = parts.into_iter().unzip();
    let mut grads = GradSum::new(model);
    grads.add(
        model,
        "decoder.",
        scaled(sum_in_order(dec)?, -1.0 / b as f64)?,
    )?;
    let e = mean(&Tensor::cat(&values, 0)?)?;
    let lambda0 = model.encode(x)?;
    Ok(StepOutput {
        grads: grads.finish(model)?,
        loss: -e,
        elbo_amortized: e,
        elbo_refined: None,
        kl: 0.0,
        svi: None,
        cg: None,
        lambda_refined: None,
        lambda0: lambda0.0.detach(),
    })
}

/// What an SA-VAE step shares between its parts.
struct SavaeInputs<'a> {
    model: &'a Vae,
    x: &'a Batch,
    /// The refinement's draws (the inner objective).
    eps: &'a Noise,
    /// The outer loss's draws (None: `eps`).
    outer_eps: Option<&'a Noise>,
    beta: f64,
    lambda0: &'a VariationalParams,
    /// The decoder with its parameters detached.
    dec_det: &'a Decoder,
    passes: Passes,
    /// The encoder with its hand backward, when the analytic passes apply.
    hand: Option<&'a HandEncoder>,
    /// The encoder's taped forward (analytic passes with an encoder).
    tape: Option<&'a EncoderTape>,
}

impl<'a> SavaeInputs<'a> {
    /// The inner objective (the refinement's draws, decoder constant).
    fn inner(&self) -> InnerElbo<'a> {
        InnerElbo {
            decoder: self.dec_det,
            x: self.x,
            eps: self.eps,
            beta: self.beta,
            passes: self.passes,
        }
    }

    /// The inner ELBO at `lambda` with the model's decoder (parameter gradients kept).
    fn inner_at(&self, lambda: &Tensor) -> Result<ValueGrad> {
        elbo_vg(&self.model.decoder, self.x, self.eps, self.beta, lambda)
    }

    /// The decoder's parameter tensors, in `model.decoder_params()` order.
    fn decoder_tensors(&self) -> Vec<Tensor> {
        self.model
            .decoder_params()
            .iter()
            .map(|(_, v)| v.as_tensor().clone())
            .collect()
    }
}

/// The SA-VAE step: refine λ0 → λ*, L = −(1/B) Σ ELBO(λ*) on the outer draws, and
/// ∂L/∂θ, ∂L/∂λ0 by the chosen [`SavaeGradient`]; the encoder then gets ∂L/∂λ0 through
/// λ0 = enc(x) or its own ELBO ([`EncoderLoss`]).
fn savae_step(
    s: &SavaeInputs,
    svi: &SviConfig,
    gradient: SavaeGradient,
    encoder_loss: EncoderLoss,
) -> Result<StepOutput> {
    let (model, b) = (s.model, s.x.len() as f64);
    let unrolled = matches!(gradient, SavaeGradient::Unrolled { .. });
    let (r, points, mut at_optimum) = if unrolled {
        let (r, points) = s.inner().refine_for_unrolled(&s.lambda0.0, svi)?;
        // The backward steps back from λ_K and needs no point there: the loss takes it.
        let last = points.take(&r.lambda);
        (r, points, last)
    } else {
        let (r, last) = s.inner().refine_keeping_last(&s.lambda0.0, svi)?;
        (r, Points::default(), last)
    };
    let e0 = r
        .trace
        .first()
        .map(|s| s.mean_objective)
        .unwrap_or(f64::NAN);
    // ELBO at λ* with the model's decoder and the outer draws: ∂_θ L and ∇_λ L (on
    // autograd with the refinement's own draws, the graph is kept for the mixed term).
    let outer = s.outer_eps.unwrap_or(s.eps);
    let on_outer = InnerElbo {
        eps: outer,
        ..s.inner()
    };
    let (refined_elbo, mut grads, g, at_opt) = match on_outer.analytic() {
        // On the refinement's own draws the loss's point at λ* is the inner ELBO's: one
        // point, the refinement's last where it kept it, serves the loss and the adjoint.
        Some(a) if s.outer_eps.is_none() => {
            let pt = match at_optimum.take() {
                Some(p) => p,
                None => a.at(&r.lambda, true)?,
            };
            let (e, grads, g) = loss_at_point(model, &pt)?;
            at_optimum = Some(pt);
            (e, grads, g, None)
        }
        Some(a) => {
            let (e, grads, g) = analytic_loss(model, &a, &r.lambda)?;
            (e, grads, g, None)
        }
        None => {
            let at_opt = elbo_vg(&model.decoder, s.x, outer, s.beta, &r.lambda)?;
            // L = −(1/B) Σ ELBO → ∂_θ L and g = ∇_λ L.
            let grads = GradSum::of(collect(&at_opt.store, model, -1.0 / b)?);
            let g = (at_opt.grad.detach() * (-1.0 / b))?;
            (mean(&at_opt.values)?, grads, g, Some(at_opt))
        }
    };
    let kl = mean(&savae_model::gaussian_kl(&VariationalParams(
        r.lambda.clone(),
    ))?)?;
    let (lambda0_grad, decoder_grads, cg_stats) = match gradient {
        SavaeGradient::Unrolled { reverse_clip } => {
            let (l0, dec) = unrolled_gradient(s, &r, &g, svi, reverse_clip, &points)?;
            (l0, dec, None)
        }
        SavaeGradient::Implicit(imp) => {
            let outer_is_inner = at_opt.as_ref().filter(|_| s.outer_eps.is_none());
            let (l0, dec, stats) =
                implicit_gradient(s, &r, &g, svi.prox, &imp, outer_is_inner, at_optimum)?;
            (l0, dec, Some(stats))
        }
    };
    grads.add(model, "decoder.", decoder_grads)?;
    if model.encoder.is_some() {
        let through_refinement =
            encoder_loss == EncoderLoss::Refined && (unrolled || svi.prox > 0.0);
        let enc_grads = encoder_gradient(s, through_refinement.then_some(&lambda0_grad))?;
        grads.add(model, "encoder.", enc_grads)?;
    }
    Ok(StepOutput {
        grads: grads.finish(model)?,
        loss: -refined_elbo,
        elbo_amortized: e0,
        elbo_refined: Some(refined_elbo),
        kl,
        svi: Some(svi_stats(&r)),
        cg: cg_stats,
        lambda_refined: Some(r.lambda),
        lambda0: s.lambda0.0.detach(),
    })
}

/// ∂L/∂λ0 and the decoder's second-order term by backpropagating `g = ∇_λ L` through the
/// recorded SGD path of the refinement.
fn unrolled_gradient(
    s: &SavaeInputs,
    r: &Refinement,
    g: &Tensor,
    svi: &SviConfig,
    clip: Option<ReverseClip>,
    points: &Points,
) -> Result<(Tensor, Vec<Tensor>)> {
    let dec_tensors = s.decoder_tensors();
    let inner = s.inner();
    let second_order = |lam: &Tensor, w: &Tensor| -> Result<(Tensor, Vec<Tensor>)> {
        let kept = match points.take(lam) {
            Some(p) => Some(p),
            None => inner.analytic_point(lam)?,
        };
        if let Some(p) = kept {
            return p.hvp_and_mixed(&w.detach());
        }
        let vg = s.inner_at(lam)?;
        let mut refs = vec![vg.lambda.as_tensor()];
        refs.extend(dec_tensors.iter());
        let mut out = grads_of_dot(&vg.grad, &w.detach(), &refs)?;
        let hw = out.remove(0);
        Ok((hw, out))
    };
    let zeros = dec_tensors
        .iter()
        .map(|t| t.zeros_like())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ug = unrolled_backward(&second_order, r, g, svi, clip, zeros)?;
    Ok((ug.lambda0_grad, ug.theta_grads))
}

/// ∂L/∂λ0 = γu and the mixed term ∇_θ(uᵀ ∇_λ ELBO(λ*)) from the adjoint solve
/// ((γ + δ) I − H) u = g, with H the Hessian of the inner ELBO at λ*. `outer_is_inner`
/// is the ELBO at λ* already computed on the refinement's draws, when the outer loss uses
/// them (its graph then gives the mixed term); `at_optimum` the analytic point at λ* that
/// the refinement left, if it did.
fn implicit_gradient(
    s: &SavaeInputs,
    r: &Refinement,
    g: &Tensor,
    gamma: f64,
    imp: &ImplicitGradient,
    outer_is_inner: Option<&ValueGrad>,
    at_optimum: Option<ElboPoint>,
) -> Result<(Tensor, Vec<Tensor>, CgStats)> {
    let untrusted: Vec<bool> = r
        .final_grad_norm
        .iter()
        .map(|&n| !(n.is_finite() && n <= imp.stationarity_tol))
        .collect();
    let inner = s.inner();
    let rel = FdHvp::<fn(&Tensor) -> Result<Tensor>>::default_rel_step(r.lambda.dtype());
    // HVPs of the constant-decoder objective (no parameter gradients).
    // The analytic point at λ* serves the products and the mixed term.
    let point = match (imp.hvp, at_optimum) {
        (HvpKind::Exact, Some(p)) => Some(p),
        (HvpKind::Exact, None) => inner.analytic_point(&r.lambda)?,
        (HvpKind::FiniteDifference, _) => None,
    };
    let op: Box<dyn BatchedOperator + '_> = match (imp.hvp, &point) {
        (HvpKind::Exact, Some(p)) => Box::new(PointHvp(p)),
        (HvpKind::Exact, None) => inner.with_hessian(&r.lambda)?.2,
        (HvpKind::FiniteDifference, _) => Box::new(FdHvp {
            grad_fn: move |l: &Tensor| Ok(inner.value_and_grad(l)?.1),
            lambda: r.lambda.clone(),
            rel_step: rel,
        }),
    };
    let sol = solve_adjoint(op.as_ref(), g, gamma, &imp.solve, &untrusted)?;
    let dec_tensors = s.decoder_tensors();
    let dec_refs: Vec<&Tensor> = dec_tensors.iter().collect();
    let mixed = match (imp.hvp, &point) {
        (HvpKind::Exact, Some(p)) => p.hvp_and_mixed(&sol.u_solved)?.1,
        (HvpKind::Exact, None) => match outer_is_inner {
            Some(at_opt) => mixed_product_exact(at_opt, &sol.u_solved, &dec_refs)?,
            None => mixed_product_exact(&s.inner_at(&r.lambda)?, &sol.u_solved, &dec_refs)?,
        },
        (HvpKind::FiniteDifference, _) => {
            let theta_grad_fn = |l: &Tensor| -> Result<Vec<Tensor>> {
                let vg = s.inner_at(l)?;
                dec_refs
                    .iter()
                    .map(|t| match vg.store.get(t) {
                        Some(g) => Ok(g.detach()),
                        None => Ok(t.zeros_like()?),
                    })
                    .collect()
            };
            mixed_product_fd(theta_grad_fn, &r.lambda, &sol.u_solved, rel)?
        }
    };
    let stats = CgStats::of(&sol);
    Ok((sol.lambda0_grad, mixed, stats))
}

/// The encoder's gradient: through λ0 = enc(x) with `lambda0_grad` = ∂L/∂λ0, or (None)
/// its own ELBO at λ0 with the decoder detached (`--encoder-loss amortized`, or γ = 0,
/// where no gradient reaches the encoder through the optimum).
fn encoder_gradient(s: &SavaeInputs, lambda0_grad: Option<&Tensor>) -> Result<Vec<Tensor>> {
    if let (Some(enc), Some(tape)) = (s.hand, s.tape) {
        // By hand: the encoder's backward of ∂L/∂λ0, or of its own loss
        // −(1/B) Σ ELBO(λ0) with the decoder constant.
        let upstream = match lambda0_grad {
            Some(l0) => l0.detach(),
            None => amortized_upstream(&s.inner(), &s.lambda0.0)?,
        };
        return enc.backward(tape, &upstream);
    }
    let enc_loss = match lambda0_grad {
        // ∂L/∂φ = (∂L/∂λ0)ᵀ ∂λ0/∂φ.
        Some(l0) => (&s.lambda0.0 * l0.detach())?.sum_all()?,
        None => {
            let t0 = elbo(s.dec_det, s.x, s.lambda0, s.eps, s.beta)?;
            (t0.elbo.mean_all()? * -1.0)?
        }
    };
    let store = enc_loss.backward()?;
    s.model
        .encoder_params()
        .iter()
        .map(|(_, v)| {
            Ok(store
                .get(v.as_tensor())
                .map(|g| g.detach())
                .unwrap_or(v.as_tensor().zeros_like()?))
        })
        .collect()
}

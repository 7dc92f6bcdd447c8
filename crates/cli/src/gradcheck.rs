//! `savae gradcheck`: the SA-VAE parameter gradient three ways, in f64, on a few images.
//!
//! (a) implicit (CG on exact HVPs at the converged optimum), (b) unrolled through every
//! SGD step, (c) central finite differences of the whole pipeline (refine to
//! convergence, then the loss) on a seeded random subset of parameters. Prints one JSON
//! object — every setting, the steps taken, the errors, `pass` and, when it fails, why —
//! and exits non-zero when the check fails.
//!
//! The SGD step defaults to 1/L, L the largest eigenvalue of the inner objective's
//! Hessian γI − H at λ0 (power iteration on exact HVPs): SGD with momentum 0.5 is stable
//! below 3/L, and a fixed step that suits a fresh model diverges on a trained one
//! (L ≈ 100–250 on `checkpoints/mnist-vae.safetensors`).

use crate::data_dir;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use savae_implicit::{
    row_dot, row_norms, BatchedOperator, CgConfig, HvpKind, ShiftedNegHessian, ShiftedSolve,
};
use savae_inference::{NewtonSolve, SviConfig, SviMethod, SviOptimizer};
use savae_model::{ModelConfig, Noise, Vae};
use savae_train::checkpoint;
use savae_train::options::{Activation, EncoderLoss, ModelKind, OuterNoise, Passes};
use savae_train::step::{
    train_step_outer, ImplicitGradient, InnerElbo, Mode, SavaeGradient, StepConfig, StepOutput,
};
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct GradcheckArgs {
    /// Check this trained model (with an encoder) instead of a small fresh one.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Test images, spread evenly over the (class-sorted) test file.
    #[arg(long, default_value_t = 4)]
    pub examples: usize,
    /// Parameters checked by finite differences (a seeded random subset).
    #[arg(long, default_value_t = 12)]
    pub fd_params: usize,
    /// Refinement steps (implicit: up to convergence; unrolled: all of them).
    #[arg(long, default_value_t = 3000)]
    pub svi_steps: usize,
    /// Per-example SGD step size of the refinement [default: 1/L, L the largest
    /// eigenvalue of γI − H at λ0].
    #[arg(long)]
    pub svi_lr: Option<f64>,
    /// Proximal weight γ (> 0, so that the encoder gets a gradient).
    #[arg(long, default_value_t = 5.0)]
    pub prox: f64,
    /// Noise draws per example that the refinement's ELBO averages (training's `--samples`).
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Also take the implicit gradient with the adjoint CG stopped after this many
    /// iterations (at training's default tolerance, `--cg-tol` 1e-4), as a training run does, and
    /// report its relative error against the converged solve's gradient: what the cap
    /// costs in accuracy. Not part of `pass`.
    #[arg(long)]
    pub cg_iters: Option<usize>,
    /// Also take the implicit gradient at the λ_K that this many `newton-ls` steps reach
    /// (training's refinement, with the exact and with the inexact Newton solve, see
    /// `savae train --newton-solve`), the adjoint solved as in the converged check, and
    /// report each one's relative error against the converged optimum's gradient: what a
    /// short, less stationary refinement costs in accuracy. Not part of `pass`.
    #[arg(long)]
    pub newton_steps: Option<usize>,
    /// With `--newton-steps`: stop each example's Newton refinement once its ‖∇F_b‖ falls
    /// below this (training's `--svi-tol`; 0: every example takes every step).
    #[arg(long, default_value_t = 0.0, requires = "newton_steps")]
    pub newton_tol: f64,
    /// The noise of the outer loss: fresh (independent draws, the training default) or
    /// same (the refinement's draws).
    #[arg(long, value_enum, default_value_t = OuterNoise::Fresh)]
    pub outer_noise: OuterNoise,
    /// What trains the encoder: refined (the loss at λ*, SA-VAE) or amortized.
    #[arg(long, value_enum, default_value_t = EncoderLoss::Refined)]
    pub encoder_loss: EncoderLoss,
    /// Derivatives in λ of the inner ELBO (refinement and adjoint): analytic or autograd.
    #[arg(long, value_enum, default_value_t = Passes::Analytic)]
    pub passes: Passes,
    /// The refinement counts as stationary when every ‖∇F_b(λ_K)‖ is below this.
    #[arg(long, default_value_t = 1e-8)]
    pub stationarity_tol: f64,
    /// Largest relative error accepted.
    #[arg(long, default_value_t = 1e-6)]
    pub tol: f64,
    /// Write the images, ε, λ0, λ*, the parameters and every gradient to this
    /// safetensors file, with the JSON report as its metadata (written also when the
    /// check fails, marked `"pass": false`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seed of the fresh model, the binarization, the noise and the parameter subset.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The folder holding mnist/ and ptb/ [default: the shipped data/].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// cpu | cuda | cuda:N (the check runs in f64 on that device).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Every setting of a check: with the checkpoint (or the seed of the fresh model) and
/// the data, enough to rebuild it.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    checkpoint: Option<String>,
    model: ModelConfig,
    dataset: String,
    split: &'static str,
    batch_indices: Vec<usize>,
    seed: u64,
    dtype: &'static str,
    beta: f64,
    /// What the gradient is of.
    loss: &'static str,
    noise_samples: usize,
    outer_noise: OuterNoise,
    encoder_loss: EncoderLoss,
    svi: SviSettings,
    cg_max_iters: usize,
    cg_tol: f64,
    cg_damping: f64,
    cg_retries: usize,
    hvp: HvpKind,
    passes: Passes,
    finite_differences: &'static str,
    fd_params: usize,
    stationarity_tol: f64,
    tol: f64,
}

#[derive(Debug, Clone, Serialize)]
struct SviSettings {
    optimizer: &'static str,
    lr: f64,
    /// "curvature" (1/L at λ0) or "flag".
    lr_from: &'static str,
    momentum: f64,
    /// Per-example gradient clipping (none: the exact SGD path).
    clip: Option<f64>,
    steps: usize,
    prox: f64,
    /// The implicit path's early stop (the unrolled path takes every step).
    early_stop_tol: f64,
}

/// The curvature of the inner objective −F at λ0, by power iteration.
#[derive(Debug, Clone, Serialize)]
struct Curvature {
    /// Per example, the largest-magnitude eigenvalue of γI − H at λ0.
    largest_eigenvalue: Vec<f64>,
    iterations: usize,
}

const LOSS: &str = "L = -(1/B) sum_b ELBO_beta(lambda*_b; theta), one draw per example; \
                    gradients of L w.r.t. every parameter (with encoder_loss amortized, the \
                    encoder's of its own -(1/B) sum_b ELBO_beta(lambda0_b) on the \
                    refinement's draws, the decoder held)";

/// What finite differences differentiate for one parameter: the step's gradient of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FdLoss {
    /// L, the loss at λ* (every parameter, with `--encoder-loss refined`).
    Refined,
    /// The encoder's own loss −(1/B) Σ_b ELBO_β(λ0_b) on the refinement's draws
    /// (`--encoder-loss amortized`): λ* does not enter it.
    Amortized,
}

impl FdLoss {
    fn of(encoder_loss: EncoderLoss, param: &str) -> Self {
        if encoder_loss == EncoderLoss::Amortized && param.starts_with("encoder.") {
            FdLoss::Amortized
        } else {
            FdLoss::Refined
        }
    }

    fn name(self) -> &'static str {
        match self {
            FdLoss::Refined => "refined",
            FdLoss::Amortized => "amortized",
        }
    }
}
const FD_RULE: &str = "central, h = 1e-5 * max(1, |theta_i|), the refinement rerun to \
                       convergence at theta +- h";

pub fn run(a: GradcheckArgs) -> Result<()> {
    savae_implicit::ensure_second_order()?;
    if a.examples == 0 {
        bail!("--examples must be at least 1");
    }
    if a.svi_steps == 0 {
        bail!("--svi-steps must be at least 1");
    }
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if a.cg_iters == Some(0) {
        bail!("--cg-iters must be at least 1");
    }
    if a.newton_steps == Some(0) {
        bail!("--newton-steps must be at least 1");
    }
    if !(a.newton_tol >= 0.0 && a.newton_tol.is_finite()) {
        bail!(
            "--newton-tol must be a finite number >= 0 (got {})",
            a.newton_tol
        );
    }
    if a.prox.is_nan() || a.prox <= 0.0 {
        bail!("--prox must be positive (got {})", a.prox);
    }
    if let Some(lr) = a.svi_lr {
        if lr.is_nan() || lr <= 0.0 {
            bail!("--svi-lr must be positive (got {lr})");
        }
    }
    let dev = crate::device::resolve(&a.device)?;
    let (model, dataset) = load_model(&a, &dev)?;
    let data = savae_data::ImageData::load(
        savae_data::DatasetKind::parse(&dataset)?,
        &data_dir(a.data_dir.as_ref()),
    )?;
    let n = data.test.len;
    let idx: Vec<usize> = (0..a.examples)
        .map(|i| (i * n / a.examples + 7) % n)
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let images = savae_train::batch::images(&data.test, &idx, &mut rng, DType::F64, &dev)?;
    let x = savae_model::Batch::Images(images.clone());
    let d = model.latent_dim();
    let eps = savae_train::batch::noise(&mut rng, a.samples, idx.len(), d, DType::F64, &dev)?;
    let outer_eps = match a.outer_noise {
        OuterNoise::Fresh => Some(savae_train::batch::noise(
            &mut rng,
            1,
            idx.len(),
            d,
            DType::F64,
            &dev,
        )?),
        OuterNoise::Same => None,
    };
    let beta = 1.0;
    let decoder = model.decoder.detached();
    let inner = InnerElbo {
        decoder: &decoder,
        x: &x,
        eps: &eps,
        beta,
        passes: a.passes,
    };
    let lambda0 = model.encode(&x)?.0.detach();
    let curvature = curvature_at_start(&inner, &lambda0, a.prox, &mut rng)?;
    let (lr, lr_from) = match a.svi_lr {
        Some(lr) => (lr, "flag"),
        None => {
            let l = curvature
                .largest_eigenvalue
                .iter()
                .fold(0.0f64, |m, v| m.max(v.abs()));
            if !l.is_finite() || l <= 0.0 {
                bail!("the curvature at λ0 is not finite ({l}); set --svi-lr by hand");
            }
            (1.0 / l, "curvature")
        }
    };
    let solve = ShiftedSolve {
        cg: CgConfig {
            max_iters: 500,
            tol: 1e-12,
            ..Default::default()
        },
        damping: 0.0,
        retries: 3,
    };
    let settings = Settings {
        checkpoint: a.checkpoint.as_ref().map(|p| p.display().to_string()),
        model: model.config.clone(),
        dataset,
        split: "test",
        batch_indices: idx.clone(),
        seed: a.seed,
        dtype: "f64",
        beta,
        loss: LOSS,
        noise_samples: a.samples,
        outer_noise: a.outer_noise,
        encoder_loss: a.encoder_loss,
        svi: SviSettings {
            optimizer: "sgd",
            lr,
            lr_from,
            momentum: 0.5,
            clip: None,
            steps: a.svi_steps,
            prox: a.prox,
            early_stop_tol: 1e-11,
        },
        cg_max_iters: solve.cg.max_iters,
        cg_tol: solve.cg.tol,
        cg_damping: solve.damping,
        cg_retries: solve.retries,
        hvp: HvpKind::Exact,
        passes: a.passes,
        finite_differences: FD_RULE,
        fd_params: a.fd_params,
        stationarity_tol: a.stationarity_tol,
        tol: a.tol,
    };
    let converged = ImplicitGradient {
        solve,
        hvp: HvpKind::Exact,
        // Diagnosed below rather than replaced by the fallback.
        stationarity_tol: f64::INFINITY,
    };
    let implicit = SavaeGradient::Implicit(converged);
    let cfg = |gradient: SavaeGradient| StepConfig {
        mode: Mode::Savae {
            gradient,
            encoder_loss: a.encoder_loss,
        },
        beta,
        svi: SviConfig {
            steps: a.svi_steps,
            optimizer: SviOptimizer::Sgd {
                lr,
                momentum: 0.5,
                clip: f64::INFINITY,
            },
            prox: a.prox,
            tol: if matches!(gradient, SavaeGradient::Unrolled { .. }) {
                0.0
            } else {
                settings.svi.early_stop_tol
            },
            batch_size: 1,
        },
        passes: a.passes,
    };
    let step_with = |c: &StepConfig| train_step_outer(&model, &x, &eps, outer_eps.as_ref(), c);
    let step = |gradient| step_with(&cfg(gradient));
    let imp = step(implicit)?;
    let unr = step(SavaeGradient::Unrolled { reverse_clip: None })?;
    let gi = flat(&imp.grads)?;
    let gu = flat(&unr.grads)?;
    let capped = match a.cg_iters {
        Some(iters) => Some(capped_solve(iters, &converged, &gi, &step)?),
        None => None,
    };
    let newton = match a.newton_steps {
        Some(k) => [NewtonSolve::Exact, NewtonSolve::Inexact]
            .into_iter()
            .map(|solve| {
                let mut c = cfg(implicit);
                c.svi = SviConfig {
                    steps: k,
                    optimizer: SviMethod::NewtonLs.with_lr(1.0).with_newton_solve(solve),
                    tol: a.newton_tol,
                    ..c.svi
                };
                short_refinement(solve, a.newton_tol, &gi, &step_with(&c)?)
            })
            .collect::<Result<Vec<_>>>()?,
        None => Vec::new(),
    };
    // Finite differences on a random subset of parameters.
    let vars = model.params.vars();
    let names: Vec<String> = model.params.iter().map(|(n, _)| n.to_string()).collect();
    let total: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut picks: Vec<usize> = (0..a.fd_params.min(total))
        .map(|_| rng.random_range(0..total))
        .collect();
    picks.sort();
    picks.dedup();
    let mut fd = Vec::new();
    let mut checked = Vec::new();
    for &p in &picks {
        let (mut vi, mut off) = (0, p);
        while off >= vars[vi].elem_count() {
            off -= vars[vi].elem_count();
            vi += 1;
        }
        let var = &vars[vi];
        let base = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
        let h = 1e-5 * base[off].abs().max(1.0);
        // The loss whose gradient the step gives this parameter.
        let of = FdLoss::of(a.encoder_loss, &names[vi]);
        let loss_at = |delta: f64| -> Result<f64> {
            let mut w = base.clone();
            w[off] += delta;
            var.set(&Tensor::from_vec(w, var.shape(), &dev)?)?;
            let out = step(implicit)?;
            Ok(match of {
                FdLoss::Refined => out.loss,
                FdLoss::Amortized => -out.elbo_amortized,
            })
        };
        let d = (loss_at(h)? - loss_at(-h)?) / (2.0 * h);
        var.set(&Tensor::from_vec(base, var.shape(), &dev)?)?;
        fd.push(d);
        checked.push(json!({"param": names[vi], "index": off, "of": of.name(), "fd": d, "implicit": gi[p], "unrolled": gu[p]}));
    }
    let gi_p: Vec<f64> = picks.iter().map(|&p| gi[p]).collect();
    let gu_p: Vec<f64> = picks.iter().map(|&p| gu[p]).collect();
    let errors = Errors {
        implicit_vs_fd: rel_err(&gi_p, &fd),
        unrolled_vs_fd: rel_err(&gu_p, &fd),
        implicit_vs_unrolled: rel_err(&gi, &gu),
    };
    let finite = [&gi, &gu, &fd]
        .iter()
        .all(|v| v.iter().all(|x| x.is_finite()))
        && imp.loss.is_finite();
    let problems = diagnose(&settings, &imp, &unr, &errors, finite);
    let pass = problems.is_empty();
    let svi_of = |o: &StepOutput| o.svi.clone();
    let report = json!({
        "pass": pass,
        "problems": problems,
        "rel_err_implicit_vs_fd": errors.implicit_vs_fd,
        "rel_err_unrolled_vs_fd": errors.unrolled_vs_fd,
        "rel_err_implicit_vs_unrolled": errors.implicit_vs_unrolled,
        "all_finite": finite,
        "loss": imp.loss,
        "examples": idx.len(),
        "refinement_implicit": svi_of(&imp),
        "refinement_unrolled": svi_of(&unr),
        "final_inner_grad_norm_max": imp.svi.as_ref().map(|s| s.final_grad_norm_max),
        "cg": imp.cg,
        "cg_capped": capped,
        "newton_refinement": newton,
        "curvature_at_lambda0": curvature,
        "fd_params": checked,
        "settings": settings,
        "device": crate::device::name(&dev),
    });
    println!("{report}");
    if let Some(out) = &a.out {
        let tensors = Outputs {
            images: &images,
            idx: &idx,
            eps: &eps,
            outer_eps: outer_eps.as_ref(),
            imp: &imp,
            unr: &unr,
        };
        write_out(out, &model, &tensors, &report)
            .with_context(|| format!("--out {}", out.display()))?;
    }
    if !pass {
        bail!("gradient check failed:\n  - {}", problems.join("\n  - "));
    }
    Ok(())
}

/// The implicit gradient with the adjoint CG capped at `iters` iterations and training's
/// default tolerance, everything else as in the converged solve `base` (whose gradient is
/// `converged`), against the converged one.
#[derive(Debug, Clone, Serialize)]
struct CappedSolve {
    max_iters: usize,
    tol: f64,
    /// ‖g_capped − g‖ / ‖g‖ over every parameter, g the converged solve's gradient.
    rel_err_vs_converged: f64,
    /// g_capped · g / (‖g_capped‖ ‖g‖).
    cosine: f64,
    cg: Option<savae_train::step::CgStats>,
}

fn capped_solve(
    iters: usize,
    base: &ImplicitGradient,
    converged: &[f64],
    step: &dyn Fn(SavaeGradient) -> Result<StepOutput>,
) -> Result<CappedSolve> {
    let tol = savae_train::config::TrainConfig::default().cg_tol;
    let out = step(SavaeGradient::Implicit(ImplicitGradient {
        solve: ShiftedSolve {
            cg: CgConfig {
                max_iters: iters,
                tol,
                ..Default::default()
            },
            ..base.solve
        },
        ..*base
    }))?;
    let g = flat(&out.grads)?;
    Ok(CappedSolve {
        max_iters: iters,
        tol,
        rel_err_vs_converged: rel_err(&g, converged),
        cosine: cosine(&g, converged),
        cg: out.cg,
    })
}

/// The implicit gradient at the λ_K of a short `newton-ls` refinement (K steps, the
/// Newton directions solved as `solve` says), against the converged optimum's.
#[derive(Debug, Clone, Serialize)]
struct ShortRefinement {
    solve: &'static str,
    /// Each example stopped once its ‖∇F_b‖ < tol (0: after every step).
    tol: f64,
    /// Newton steps taken (by the last example to stop).
    steps: usize,
    /// Examples evaluated over the refinement (K + 1 evaluations of every one without a
    /// per-example stop or line-search halvings).
    evaluated_rows: usize,
    /// Batched Hessian-vector products of the Newton solves.
    hessian_products: usize,
    /// max_b and mean_b ‖∇F_b(λ_K)‖.
    final_grad_norm_max: f64,
    final_grad_norm_mean: f64,
    /// ‖g_K − g‖ / ‖g‖ over every parameter, g the converged optimum's gradient.
    rel_err_vs_converged: f64,
    /// g_K · g / (‖g_K‖ ‖g‖).
    cosine: f64,
}

fn short_refinement(
    solve: NewtonSolve,
    tol: f64,
    converged: &[f64],
    out: &StepOutput,
) -> Result<ShortRefinement> {
    let g = flat(&out.grads)?;
    let svi = out.svi.clone().unwrap_or_default();
    Ok(ShortRefinement {
        solve: solve.name(),
        tol,
        steps: svi.steps,
        evaluated_rows: svi.evaluated_rows,
        hessian_products: svi.hessian_products,
        final_grad_norm_max: svi.final_grad_norm_max,
        final_grad_norm_mean: svi.final_grad_norm_mean,
        rel_err_vs_converged: rel_err(&g, converged),
        cosine: cosine(&g, converged),
    })
}

/// a · b / (‖a‖ ‖b‖).
fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn load_model(a: &GradcheckArgs, dev: &Device) -> Result<(Vae, String)> {
    match &a.checkpoint {
        Some(p) => {
            let ck = checkpoint::load(p)?;
            if !ck.meta.model.has_encoder() {
                bail!(
                    "{}: gradcheck needs a model with an encoder (this one is {})",
                    p.display(),
                    ck.meta.model.kind
                );
            }
            if ck.meta.dataset == "ptb" {
                bail!(
                    "{}: gradcheck checks image models (this one is trained on {})",
                    p.display(),
                    ck.meta.dataset
                );
            }
            Ok((ck.model(p, DType::F64, dev)?, ck.meta.dataset.clone()))
        }
        None => {
            let cfg = ModelConfig {
                kind: ModelKind::Savae,
                latent_dim: 4,
                hidden: vec![32],
                activation: Activation::Softplus,
                input_dim: savae_data::PIXELS,
                vocab_size: 0,
                embed_dim: 0,
                dropout: 0.0,
            };
            Ok((
                Vae::new(&cfg, a.seed, DType::F64, dev)?,
                "mnist".to_string(),
            ))
        }
    }
}

/// Per example, the largest-magnitude eigenvalue of γI − H_f(λ0) (the Hessian of the
/// minimized inner objective −F), by 50 power iterations on the inner ELBO's exact HVPs.
fn curvature_at_start(
    inner: &InnerElbo,
    lambda0: &Tensor,
    prox: f64,
    rng: &mut impl Rng,
) -> Result<Curvature> {
    const ITERS: usize = 50;
    let hvp = inner.with_hessian(lambda0)?.2;
    let op = ShiftedNegHessian {
        hvp: hvp.as_ref(),
        shift: prox,
    };
    let (b, n) = lambda0.dims2()?;
    let start: Vec<f64> = (0..b * n).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut v = Tensor::from_vec(start, (b, n), lambda0.device())?;
    let mut rayleigh = vec![f64::NAN; b];
    for _ in 0..ITERS {
        let norms = row_norms(&v)?;
        let inv: Vec<f64> = norms.iter().map(|x| 1.0 / x.max(1e-300)).collect();
        v = v.broadcast_mul(&savae_implicit::column(&inv, &v)?)?;
        let av = op.apply(&v)?;
        rayleigh = row_dot(&v, &av)?;
        v = av;
    }
    Ok(Curvature {
        largest_eigenvalue: rayleigh,
        iterations: ITERS,
    })
}

struct Errors {
    implicit_vs_fd: f64,
    unrolled_vs_fd: f64,
    implicit_vs_unrolled: f64,
}

/// Why a check fails, each with the fix to try; empty when it passes.
fn diagnose(
    s: &Settings,
    imp: &StepOutput,
    unr: &StepOutput,
    e: &Errors,
    finite: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    if !finite {
        out.push("non-finite values (NaN or inf) in the loss or a gradient".to_string());
    }
    for (path, o) in [("implicit", imp), ("unrolled", unr)] {
        if let Some(r) = &o.svi {
            let g = r.final_grad_norm_max;
            if r.resets > 0 {
                out.push(format!(
                    "the {path} path's refinement diverged for {} example(s) (reset to \
                     lambda0): lower --svi-lr (now {:.3e}) or leave it unset to take it \
                     from the curvature",
                    r.resets, s.svi.lr
                ));
            } else if g.is_nan() || g > s.stationarity_tol {
                out.push(format!(
                    "the {path} path's refinement is not stationary: max_b ||grad F_b|| = \
                     {g:.3e} > {:.1e} after {} steps; the implicit gradient holds only at \
                     an optimum: raise --svi-steps (now {}) or lower --svi-lr (now {:.3e})",
                    s.stationarity_tol, r.steps, s.svi.steps, s.svi.lr
                ));
            }
        }
    }
    if let Some(cg) = &imp.cg {
        if cg.negative_curvature > 0 {
            out.push(format!(
                "gamma I - H is not positive definite at lambda* for {} example(s) (CG met \
                 negative curvature): lambda* is not a strict maximum of F; raise --prox \
                 (now {})",
                cg.negative_curvature, s.svi.prox
            ));
        }
        if cg.stopped_at_cap > 0 || cg.non_finite > 0 {
            out.push(format!(
                "the adjoint solve did not converge for {} example(s) in {} CG iterations \
                 ({} non-finite): the system is ill-conditioned; raise --prox (now {})",
                cg.stopped_at_cap, s.cg_max_iters, cg.non_finite, s.svi.prox
            ));
        }
    }
    let worst = e
        .implicit_vs_fd
        .max(e.unrolled_vs_fd)
        .max(e.implicit_vs_unrolled);
    if worst.is_nan() || worst > s.tol {
        let hint = if out.is_empty() {
            "the refinement is stationary and the solve converged, so this points at the \
             gradient itself (or at finite differences too coarse for this model: try \
             --fd-params on other parameters with --seed)"
        } else {
            "see the problems above"
        };
        out.push(format!(
            "a relative error exceeds --tol {:.1e} (implicit vs fd {:.2e}, unrolled vs fd \
             {:.2e}, implicit vs unrolled {:.2e}): {hint}",
            s.tol, e.implicit_vs_fd, e.unrolled_vs_fd, e.implicit_vs_unrolled
        ));
    }
    out
}

fn flat(ts: &[Tensor]) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for t in ts {
        v.extend(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?);
    }
    Ok(v)
}

/// ‖a − b‖ / ‖b‖.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// The tensors of a check's `--out` file.
struct Outputs<'a> {
    images: &'a Tensor,
    idx: &'a [usize],
    eps: &'a Noise,
    outer_eps: Option<&'a Noise>,
    imp: &'a StepOutput,
    unr: &'a StepOutput,
}

fn write_out(path: &Path, model: &Vae, o: &Outputs, report: &serde_json::Value) -> Result<()> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let cpu = Device::Cpu;
    t.insert(
        "batch_indices".into(),
        Tensor::from_vec(
            o.idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            o.idx.len(),
            &cpu,
        )?,
    );
    t.insert("images".into(), o.images.to_device(&cpu)?);
    t.insert("eps".into(), o.eps.0.to_device(&cpu)?);
    if let Some(e) = o.outer_eps {
        t.insert("outer_eps".into(), e.0.to_device(&cpu)?);
    }
    t.insert("lambda0".into(), o.imp.lambda0.to_device(&cpu)?);
    if let Some(l) = &o.imp.lambda_refined {
        t.insert("lambda_star".into(), l.to_device(&cpu)?);
    }
    for ((name, var), (gi, gu)) in model
        .params
        .iter()
        .zip(o.imp.grads.iter().zip(&o.unr.grads))
    {
        t.insert(name.to_string(), var.as_tensor().to_device(&cpu)?);
        t.insert(format!("grad.implicit.{name}"), gi.to_device(&cpu)?);
        t.insert(format!("grad.unrolled.{name}"), gu.to_device(&cpu)?);
    }
    let meta = HashMap::from([("gradcheck".to_string(), report.to_string())]);
    let bytes = safetensors::serialize(t.iter().map(|(n, v)| (n.as_str(), v)), Some(meta))?;
    checkpoint::write_atomic(path, &bytes)
}

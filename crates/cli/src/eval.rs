//! Evaluation of a model on a split: amortized and refined ELBO, KL, importance-sampled
//! negative log-likelihood and active units. All numbers are per example, in nats.
//!
//! The refinement uses its own noise ε (held fixed, as in training); the reported ELBOs
//! are then estimated with fresh noise (`elbo_samples` draws), so that the refined ELBO is
//! not biased upward by having been optimized on the very noise that measures it.
//! nll_iw = −log (1/N) Σ_k p(x, z_k)/q(z_k | λ*), z_k ~ q(· | λ*), N = iw_samples.

use crate::batch;
use crate::step::Mode;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use savae_data::{batch_rng, ImageSplit};
use savae_inference::SviConfig;
use savae_model::{elbo, gaussian_kl, log_weights, MlpVae, VariationalParams};
use serde::Serialize;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub svi: SviConfig,
    pub refine: bool,
    pub iw_samples: usize,
    pub elbo_samples: usize,
    pub refine_samples: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub progress: bool,
}

/// The numbers `savae eval` prints.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub split: String,
    pub examples: usize,
    pub elbo_amortized: f64,
    pub elbo_refined: f64,
    pub kl_amortized: f64,
    pub kl_refined: f64,
    /// Mean ‖∇F(λ_K)‖ after the refinement.
    pub svi_grad_norm: f64,
    pub svi_steps: usize,
    pub nll_iw: Option<f64>,
    pub iw_samples: usize,
    pub active_units: usize,
    pub active_units_amortized: usize,
    pub svi_resets: usize,
    /// Per-example ELBO at λ0 (file order), for the report's amortization-gap histogram.
    #[serde(skip)]
    pub per_example_amortized: Vec<f64>,
    /// Per-example ELBO at the refined λ.
    #[serde(skip)]
    pub per_example_refined: Vec<f64>,
    /// Refined posterior means μ, one row per example.
    #[serde(skip)]
    pub refined_means: Vec<Vec<f64>>,
}

fn count_active(mus: &[Vec<f64>], d: usize) -> usize {
    let n = mus.len().max(1) as f64;
    (0..d)
        .filter(|&j| {
            let mean = mus.iter().map(|m| m[j]).sum::<f64>() / n;
            let var = mus.iter().map(|m| (m[j] - mean).powi(2)).sum::<f64>() / n;
            var > 0.01
        })
        .count()
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

/// Evaluates `model` on `split` (all of it, in file order).
pub fn evaluate(
    model: &MlpVae,
    split: &ImageSplit,
    split_name: &str,
    opts: &EvalOptions,
    device: &Device,
) -> Result<EvalReport> {
    let dtype = model.dtype();
    let d = model.latent_dim();
    let n = split.len;
    let nb = n.div_ceil(opts.batch_size);
    let pb = if opts.progress {
        let pb = ProgressBar::new(n as u64);
        pb.set_style(ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )?);
        pb
    } else {
        ProgressBar::hidden()
    };
    let dec_det = model.decoder.detached();
    let (mut s_e0, mut s_er, mut s_k0, mut s_kr, mut s_nll, mut s_gn) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut resets = 0;
    let mut steps = 0;
    let (mut mus0, mut musr) = (Vec::new(), Vec::new());
    let (mut pe0, mut per) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for bi in 0..nb {
        let idx: Vec<usize> = (bi * opts.batch_size..((bi + 1) * opts.batch_size).min(n)).collect();
        let b = idx.len();
        let mut rng = batch_rng(opts.seed, 1, 0, bi as u64);
        let x = batch::images(split, &idx, &mut rng, dtype, device)?;
        let lambda0 = VariationalParams(model.encode(&x)?.0.detach());
        let lambda = if opts.refine {
            let eps_r = batch::noise(&mut rng, opts.refine_samples, b, d, dtype, device)?;
            let r =
                crate::step::refine_elbo(&dec_det, &x, &eps_r, 1.0, &lambda0.0, &opts.svi, false)?;
            resets += r.resets;
            steps = r.steps;
            s_gn += r
                .final_grad_norm
                .iter()
                .filter(|v| v.is_finite())
                .sum::<f64>();
            VariationalParams(r.lambda)
        } else {
            lambda0.clone()
        };
        let eps = batch::noise(&mut rng, opts.elbo_samples, b, d, dtype, device)?;
        let t0 = elbo(&dec_det, &x, &lambda0, &eps, 1.0)?;
        let tr = elbo(&dec_det, &x, &lambda, &eps, 1.0)?;
        let sum = |t: &Tensor| -> Result<f64> {
            Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
        };
        pe0.extend(t0.elbo.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        per.extend(tr.elbo.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        s_e0 += sum(&t0.elbo)?;
        s_er += sum(&tr.elbo)?;
        s_k0 += sum(&gaussian_kl(&lambda0)?)?;
        s_kr += sum(&tr.kl)?;
        mus0.extend(to_rows(&lambda0.mu()?)?);
        musr.extend(to_rows(&lambda.mu()?)?);
        if opts.iw_samples > 0 {
            // Running log-sum-exp over chunks of samples, per example.
            let chunk = (opts.iw_samples).min((20_000 / b).max(1));
            let mut acc: Option<Tensor> = None;
            let mut done = 0;
            while done < opts.iw_samples {
                let k = chunk.min(opts.iw_samples - done);
                let e = batch::noise(&mut rng, k, b, d, dtype, device)?;
                let lw = log_weights(&dec_det, &x, &lambda, &e)?.to_dtype(DType::F64)?; // [k, B]
                let lse = lw
                    .max(0)?
                    .broadcast_add(&lw.broadcast_sub(&lw.max(0)?)?.exp()?.sum(0)?.log()?)?;
                acc = Some(match acc {
                    None => lse,
                    Some(a) => {
                        let m = a.maximum(&lse)?;
                        (&m + ((a - &m)?.exp()? + (lse - &m)?.exp()?)?.log()?)?
                    }
                });
                done += k;
            }
            let ll = (acc.expect("at least one chunk") - (opts.iw_samples as f64).ln())?;
            s_nll -= sum(&ll)?;
        }
        pb.inc(b as u64);
        pb.set_message(format!(
            "elbo {:.2}",
            s_er / ((bi + 1) * opts.batch_size).min(n) as f64
        ));
    }
    pb.finish_and_clear();
    let nf = n.max(1) as f64;
    Ok(EvalReport {
        split: split_name.to_string(),
        examples: n,
        elbo_amortized: s_e0 / nf,
        elbo_refined: s_er / nf,
        kl_amortized: s_k0 / nf,
        kl_refined: s_kr / nf,
        svi_grad_norm: s_gn / nf,
        svi_steps: steps,
        nll_iw: (opts.iw_samples > 0).then_some(s_nll / nf),
        iw_samples: opts.iw_samples,
        active_units: count_active(&musr, d),
        active_units_amortized: count_active(&mus0, d),
        svi_resets: resets,
        per_example_amortized: pe0,
        per_example_refined: per,
        refined_means: musr,
    })
}

/// Whether a mode's reported ELBO is the refined one.
pub fn uses_refinement(mode: Mode) -> bool {
    mode.refines()
}

/// What `savae eval` (and `savae report`) evaluate: a checkpoint on a split.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub checkpoint: std::path::PathBuf,
    pub split: String,
    pub iw_samples: usize,
    pub svi_steps: Option<usize>,
    pub max_examples: Option<usize>,
    pub elbo_samples: usize,
    pub refine_samples: Option<usize>,
    pub batch_size: Option<usize>,
    pub seed: u64,
    pub data_dir: std::path::PathBuf,
    pub progress: bool,
}

/// The loaded pieces of an evaluation, for callers that draw from them.
pub struct Evaluated {
    pub report: EvalReport,
    /// The JSON `savae eval` prints.
    pub json: serde_json::Value,
    pub model: MlpVae,
    pub split: ImageSplit,
    pub meta: crate::checkpoint::CheckpointMeta,
    pub options: EvalOptions,
}

/// Loads the checkpoint and data and evaluates as requested.
pub fn evaluate_checkpoint(req: &EvalRequest, device: &Device) -> Result<Evaluated> {
    let ck = crate::checkpoint::load(&req.checkpoint)?;
    let cfg = ck.meta.config.clone();
    let model = ck.model(&req.checkpoint, cfg.dtype(), device)?;
    let kind = savae_data::DatasetKind::parse(&ck.meta.dataset)?;
    let data = savae_data::ImageData::load(kind, &req.data_dir)?;
    let split =
        savae_data::Split::parse(&req.split).map_err(|e| anyhow::anyhow!("--split: {e}"))?;
    let mut s = data.split(split).clone();
    if let Some(n) = req.max_examples {
        anyhow::ensure!(n > 0, "--max-examples must be at least 1");
        s = s.truncate(n);
    }
    let mut svi = crate::train::svi_config(&cfg)?;
    if let Some(k) = req.svi_steps {
        svi.steps = k;
    }
    let bs = req.batch_size.unwrap_or(cfg.batch_size);
    anyhow::ensure!(bs > 0, "--batch-size must be at least 1");
    let options = EvalOptions {
        svi,
        refine: svi.steps > 0,
        iw_samples: req.iw_samples,
        elbo_samples: req.elbo_samples.max(1),
        refine_samples: req.refine_samples.unwrap_or(cfg.samples.max(8)).max(1),
        batch_size: bs,
        seed: req.seed,
        progress: req.progress,
    };
    let report = evaluate(&model, &s, split.name(), &options, device)?;
    let mut json = serde_json::to_value(&report)?;
    json["checkpoint"] = serde_json::json!(req.checkpoint.display().to_string());
    json["dataset"] = serde_json::json!(ck.meta.dataset);
    json["epoch"] = serde_json::json!(ck.meta.epoch);
    Ok(Evaluated {
        report,
        json,
        model,
        split: s,
        meta: ck.meta,
        options,
    })
}

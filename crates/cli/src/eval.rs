//! Evaluation of a model on a split: amortized and refined ELBO, KL, importance-sampled
//! negative log-likelihood and active units. All numbers are per example, in nats.
//!
//! The refinement uses its own noise ε (held fixed, as in training); the reported ELBOs
//! are then estimated with fresh noise (`elbo_samples` draws), so that the refined ELBO is
//! not biased upward by having been optimized on the very noise that measures it.
//! nll_iw = −log (1/N) Σ_k p(x, z_k)/q(z_k | λ*), z_k ~ q(· | λ*), N = iw_samples.
//! Text adds perplexities over tokens (words + one end symbol per sentence) and the
//! mutual information; the language model (`lm`) has its exact log-likelihood instead.

use crate::batch;
use crate::batch::SplitData;
use crate::step::Mode;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use savae_data::batch_rng;
use savae_inference::SviConfig;
use savae_model::{elbo, gaussian_kl, log_weights, Vae, VariationalParams};
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
    /// The refinement's optimizer (`sgd`, `adam`, `newton`).
    pub svi_optimizer: &'static str,
    pub nll_iw: Option<f64>,
    pub iw_samples: usize,
    pub active_units: usize,
    pub active_units_amortized: usize,
    pub svi_resets: usize,
    /// Text: words plus one end symbol per sentence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<usize>,
    /// Text: exp(−Σ ELBO_refined / tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_bound: Option<f64>,
    /// Text: exp(Σ nll_iw / tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_iw: Option<f64>,
    /// Text: the approximate mutual information I(x; z) of the amortized posterior
    /// (Hoffman & Johnson 2016, computed as He et al. 2019 do; over the whole split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_info: Option<f64>,
    /// The same with the refined posteriors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutual_info_refined: Option<f64>,
    /// Per-example ELBO at λ0 (evaluation order), for the report's amortization-gap histogram.
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

/// The approximate mutual information of He et al. (2019, `calc_mi`) over N posteriors
/// q(z | x_i) = N(μ_i, σ_i²):
///   I ≈ (1/N) Σ_i E_q(z|x_i) log q(z | x_i) − (1/N) Σ_i log q̂(z_i),
///   q̂(z) = (1/N) Σ_j q(z | x_j),  z_i ~ q(z | x_i) (one draw each, from `rng`).
pub fn mutual_info(mus: &[Vec<f64>], logvars: &[Vec<f64>], rng: &mut impl rand::Rng) -> f64 {
    use rand_distr::StandardNormal;
    let n = mus.len();
    if n == 0 {
        return 0.0;
    }
    let d = mus[0].len();
    let ln2pi = (2.0 * std::f64::consts::PI).ln();
    let neg_entropy: f64 = logvars
        .iter()
        .map(|lv| -0.5 * d as f64 * ln2pi - 0.5 * lv.iter().map(|v| 1.0 + v).sum::<f64>())
        .sum::<f64>()
        / n as f64;
    let zs: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..d)
                .map(|j| {
                    mus[i][j] + (0.5 * logvars[i][j]).exp() * rng.sample::<f64, _>(StandardNormal)
                })
                .collect()
        })
        .collect();
    let inv_var: Vec<Vec<f64>> = logvars
        .iter()
        .map(|lv| lv.iter().map(|v| (-v).exp()).collect())
        .collect();
    let norm: Vec<f64> = logvars
        .iter()
        .map(|lv| -0.5 * (d as f64 * ln2pi + lv.iter().sum::<f64>()))
        .collect();
    let mut sum_log_qz = 0.0;
    let mut dens = vec![0.0; n];
    for z in &zs {
        for j in 0..n {
            let q: f64 = (0..d)
                .map(|k| (z[k] - mus[j][k]).powi(2) * inv_var[j][k])
                .sum();
            dens[j] = norm[j] - 0.5 * q;
        }
        let m = dens.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + dens.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        sum_log_qz += lse - (n as f64).ln();
    }
    neg_entropy - sum_log_qz / n as f64
}

fn to_rows(t: &Tensor) -> Result<Vec<Vec<f64>>> {
    Ok(t.to_dtype(DType::F64)?.to_vec2::<f64>()?)
}

fn sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// Elements of the largest decoder output evaluated at once in the importance sampling
/// (pixels or vocabulary logits), to bound memory.
const IW_CHUNK_ELEMENTS: usize = 20_000_000;

/// Evaluates `model` on `split` (all of it; text in batches of equal length).
pub fn evaluate(
    model: &Vae,
    split: &SplitData,
    split_name: &str,
    opts: &EvalOptions,
    device: &Device,
) -> Result<EvalReport> {
    let dtype = model.dtype();
    let d = model.latent_dim();
    let n = split.len();
    let batches = split.eval_batches(opts.batch_size);
    let pb = if opts.progress {
        let pb = ProgressBar::new(n as u64);
        pb.set_style(ProgressStyle::with_template(
            "eval {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )?);
        pb
    } else {
        ProgressBar::hidden()
    };
    let latent = model.config.has_latent();
    let dec_det = model.decoder.detached();
    let (mut s_e0, mut s_er, mut s_k0, mut s_kr, mut s_nll, mut s_gn) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut resets = 0;
    let mut steps = 0;
    let mut done_n = 0;
    let (mut mus0, mut musr, mut lv0, mut lvr) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut pe0, mut per) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (bi, idx) in batches.iter().enumerate() {
        let b = idx.len();
        let mut rng = batch_rng(opts.seed, 1, 0, bi as u64);
        let x = split.batch(idx, &mut rng, dtype, device, None)?;
        if !latent {
            // The language model: log p(x) exactly.
            let ll = dec_det.log_lik(&x, None)?.squeeze(0)?;
            let v = ll.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let total: f64 = v.iter().sum();
            (s_e0, s_er) = (s_e0 + total, s_er + total);
            s_nll -= total;
            pe0.extend(&v);
            per.extend(&v);
            done_n += b;
            pb.inc(b as u64);
            continue;
        }
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
        pe0.extend(t0.elbo.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        per.extend(tr.elbo.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        s_e0 += sum(&t0.elbo)?;
        s_er += sum(&tr.elbo)?;
        s_k0 += sum(&gaussian_kl(&lambda0)?)?;
        s_kr += sum(&tr.kl)?;
        mus0.extend(to_rows(&lambda0.mu()?)?);
        musr.extend(to_rows(&lambda.mu()?)?);
        lv0.extend(to_rows(&lambda0.logvar()?)?);
        lvr.extend(to_rows(&lambda.logvar()?)?);
        if opts.iw_samples > 0 {
            // Running log-sum-exp over chunks of samples, per example.
            let width = match (&x, &model.config) {
                (savae_model::Batch::Text(t), c) => t.steps() * c.vocab_size,
                _ => savae_data::PIXELS,
            };
            let chunk = opts
                .iw_samples
                .min((IW_CHUNK_ELEMENTS / (b * width).max(1)).max(1));
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
        done_n += b;
        pb.inc(b as u64);
        pb.set_message(format!("elbo {:.2}", s_er / done_n as f64));
    }
    pb.finish_and_clear();
    let nf = n.max(1) as f64;
    let tokens = split.tokens();
    let has_nll = opts.iw_samples > 0 || !latent;
    let mut mi_rng = batch_rng(opts.seed, 7, 0, 0);
    let (mi, mi_r) = match (tokens, latent) {
        (Some(_), true) => (
            Some(if model.encoder.is_some() {
                mutual_info(&mus0, &lv0, &mut mi_rng)
            } else {
                0.0
            }),
            Some(mutual_info(&musr, &lvr, &mut mi_rng)),
        ),
        (Some(_), false) => (Some(0.0), Some(0.0)),
        _ => (None, None),
    };
    Ok(EvalReport {
        split: split_name.to_string(),
        examples: n,
        elbo_amortized: s_e0 / nf,
        elbo_refined: s_er / nf,
        kl_amortized: s_k0 / nf,
        kl_refined: s_kr / nf,
        svi_grad_norm: s_gn / nf,
        svi_steps: steps,
        svi_optimizer: opts.svi.optimizer.name(),
        nll_iw: has_nll.then_some(s_nll / nf),
        iw_samples: if latent { opts.iw_samples } else { 0 },
        active_units: count_active(&musr, d),
        active_units_amortized: count_active(&mus0, d),
        svi_resets: resets,
        tokens,
        ppl_bound: tokens.map(|t| (-s_er / t as f64).exp()),
        ppl_iw: tokens.filter(|_| has_nll).map(|t| (s_nll / t as f64).exp()),
        mutual_info: mi,
        mutual_info_refined: mi_r,
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
    /// Refinement optimizer (`sgd`, `adam`, `newton`), with the checkpoint's SVI step
    /// size; `None` keeps the checkpoint's optimizer. Lets rows trained with different
    /// refinements be scored by the same one.
    pub svi_optimizer: Option<String>,
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
    pub model: Vae,
    pub split: SplitData,
    /// The vocabulary of a text model.
    pub vocab: Option<savae_data::Vocab>,
    pub meta: crate::checkpoint::CheckpointMeta,
    pub options: EvalOptions,
}

/// Loads the checkpoint and data and evaluates as requested.
pub fn evaluate_checkpoint(req: &EvalRequest, device: &Device) -> Result<Evaluated> {
    let ck = crate::checkpoint::load(&req.checkpoint)?;
    let cfg = ck.meta.config.clone();
    let model = ck.model(&req.checkpoint, cfg.dtype(), device)?;
    let data = crate::batch::Corpus::load(
        &ck.meta.dataset,
        &req.data_dir,
        ck.vocab(&req.checkpoint)?,
        cfg.max_vocab,
        cfg.max_len,
        false,
    )?;
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
    if let Some(name) = &req.svi_optimizer {
        svi.optimizer =
            savae_inference::SviOptimizer::parse(name, cfg.svi_lr).context("--svi-optimizer")?;
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
        vocab: data.vocab,
        meta: ck.meta,
        options,
    })
}

#[cfg(test)]
mod tests {
    use super::mutual_info;
    use rand::SeedableRng;

    #[test]
    fn mutual_info_is_log_n_for_separated_posteriors_and_near_zero_for_identical_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let n = 400;
        let far: Vec<Vec<f64>> = (0..n).map(|i| vec![i as f64 * 10.0, 0.0]).collect();
        let tight = vec![vec![-6.0, -6.0]; n];
        let mi = mutual_info(&far, &tight, &mut rng);
        // Up to the sampling noise of E log q(z|x) (std ≈ √(d/2)/√n = 0.05).
        assert!((mi - (n as f64).ln()).abs() < 0.15, "{mi}");
        let same = vec![vec![0.3, -0.2]; n];
        let unit = vec![vec![0.0, 0.0]; n];
        let mi = mutual_info(&same, &unit, &mut rng);
        assert!(mi.abs() < 0.15, "{mi}");
    }
}

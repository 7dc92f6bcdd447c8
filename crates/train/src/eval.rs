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
use crate::partial::EvalProgressFile;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use savae_data::Stream;
use savae_inference::SviConfig;
use savae_model::{elbo, gaussian_kl, log_weights, Vae, VariationalParams};
use serde::Serialize;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub svi: SviConfig,
    /// Refine λ0 before scoring (false: λ* = λ0).
    pub refine: bool,
    /// Importance samples for nll_iw (0 skips it).
    pub iw_samples: usize,
    /// Fresh draws for the reported ELBOs.
    pub elbo_samples: usize,
    /// Draws held fixed during the refinement.
    pub refine_samples: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Derivatives of the refinement's objective.
    pub passes: savae_model::Passes,
}

/// How far an evaluation is, for a progress display: examples done of the total, and
/// the running mean refined ELBO.
#[derive(Debug, Clone, Copy)]
pub struct EvalProgress {
    pub done: usize,
    pub total: usize,
    pub elbo_refined: f64,
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
    /// The refinement's optimizer (`sgd`, `adam`, `newton`, `newton-ls`).
    pub svi_optimizer: &'static str,
    /// The refinement's proximal weight γ.
    pub svi_prox: f64,
    pub nll_iw: Option<f64>,
    pub iw_samples: usize,
    pub active_units: usize,
    pub active_units_amortized: usize,
    pub svi_resets: usize,
    /// Newton steps (over examples) where no line-search trial passed Armijo's test
    /// (`newton-ls`): the last trial was taken.
    pub svi_line_search_failures: usize,
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

/// The per-example importance-weighted log-likelihood from its log weights:
/// log (1/N) Σ_k exp(w_k), computed stably over chunks of samples. `chunks` yields
/// `[k, B]` log weights (Σ k = N); the result is `[B]`.
pub fn importance_log_likelihood(
    chunks: impl IntoIterator<Item = Result<Tensor>>,
    n: usize,
) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for lw in chunks {
        let lw = lw?.to_dtype(DType::F64)?;
        let m = lw.max(0)?;
        let lse = m.broadcast_add(&lw.broadcast_sub(&m)?.exp()?.sum(0)?.log()?)?;
        acc = Some(match acc {
            None => lse,
            Some(a) => {
                let m = a.maximum(&lse)?;
                (&m + ((a - &m)?.exp()? + (lse - &m)?.exp()?)?.log()?)?
            }
        });
    }
    let acc = acc.context("importance sampling needs at least one sample")?;
    Ok((acc - (n as f64).ln())?)
}

/// Sums over the examples of an evaluation, absorbed batch by batch (and kept on disk by
/// [`crate::partial`]).
#[derive(Debug, Default)]
pub(crate) struct EvalTotals {
    pub examples: usize,
    pub elbo_amortized: f64,
    pub elbo_refined: f64,
    pub kl_amortized: f64,
    pub kl_refined: f64,
    /// −Σ log p̂(x).
    pub nll: f64,
    pub svi_grad_norm: f64,
    pub svi_resets: usize,
    pub svi_line_search_failures: usize,
    pub svi_steps: usize,
    pub means_amortized: Vec<Vec<f64>>,
    pub means_refined: Vec<Vec<f64>>,
    pub logvars_amortized: Vec<Vec<f64>>,
    pub logvars_refined: Vec<Vec<f64>>,
    pub per_example_amortized: Vec<f64>,
    pub per_example_refined: Vec<f64>,
}

impl EvalTotals {
    /// A batch of the language model: its exact log-likelihoods `[B]`.
    fn add_exact(&mut self, log_lik: &[f64]) {
        let total: f64 = log_lik.iter().sum();
        self.elbo_amortized += total;
        self.elbo_refined += total;
        self.nll -= total;
        self.per_example_amortized.extend(log_lik);
        self.per_example_refined.extend(log_lik);
        self.examples += log_lik.len();
    }

    /// A batch of a latent-variable model: ELBO terms at λ0 and λ*, the posteriors.
    fn add_latent(
        &mut self,
        at_lambda0: &savae_model::ElboTerms,
        at_refined: &savae_model::ElboTerms,
        lambda0: &VariationalParams,
        refined: &VariationalParams,
    ) -> Result<()> {
        self.per_example_amortized.extend(to_vec(&at_lambda0.elbo)?);
        self.per_example_refined.extend(to_vec(&at_refined.elbo)?);
        self.elbo_amortized += sum(&at_lambda0.elbo)?;
        self.elbo_refined += sum(&at_refined.elbo)?;
        self.kl_amortized += sum(&gaussian_kl(lambda0)?)?;
        self.kl_refined += sum(&at_refined.kl)?;
        self.means_amortized.extend(to_rows(&lambda0.mu()?)?);
        self.means_refined.extend(to_rows(&refined.mu()?)?);
        self.logvars_amortized.extend(to_rows(&lambda0.logvar()?)?);
        self.logvars_refined.extend(to_rows(&refined.logvar()?)?);
        self.examples += lambda0.0.dim(0)?;
        Ok(())
    }

    /// The refinement of a batch.
    fn add_refinement(&mut self, r: &savae_inference::Refinement) {
        self.svi_resets += r.resets;
        self.svi_line_search_failures += r.line_search_failures;
        self.svi_steps = r.steps;
        self.svi_grad_norm += r
            .final_grad_norm
            .iter()
            .filter(|v| v.is_finite())
            .sum::<f64>();
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// Evaluates `model` on `split` (all of it; text in batches of equal length).
pub fn evaluate(
    model: &Vae,
    split: &SplitData,
    split_name: &str,
    opts: &EvalOptions,
    device: &Device,
) -> Result<EvalReport> {
    Ok(evaluate_keeping(model, split, split_name, opts, device, &mut |_| {}, None)?.0)
}

/// [`evaluate`], calling `progress` after every batch, continuing from the totals `kept`
/// holds for the evaluation `key` (if any) and writing them there as it goes; with the
/// batches it continued after.
fn evaluate_keeping(
    model: &Vae,
    split: &SplitData,
    split_name: &str,
    opts: &EvalOptions,
    device: &Device,
    progress: &mut dyn FnMut(EvalProgress),
    kept: Option<(&EvalProgressFile, &str)>,
) -> Result<(EvalReport, Option<usize>)> {
    let dtype = model.dtype();
    let d = model.latent_dim();
    let n = split.len();
    let latent = model.config.has_latent();
    let dec_det = model.decoder.detached();
    let (mut tot, continued) = match kept.map(|(f, key)| f.load(key)).transpose()?.flatten() {
        Some(saved) => (saved.totals, Some(saved.batches)),
        None => (EvalTotals::default(), None),
    };
    let start = continued.unwrap_or(0);
    let mut saved_at = std::time::Instant::now();
    for (bi, idx) in split
        .eval_batches(opts.batch_size)
        .iter()
        .enumerate()
        .skip(start)
    {
        let b = idx.len();
        let mut rng = Stream::Eval.rng(opts.seed, 0, bi as u64);
        let x = split.batch(idx, &mut rng, dtype, device, None)?;
        if !latent {
            // The language model: log p(x) exactly.
            tot.add_exact(&to_vec(&dec_det.log_lik(&x, None)?.squeeze(0)?)?);
        } else {
            let lambda0 = VariationalParams(model.encode(&x)?.0.detach());
            let lambda = if opts.refine {
                let eps_r = batch::noise(&mut rng, opts.refine_samples, b, d, dtype, device)?;
                let r = crate::step::refine_elbo(
                    &dec_det,
                    &x,
                    &eps_r,
                    1.0,
                    &lambda0.0,
                    &opts.svi,
                    false,
                    opts.passes,
                )?;
                tot.add_refinement(&r);
                VariationalParams(r.lambda)
            } else {
                lambda0.clone()
            };
            let eps = batch::noise(&mut rng, opts.elbo_samples, b, d, dtype, device)?;
            let t0 = elbo(&dec_det, &x, &lambda0, &eps, 1.0)?;
            let tr = elbo(&dec_det, &x, &lambda, &eps, 1.0)?;
            tot.add_latent(&t0, &tr, &lambda0, &lambda)?;
            if opts.iw_samples > 0 {
                // Chunks of samples, to bound the decoder output held at once.
                let width = match (&x, &model.config) {
                    (savae_model::Batch::Text(t), c) => t.steps() * c.vocab_size,
                    _ => savae_data::PIXELS,
                };
                let chunk = opts
                    .iw_samples
                    .min((IW_CHUNK_ELEMENTS / (b * width).max(1)).max(1));
                let sizes: Vec<usize> = (0..opts.iw_samples)
                    .step_by(chunk)
                    .map(|start| chunk.min(opts.iw_samples - start))
                    .collect();
                let chunks = sizes.into_iter().map(|k| {
                    let e = batch::noise(&mut rng, k, b, d, dtype, device)?;
                    log_weights(&dec_det, &x, &lambda, &e)
                });
                tot.nll -= sum(&importance_log_likelihood(chunks, opts.iw_samples)?)?;
            }
        }
        progress(EvalProgress {
            done: tot.examples,
            total: n,
            elbo_refined: tot.elbo_refined / tot.examples.max(1) as f64,
        });
        if let Some((f, key)) = kept.filter(|(f, _)| saved_at.elapsed() >= f.save_every) {
            f.save(key, bi + 1, &tot)?;
            saved_at = std::time::Instant::now();
        }
    }
    Ok((report(model, split, split_name, opts, tot), continued))
}

/// The report of finished totals.
fn report(
    model: &Vae,
    split: &SplitData,
    split_name: &str,
    opts: &EvalOptions,
    tot: EvalTotals,
) -> EvalReport {
    let n = split.len();
    let d = model.latent_dim();
    let latent = model.config.has_latent();
    let nf = n.max(1) as f64;
    let tokens = split.tokens();
    let has_nll = opts.iw_samples > 0 || !latent;
    let mut mi_rng = Stream::MutualInfo.rng(opts.seed, 0, 0);
    let (mi, mi_r) = match (tokens, latent) {
        (Some(_), true) => (
            Some(if model.encoder.is_some() {
                mutual_info(&tot.means_amortized, &tot.logvars_amortized, &mut mi_rng)
            } else {
                0.0
            }),
            Some(mutual_info(
                &tot.means_refined,
                &tot.logvars_refined,
                &mut mi_rng,
            )),
        ),
        (Some(_), false) => (Some(0.0), Some(0.0)),
        _ => (None, None),
    };
    EvalReport {
        split: split_name.to_string(),
        examples: n,
        elbo_amortized: tot.elbo_amortized / nf,
        elbo_refined: tot.elbo_refined / nf,
        kl_amortized: tot.kl_amortized / nf,
        kl_refined: tot.kl_refined / nf,
        svi_grad_norm: tot.svi_grad_norm / nf,
        svi_steps: tot.svi_steps,
        svi_optimizer: opts.svi.optimizer.name(),
        svi_prox: opts.svi.prox,
        nll_iw: has_nll.then_some(tot.nll / nf),
        iw_samples: if latent { opts.iw_samples } else { 0 },
        active_units: count_active(&tot.means_refined, d),
        active_units_amortized: count_active(&tot.means_amortized, d),
        svi_resets: tot.svi_resets,
        svi_line_search_failures: tot.svi_line_search_failures,
        tokens,
        ppl_bound: tokens.map(|t| (-tot.elbo_refined / t as f64).exp()),
        ppl_iw: tokens
            .filter(|_| has_nll)
            .map(|t| (tot.nll / t as f64).exp()),
        mutual_info: mi,
        mutual_info_refined: mi_r,
        per_example_amortized: tot.per_example_amortized,
        per_example_refined: tot.per_example_refined,
        refined_means: tot.means_refined,
    }
}

/// Which examples of a split an evaluation scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "selection", rename_all = "lowercase")]
pub enum Subset {
    /// The whole split.
    All,
    /// `examples` drawn at random with `seed` (scored in file order): representative of
    /// the split whatever the file's order.
    Random { examples: usize, seed: u64 },
    /// The first `examples` in file order (the shipped MNIST test file is sorted by
    /// class, so this is not a sample of it).
    First { examples: usize },
}

/// How a subset of N examples is chosen (the option a user sets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SubsetOrder {
    /// A seeded random sample of the split.
    Random,
    /// The first N in file order.
    First,
}

impl Subset {
    /// `max_examples` of a split chosen by `order` (random with `seed`); None: all.
    pub fn new(max_examples: Option<usize>, order: SubsetOrder, seed: u64) -> Self {
        match (max_examples, order) {
            (None, _) => Self::All,
            (Some(examples), SubsetOrder::Random) => Self::Random { examples, seed },
            (Some(examples), SubsetOrder::First) => Self::First { examples },
        }
    }
    /// The indices of `total` examples this subset keeps (None: all of them).
    pub fn indices(self, total: usize) -> Result<Option<Vec<usize>>> {
        let n = match self {
            Self::All => return Ok(None),
            Self::Random { examples, .. } | Self::First { examples } => examples,
        };
        anyhow::ensure!(
            n > 0,
            "an evaluation of 0 examples was asked for: take at least 1"
        );
        if n >= total {
            return Ok(None);
        }
        Ok(Some(match self {
            Self::Random { seed, .. } => savae_data::sample_indices(seed, total, n),
            _ => (0..n).collect(),
        }))
    }
}

/// What `savae eval` (and `savae report`) evaluate: a checkpoint on a split.
#[derive(Debug, Clone)]
pub struct EvalRequest {
    pub checkpoint: std::path::PathBuf,
    pub split: savae_data::Split,
    /// Importance samples for nll_iw (0 skips it).
    pub iw_samples: usize,
    /// Refinement steps (None: the checkpoint's).
    pub svi_steps: Option<usize>,
    /// Refinement optimizer, with the checkpoint's SVI step size (None: the checkpoint's
    /// optimizer). Lets rows trained with different refinements be scored by the same one.
    pub svi_optimizer: Option<savae_inference::SviMethod>,
    /// Proximal weight γ ≥ 0 of the refinement (None: the checkpoint's); with
    /// `svi_optimizer` and `svi_steps`, one refinement for rows trained at different γ.
    pub prox: Option<f64>,
    /// The examples of the split to score.
    pub subset: Subset,
    /// Fresh draws for the reported ELBOs.
    pub elbo_samples: usize,
    /// Draws held fixed during the refinement (None: 8, or the checkpoint's samples if
    /// larger).
    pub refine_samples: Option<usize>,
    /// Examples per batch (None: the checkpoint's).
    pub batch_size: Option<usize>,
    pub seed: u64,
    pub data_dir: std::path::PathBuf,
    /// Derivatives of the refinement's objective (the same numbers either way, up to
    /// rounding; analytic is faster).
    pub passes: savae_model::Passes,
    /// Keep the running totals in this file and continue from it (None: start over).
    pub progress_file: Option<EvalProgressFile>,
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
    /// The batches done before, where the request's progress file held them.
    pub continued_after: Option<usize>,
    /// The evaluation's batches.
    pub batches: usize,
}

/// Loads the checkpoint and data and evaluates as requested, calling `progress` after
/// every batch.
pub fn evaluate_checkpoint(
    req: &EvalRequest,
    device: &Device,
    progress: &mut dyn FnMut(EvalProgress),
) -> Result<Evaluated> {
    if let Some(prox) = req.prox {
        // The rule and wording of the training setting (`TrainConfig::validate`).
        crate::options::require(
            prox.is_finite() && prox >= 0.0,
            "prox",
            format!("must be a non-negative number (got {prox})"),
        )?;
    }
    let ck = crate::checkpoint::load(&req.checkpoint)?;
    let cfg = ck.meta.config.clone();
    let model = ck.model(&req.checkpoint, cfg.dtype(), device)?;
    let data = crate::batch::Corpus::load(
        &ck.meta.dataset,
        &req.data_dir,
        ck.vocab(&req.checkpoint)?,
        cfg.max_vocab,
        cfg.max_len,
    )?;
    let whole = data.split(req.split);
    let s = match req.subset.indices(whole.len())? {
        Some(idx) => whole.select(&idx),
        None => whole.clone(),
    };
    let mut svi = cfg.svi_config();
    if let Some(k) = req.svi_steps {
        svi.steps = k;
    }
    if let Some(method) = req.svi_optimizer {
        svi.optimizer = cfg.svi_optimizer_of(method);
    }
    if let Some(prox) = req.prox {
        svi.prox = prox;
    }
    let bs = req.batch_size.unwrap_or(cfg.batch_size);
    anyhow::ensure!(
        bs > 0,
        "an evaluation batch of 0 examples was asked for: take at least 1"
    );
    let options = EvalOptions {
        svi,
        refine: svi.steps > 0,
        iw_samples: req.iw_samples,
        elbo_samples: req.elbo_samples.max(1),
        refine_samples: req.refine_samples.unwrap_or(cfg.samples.max(8)).max(1),
        batch_size: bs,
        seed: req.seed,
        passes: req.passes,
    };
    // What identifies this evaluation for its progress file: the checkpoint, the examples
    // and every option.
    let key = serde_json::json!({
        "checkpoint_bytes": std::fs::metadata(&req.checkpoint).map(|m| m.len()).ok(),
        "dataset": ck.meta.dataset, "epoch": ck.meta.epoch, "step": ck.meta.step,
        "valid_elbo": ck.meta.valid_elbo.map(f64::to_bits),
        "split": req.split.name(), "subset": req.subset, "examples": s.len(),
        "options": format!("{options:?}"),
    })
    .to_string();
    let kept = req.progress_file.as_ref().map(|f| (f, key.as_str()));
    let batches = s.eval_batches(options.batch_size).len();
    let (report, continued_after) = evaluate_keeping(
        &model,
        &s,
        req.split.name(),
        &options,
        device,
        progress,
        kept,
    )?;
    let mut json = serde_json::to_value(&report)?;
    json["checkpoint"] = serde_json::json!(req.checkpoint.display().to_string());
    json["dataset"] = serde_json::json!(ck.meta.dataset);
    json["epoch"] = serde_json::json!(ck.meta.epoch);
    json["subset"] = serde_json::to_value(req.subset)?;
    json["split_examples"] = serde_json::json!(whole.len());
    Ok(Evaluated {
        report,
        json,
        model,
        split: s,
        vocab: data.vocab,
        meta: ck.meta,
        batches,
        options,
        continued_after,
    })
}

#[cfg(test)]
mod subset_tests {
    use super::Subset;

    /// The class of image `i` of the static binarized MNIST test file, which holds the
    /// MNIST test images grouped by class (data/README.md: block sizes 980, 1135, …).
    fn sorted_test_class(i: usize) -> usize {
        const SIZES: [usize; 10] = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009];
        let mut end = 0;
        for (c, n) in SIZES.iter().enumerate() {
            end += n;
            if i < end {
                return c;
            }
        }
        panic!("index {i} past the test file")
    }

    fn classes(idx: &[usize]) -> std::collections::BTreeSet<usize> {
        idx.iter().map(|&i| sorted_test_class(i)).collect()
    }

    #[test]
    fn a_small_subset_of_a_class_sorted_split_holds_many_classes() {
        let random = Subset::Random {
            examples: 50,
            seed: 1234,
        };
        let idx = random.indices(10_000).unwrap().unwrap();
        assert_eq!(idx.len(), 50);
        assert!(
            idx.windows(2).all(|w| w[0] < w[1]),
            "distinct, in file order"
        );
        assert!(classes(&idx).len() >= 8, "{:?}", classes(&idx));
        assert_eq!(random.indices(10_000).unwrap().unwrap(), idx, "seeded");
        let other = Subset::Random {
            examples: 50,
            seed: 1,
        };
        assert_ne!(other.indices(10_000).unwrap().unwrap(), idx);
        // File order, asked for explicitly, is one class: why it is not the default.
        let first = Subset::First { examples: 500 };
        assert_eq!(classes(&first.indices(10_000).unwrap().unwrap()).len(), 1);
        // All, or more than the split: everything; zero: an error.
        assert_eq!(Subset::All.indices(10).unwrap(), None);
        assert_eq!(Subset::First { examples: 20 }.indices(10).unwrap(), None);
        assert!(Subset::First { examples: 0 }.indices(10).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::{importance_log_likelihood, mutual_info};
    use candle_core::{Device, Tensor};
    use rand::SeedableRng;

    #[test]
    fn importance_log_likelihood_is_the_log_mean_weight_over_every_chunk() {
        // Two examples, five samples in chunks of 2, 2 and 1, weights far apart in scale.
        let w = [
            [-1000.0, 3.0],
            [-1001.0, -2.0],
            [-999.5, 0.5],
            [-1003.0, 1.0],
            [-1000.2, -7.0],
        ];
        let want: Vec<f64> = (0..2)
            .map(|b| {
                let m = w.iter().map(|r| r[b]).fold(f64::NEG_INFINITY, f64::max);
                m + (w.iter().map(|r| (r[b] - m).exp()).sum::<f64>() / 5.0).ln()
            })
            .collect();
        let rows = |r: &[[f64; 2]]| {
            let flat: Vec<f64> = r.iter().flatten().copied().collect();
            Ok(Tensor::from_vec(flat, (r.len(), 2), &Device::Cpu)?)
        };
        let chunks = vec![rows(&w[0..2]), rows(&w[2..4]), rows(&w[4..5])];
        let got = importance_log_likelihood(chunks, 5)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for (g, e) in got.iter().zip(&want) {
            assert!((g - e).abs() < 1e-12, "{got:?} vs {want:?}");
        }
        // One chunk of all five gives the same.
        let one = importance_log_likelihood(vec![rows(&w)], 5)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!((one[0] - got[0]).abs() < 1e-12 && (one[1] - got[1]).abs() < 1e-12);
        assert!(importance_log_likelihood(Vec::new(), 5).is_err());
    }

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

//! `savae gradcheck`: the SA-VAE parameter gradient three ways, in f64, on a few images.
//!
//! (a) implicit (CG on exact HVPs at the converged optimum), (b) unrolled through many
//! SGD steps, (c) central finite differences of the whole pipeline (refine to
//! convergence, then the loss) on a seeded random subset of parameters. Prints JSON with
//! the relative errors and exits non-zero when any exceeds `--tol`.

use crate::data_dir;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use savae_implicit::{CgConfig, HvpKind, ShiftedSolve};
use savae_inference::{SviConfig, SviOptimizer};
use savae_model::{ModelConfig, Noise, Vae};
use savae_train::checkpoint;
use savae_train::options::{Activation, EncoderLoss, ModelKind};
use savae_train::step::{
    train_step, ImplicitGradient, Mode, SavaeGradient, StepConfig, StepOutput,
};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct GradcheckArgs {
    /// Use this trained model instead of a small fresh one.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Test images (spread over the class-sorted test file).
    #[arg(long, default_value_t = 4)]
    pub examples: usize,
    /// Parameters checked by finite differences.
    #[arg(long, default_value_t = 12)]
    pub fd_params: usize,
    /// Refinement steps (implicit: to convergence; unrolled: all of them).
    #[arg(long, default_value_t = 3000)]
    pub svi_steps: usize,
    /// Per-example SGD step size of the refinement.
    #[arg(long, default_value_t = 0.02)]
    pub svi_lr: f64,
    /// Proximal weight γ (> 0, so that the encoder gets a gradient).
    #[arg(long, default_value_t = 5.0)]
    pub prox: f64,
    /// Largest relative error accepted.
    #[arg(long, default_value_t = 1e-6)]
    pub tol: f64,
    /// Write the batch, ε, λ0, λ* and every gradient to this safetensors file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// cpu | cuda | cuda:N (the check runs in f64 on that device).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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

pub fn run(a: GradcheckArgs) -> Result<()> {
    savae_implicit::ensure_second_order()?;
    if a.examples == 0 || a.svi_steps == 0 || a.prox <= 0.0 {
        bail!("--examples and --svi-steps must be at least 1 and --prox positive");
    }
    let dev = crate::device::resolve(&a.device)?;
    let (model, dataset) = match &a.checkpoint {
        Some(p) => {
            let ck = checkpoint::load(p)?;
            if !ck.meta.model.has_encoder() {
                bail!(
                    "{}: gradcheck needs a model with an encoder (not --model svi)",
                    p.display()
                );
            }
            (ck.model(p, DType::F64, &dev)?, ck.meta.dataset.clone())
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
            (
                Vae::new(&cfg, a.seed, DType::F64, &dev)?,
                "mnist".to_string(),
            )
        }
    };
    let data = savae_data::ImageData::load(
        savae_data::DatasetKind::parse(&dataset)?,
        &data_dir(a.data_dir.as_ref()),
    )?;
    let n = data.test.len;
    let idx: Vec<usize> = (0..a.examples)
        .map(|i| (i * n / a.examples + 7) % n)
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(a.seed);
    let x = savae_model::Batch::Images(savae_train::batch::images(
        &data.test,
        &idx,
        &mut rng,
        DType::F64,
        &dev,
    )?);
    let eps =
        savae_train::batch::noise(&mut rng, 1, idx.len(), model.latent_dim(), DType::F64, &dev)?;
    let implicit = SavaeGradient::Implicit(ImplicitGradient {
        solve: ShiftedSolve {
            cg: CgConfig {
                max_iters: 500,
                tol: 1e-12,
            },
            damping: 0.0,
            retries: 3,
        },
        hvp: HvpKind::Exact,
        stationarity_tol: f64::INFINITY,
    });
    let cfg = |gradient: SavaeGradient| StepConfig {
        mode: Mode::Savae {
            gradient,
            encoder_loss: EncoderLoss::Refined,
        },
        beta: 1.0,
        svi: SviConfig {
            steps: a.svi_steps,
            optimizer: SviOptimizer::Sgd {
                lr: a.svi_lr,
                momentum: 0.5,
                clip: f64::INFINITY,
            },
            prox: a.prox,
            tol: if gradient == SavaeGradient::Unrolled {
                0.0
            } else {
                1e-11
            },
            batch_size: 1,
        },
    };
    let imp = train_step(&model, &x, &eps, &cfg(implicit))?;
    let unr = train_step(&model, &x, &eps, &cfg(SavaeGradient::Unrolled))?;
    let gnorm = imp
        .svi
        .as_ref()
        .map(|s| s.final_grad_norm_max)
        .unwrap_or(f64::NAN);
    let gi = flat(&imp.grads)?;
    let gu = flat(&unr.grads)?;
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
        let loss_at = |delta: f64| -> Result<f64> {
            let mut w = base.clone();
            w[off] += delta;
            var.set(&Tensor::from_vec(w, var.shape(), &dev)?)?;
            Ok(train_step(&model, &x, &eps, &cfg(implicit))?.loss)
        };
        let d = (loss_at(h)? - loss_at(-h)?) / (2.0 * h);
        var.set(&Tensor::from_vec(base, var.shape(), &dev)?)?;
        fd.push(d);
        checked.push(json!({"param": names[vi], "index": off, "fd": d, "implicit": gi[p], "unrolled": gu[p]}));
    }
    let gi_p: Vec<f64> = picks.iter().map(|&p| gi[p]).collect();
    let gu_p: Vec<f64> = picks.iter().map(|&p| gu[p]).collect();
    let e_if = rel_err(&gi_p, &fd);
    let e_uf = rel_err(&gu_p, &fd);
    let e_iu = rel_err(&gi, &gu);
    let pass = e_if <= a.tol && e_uf <= a.tol && e_iu <= a.tol;
    let report = json!({
        "examples": idx.len(), "batch_indices": idx, "dtype": "f64",
        "model": model.config, "svi_steps": a.svi_steps, "prox": a.prox,
        "final_inner_grad_norm_max": gnorm,
        "rel_err_implicit_vs_fd": e_if, "rel_err_unrolled_vs_fd": e_uf,
        "rel_err_implicit_vs_unrolled": e_iu, "fd_params": checked,
        "cg": imp.cg, "tol": a.tol, "pass": pass, "device": crate::device::name(&dev),
    });
    println!("{report}");
    if let Some(out) = &a.out {
        write_out(out, &model, &idx, &eps, &imp, &unr)?;
    }
    if !pass {
        bail!(
            "gradient check failed: a relative error exceeds --tol {}",
            a.tol
        );
    }
    Ok(())
}

fn write_out(
    path: &std::path::Path,
    model: &Vae,
    idx: &[usize],
    eps: &Noise,
    imp: &StepOutput,
    unr: &StepOutput,
) -> Result<()> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let dev = Device::Cpu;
    let eps = Noise(eps.0.to_device(&dev)?);
    t.insert(
        "batch_indices".into(),
        Tensor::from_vec(
            idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            idx.len(),
            &dev,
        )?,
    );
    t.insert("eps".into(), eps.0.clone());
    t.insert("lambda0".into(), imp.lambda0.to_device(&dev)?);
    if let Some(l) = &imp.lambda_refined {
        t.insert("lambda_star".into(), l.to_device(&dev)?);
    }
    for ((name, var), (gi, gu)) in model.params.iter().zip(imp.grads.iter().zip(&unr.grads)) {
        t.insert(name.to_string(), var.as_tensor().to_device(&dev)?);
        t.insert(format!("grad.implicit.{name}"), gi.to_device(&dev)?);
        t.insert(format!("grad.unrolled.{name}"), gu.to_device(&dev)?);
    }
    let bytes = safetensors::serialize(t.iter().map(|(n, v)| (n.as_str(), v)), None)?;
    checkpoint::write_atomic(path, &bytes)
}

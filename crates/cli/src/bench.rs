//! `savae bench`: median time of full training steps (step + Adam) per mode, K and batch
//! size, with peak memory, as JSON lines.
//!
//! Peak memory: on CPU the most heap bytes live at once during the configuration's steps,
//! above those live when it started (the model, its Adam moments and the data), counted
//! by the allocator (`crate::heap`; where it is not installed, the process's peak resident
//! set instead); on CUDA the device memory in use as
//! reported by the driver, sampled every 0.2 ms by a thread while the steps run, minus
//! the memory in use before the configuration started.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use rand::SeedableRng;
use savae_model::Vae;
use savae_train::adam::Adam;
use savae_train::options::{GradientKind, ModelKind, Passes};
use savae_train::step::train_step;
use savae_train::TrainConfig;
use serde_json::json;
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Modes: vae, vae-svi, savae-implicit, savae-unrolled (comma separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "vae,vae-svi,savae-unrolled,savae-implicit"
    )]
    pub modes: Vec<BenchMode>,
    /// Derivative passes of the inner ELBO to time (comma separated): analytic, autograd.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "analytic,autograd"
    )]
    pub passes: Vec<Passes>,
    /// SVI steps K (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "5,20,50")]
    pub k: Vec<usize>,
    /// Batch sizes (comma separated).
    /// Batch sizes (default: 100 for images, 32 for text).
    #[arg(long, value_delimiter = ',')]
    pub batch: Vec<usize>,
    /// mnist, or a text corpus (ptb, text:DIR) at its default model configuration.
    #[arg(long, default_value = "mnist")]
    pub dataset: String,
    /// Text: the sentence length (words) of the timed batch.
    #[arg(long, default_value_t = 20)]
    pub sentence_len: usize,
    /// CG iterations (the limit).
    #[arg(long, default_value_t = 20)]
    pub cg_iters: usize,
    /// CG's relative residual tolerance ‖r_b‖ ≤ tol·‖b_b‖ (0: every solve runs to the
    /// limit). The PyTorch reference stops its CG at max_b ‖r_b‖ < 1e-6.
    #[arg(long, default_value_t = 0.0)]
    pub cg_tol: f64,
    /// Timed steps per configuration (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps before the timed ones (allocator, caches).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// MNIST MLP hidden widths, comma-separated (the text model's sizes come from
    /// the training defaults).
    #[arg(long, value_delimiter = ',', default_value = "512,512")]
    pub hidden: Vec<usize>,
    /// MNIST latent dimension.
    #[arg(long, default_value_t = 32)]
    pub latent_dim: usize,
    #[command(flatten)]
    pub machine: crate::flags::Machine,
    /// Also time `savae eval` on this many validation examples (0: no eval line):
    /// the refinement (8 draws × the default K), 10 ELBO draws at λ0 and λ*, and
    /// --iw-samples importance samples, reported as decoder FLOP/s beside the rate the
    /// machine's matmul sustains on the decoder's largest layer.
    #[arg(long, default_value_t = 0)]
    pub eval_examples: usize,
    /// Importance samples of the timed evaluation.
    #[arg(long, default_value_t = 100)]
    pub iw_samples: usize,
}

/// A timed mode: a model, and for SA-VAE its gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchMode {
    Lm,
    Vae,
    VaeSvi,
    Svi,
    SavaeImplicit,
    SavaeUnrolled,
}

impl BenchMode {
    fn settings(self) -> (ModelKind, GradientKind) {
        match self {
            Self::Lm => (ModelKind::Lm, GradientKind::Implicit),
            Self::Vae => (ModelKind::Vae, GradientKind::Implicit),
            Self::VaeSvi => (ModelKind::VaeSvi, GradientKind::Implicit),
            Self::Svi => (ModelKind::Svi, GradientKind::Implicit),
            Self::SavaeImplicit => (ModelKind::Savae, GradientKind::Implicit),
            Self::SavaeUnrolled => (ModelKind::Savae, GradientKind::Unrolled),
        }
    }
}

/// Peak-memory probe for one configuration.
pub trait MemProbe {
    fn start(&mut self) -> Result<()>;
    /// Peak MiB since `start`.
    fn stop(&mut self) -> Result<f64>;
}

/// CPU: the peak of the allocator's live bytes above those at `start` (`crate::heap`), or
/// the process's VmHWM (reset with clear_refs) where that allocator is not installed.
#[derive(Default)]
pub struct CpuProbe {
    base: usize,
}

fn vm_field(name: &str) -> Result<f64> {
    let s = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with(name))
        .context("no such field in /proc/self/status")?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("0")
        .parse()
        .unwrap_or(0.0);
    Ok(kb / 1024.0)
}

impl CpuProbe {
    /// Whether the counting allocator is installed (it has counted something).
    fn counting() -> bool {
        crate::heap::live_bytes() > 0
    }

    /// What `stop` reports.
    pub fn kind() -> &'static str {
        if Self::counting() {
            "heap bytes live at the peak, above the start (model, Adam and data excluded)"
        } else {
            "process peak RSS"
        }
    }
}

impl MemProbe for CpuProbe {
    fn start(&mut self) -> Result<()> {
        self.base = crate::heap::reset_peak();
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Ok(())
    }
    fn stop(&mut self) -> Result<f64> {
        if Self::counting() {
            let peak = crate::heap::peak_bytes().saturating_sub(self.base);
            return Ok(peak as f64 / (1024.0 * 1024.0));
        }
        vm_field("VmHWM:")
    }
}

#[cfg(feature = "cuda")]
pub mod cuda_probe {
    use super::MemProbe;
    use anyhow::Result;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    /// Samples the driver's used-memory figure on a thread while a configuration runs.
    pub struct CudaProbe {
        pub device: candle_core::Device,
        stop: Arc<AtomicBool>,
        peak: Arc<AtomicU64>,
        base: u64,
        handle: Option<std::thread::JoinHandle<()>>,
    }

    fn used(dev: &candle_core::Device) -> u64 {
        if let candle_core::Device::Cuda(c) = dev {
            let stream = c.cuda_stream();
            let _ = stream.context().bind_to_thread();
            if let Ok((free, total)) = cudarc::driver::result::mem_get_info() {
                return (total - free) as u64;
            }
        }
        0
    }

    impl CudaProbe {
        pub fn new(device: candle_core::Device) -> Self {
            Self {
                device,
                stop: Arc::default(),
                peak: Arc::default(),
                base: 0,
                handle: None,
            }
        }
    }

    impl MemProbe for CudaProbe {
        fn start(&mut self) -> Result<()> {
            self.device.synchronize()?;
            self.base = used(&self.device);
            self.peak.store(self.base, Ordering::SeqCst);
            self.stop.store(false, Ordering::SeqCst);
            let (dev, stop, peak) = (self.device.clone(), self.stop.clone(), self.peak.clone());
            self.handle = Some(std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(used(&dev), Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }));
            Ok(())
        }
        fn stop(&mut self) -> Result<f64> {
            self.device.synchronize()?;
            self.stop.store(true, Ordering::SeqCst);
            if let Some(h) = self.handle.take() {
                let _ = h.join();
            }
            Ok(
                self.peak.load(Ordering::SeqCst).saturating_sub(self.base) as f64
                    / (1024.0 * 1024.0),
            )
        }
    }
}

fn probe_for(dev: &Device) -> Box<dyn MemProbe> {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return Box::new(cuda_probe::CudaProbe::new(dev.clone()));
    }
    let _ = dev;
    Box::new(CpuProbe::default())
}

/// FLOPs of one decoder forward row (an image, or one token of a sentence), and the
/// (rows, inner, outer) shape of its largest matmul for a batch of `rows`.
fn decoder_flops(model: &Vae) -> (f64, (usize, usize)) {
    match &model.decoder {
        savae_model::Decoder::Mlp(m) => {
            let mut flops = 0.0;
            let mut big = (0, 0);
            for l in &m.layers {
                let (o, i) = l.weight.dims2().unwrap_or((0, 0));
                flops += 2.0 * (o * i) as f64;
                if o * i > big.0 * big.1 {
                    big = (i, o);
                }
            }
            (flops, big)
        }
        savae_model::Decoder::Lstm(d) => {
            let dims = |t: &candle_core::Tensor| t.dims2().unwrap_or((0, 0));
            let (g, e) = dims(&d.lstm.weight_ih);
            let (_, h) = dims(&d.lstm.weight_hh);
            let (v, hh) = dims(&d.out.weight);
            let flops = 2.0 * (g * (e + h) + v * hh) as f64;
            (flops, (hh, v))
        }
    }
}

/// GFLOP/s of `[rows, inner] × [inner, outer]` in f32 on `dev` (median of 10).
fn matmul_rate(rows: usize, (inner, outer): (usize, usize), dev: &Device) -> Result<f64> {
    let a = candle_core::Tensor::randn(0f32, 1.0, (rows, inner), dev)?;
    let w = candle_core::Tensor::randn(0f32, 1.0, (outer, inner), dev)?;
    let mut times = Vec::new();
    for i in 0..12 {
        dev.synchronize()?;
        let t = Instant::now();
        let _ = a.matmul(&w.t()?)?;
        dev.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|x, y| x.total_cmp(y));
    Ok(2.0 * (rows * inner * outer) as f64 / times[times.len() / 2] / 1e9)
}

/// Times an evaluation of `n` validation examples with a fresh model of `cfg`.
fn bench_eval(
    a: &BenchArgs,
    cfg: &TrainConfig,
    corpus: &savae_train::batch::Corpus,
    dev: &Device,
) -> Result<serde_json::Value> {
    let split = corpus
        .valid
        .select(&(0..a.eval_examples.min(corpus.valid.len())).collect::<Vec<_>>());
    let model = Vae::new(&cfg.model_config(corpus.vocab_size()), 0, DType::F32, dev)?;
    let opts = savae_train::EvalOptions {
        svi: cfg.svi_config(),
        refine: true,
        iw_samples: a.iw_samples,
        elbo_samples: 10,
        refine_samples: cfg.samples.max(8),
        batch_size: cfg.batch_size,
        seed: 0,
        passes: Passes::Analytic,
    };
    let t = Instant::now();
    let r = savae_train::evaluate(&model, &split, "valid", &opts, dev)?;
    dev.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    // Decoder forward rows (images, or tokens) the work needs: each refinement gradient
    // is a forward and a backward per draw, K + 1 of them (the analytic backward has the
    // forward's matmuls, so 2 forwards; autograd's also forms the weight gradients candle
    // computes for detached weights, but that work is not needed and not counted); the
    // ELBOs at λ0 and λ*; the importance samples.
    let rows_per_example = r
        .tokens
        .map_or(1.0, |t| t as f64 / r.examples.max(1) as f64);
    let k = opts.svi.steps as f64;
    let forwards = 2.0 * (k + 1.0) * opts.refine_samples as f64
        + 2.0 * opts.elbo_samples as f64
        + opts.iw_samples as f64;
    let rows = r.examples as f64 * rows_per_example * forwards;
    let (flops_per_row, big) = decoder_flops(&model);
    let gflops = rows * flops_per_row / secs / 1e9;
    let mm = matmul_rate(
        cfg.batch_size * opts.refine_samples * rows_per_example as usize,
        big,
        dev,
    )?;
    Ok(json!({
        "kind": "eval", "dataset": a.dataset, "device": crate::device::name(dev),
        "examples": r.examples, "tokens": r.tokens, "seconds": secs,
        "examples_per_s": r.examples as f64 / secs,
        "decoder_forward_rows_per_s": rows / secs,
        "decoder_gflops": gflops, "matmul_gflops": mm, "matmul_over_eval": mm / gflops,
        "svi_steps": opts.svi.steps, "refine_samples": opts.refine_samples,
        "elbo_samples": opts.elbo_samples, "iw_samples": opts.iw_samples, "passes": "analytic",
    }))
}

pub fn run(a: BenchArgs) -> Result<()> {
    let dev = a.machine.device()?;
    savae_implicit::ensure_second_order()?;
    let base = TrainConfig::defaults_for(&a.dataset);
    base.validate()?;
    let text = base.is_text();
    let corpus = savae_train::batch::Corpus::load(
        &a.dataset,
        &a.machine.data_dir(),
        None,
        base.max_vocab,
        base.max_len,
    )?;
    // The candidates of a timed batch: shuffled images, or sentences of one length.
    let pool: Vec<usize> = match &corpus.train {
        savae_train::batch::SplitData::Images(s) => savae_data::epoch_order(0, 0, s.len),
        savae_train::batch::SplitData::Text(s) => (0..s.len())
            .filter(|&i| s.sentences[i].len() == a.sentence_len)
            .collect(),
    };
    let batches = if a.batch.is_empty() {
        vec![base.batch_size]
    } else {
        a.batch.clone()
    };
    let mut probe = probe_for(&dev);
    for &b in &batches {
        anyhow::ensure!(
            b > 0 && b <= pool.len(),
            "--batch {b} is out of range (at most {} examples{})",
            pool.len(),
            if text { " of that --sentence-len" } else { "" }
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (e, h) = (base.embed_dim, base.hidden.first().copied().unwrap_or(0));
        let dropout = (text && base.dropout > 0.0).then_some(savae_train::batch::Dropout {
            p: base.dropout,
            embed: e,
            hidden: h,
        });
        let x = corpus
            .train
            .batch(&pool[..b], &mut rng, DType::F32, &dev, dropout)?;
        let tokens_per_batch = text.then_some(b * (a.sentence_len + 1));
        for m in &a.modes {
            let (model_kind, grad) = m.settings();
            if model_kind == ModelKind::Lm && !text {
                continue;
            }
            let ks: Vec<usize> = if !model_kind.refines() {
                vec![0]
            } else {
                a.k.clone()
            };
            let (hidden, latent_dim) = if text {
                (base.hidden.clone(), base.latent_dim)
            } else {
                (a.hidden.clone(), a.latent_dim)
            };
            let passes = a.passes.clone();
            for (&k, &passes) in ks.iter().flat_map(|k| passes.iter().map(move |p| (k, p))) {
                let cfg = TrainConfig {
                    passes,
                    model: model_kind,
                    grad,
                    batch_size: b,
                    svi_steps: k,
                    cg_iters: a.cg_iters,
                    cg_tol: a.cg_tol,
                    // Time the whole algorithm: every example solves its adjoint system.
                    stationarity_tol: f64::INFINITY,
                    hidden: hidden.clone(),
                    latent_dim,
                    ..base.clone()
                };
                let mode = cfg.mode();
                let model = Vae::new(&cfg.model_config(corpus.vocab_size()), 0, DType::F32, &dev)?;
                let vars = model.params.vars();
                let mut adam = Adam::new(&vars, cfg.lr)?;
                let scfg = cfg.step_config(1.0);
                let mut times = Vec::new();
                let mut cg_mean = None;
                probe.start()?;
                for i in 0..a.warmup + a.steps {
                    let eps =
                        savae_train::batch::noise(&mut rng, 1, b, latent_dim, DType::F32, &dev)?;
                    dev.synchronize()?;
                    let t = Instant::now();
                    let out = train_step(&model, &x, &eps, &scfg)?;
                    adam.step(&vars, &out.grads)?;
                    dev.synchronize()?;
                    if i >= a.warmup {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    cg_mean = out.cg.map(|c| c.iters_mean);
                }
                let peak = probe.stop()?;
                times.sort_by(|x, y| x.total_cmp(y));
                let med = times[times.len() / 2];
                let mut line = json!({
                    "dataset": a.dataset,
                    "mode": mode.name(), "device": crate::device::name(&dev), "batch": b,
                    "passes": passes.name(),
                    "k": if mode.refines() { Some(k) } else { None },
                    "cg_iters": (*m == BenchMode::SavaeImplicit).then_some(a.cg_iters),
                    "cg_iters_mean": cg_mean, "cg_tol": a.cg_tol,
                    "median_ms": med, "min_ms": times[0], "examples_per_s": b as f64 / (med / 1e3),
                    "peak_mem_mib": peak,
                    "peak_mem_kind": if dev.is_cuda() { "device used (driver), above baseline" } else { CpuProbe::kind() },
                    "hidden": hidden, "latent_dim": latent_dim, "steps": a.steps,
                });
                if let Some(t) = tokens_per_batch {
                    line["tokens_per_batch"] = json!(t);
                    line["tokens_per_s"] = json!(t as f64 / (med / 1e3));
                    line["embed_dim"] = json!(base.embed_dim);
                    line["vocab"] = json!(corpus.vocab_size());
                    line["dropout"] = json!(base.dropout);
                }
                println!("{line}");
            }
        }
    }
    if a.eval_examples > 0 {
        let cfg = TrainConfig {
            hidden: if text {
                base.hidden.clone()
            } else {
                a.hidden.clone()
            },
            latent_dim: if text { base.latent_dim } else { a.latent_dim },
            ..base.clone()
        };
        println!("{}", bench_eval(&a, &cfg, &corpus, &dev)?);
    }
    Ok(())
}

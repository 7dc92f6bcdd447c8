//! `savae bench`: median time of full training steps (step + Adam) per mode, K and batch
//! size, with peak memory, as JSON lines.
//!
//! Peak memory: on CPU the process's peak resident set (VmHWM, reset before each
//! configuration through /proc/self/clear_refs); on CUDA the device memory in use as
//! reported by the driver, sampled every 0.2 ms by a thread while the steps run, minus
//! the memory in use before the configuration started.

use crate::data_dir;
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use rand::SeedableRng;
use savae_model::Vae;
use savae_train::adam::Adam;
use savae_train::options::{GradientKind, ModelKind, Passes};
use savae_train::step::train_step;
use savae_train::TrainConfig;
use serde_json::json;
use std::path::PathBuf;
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
    /// CG iterations (run to the limit: tolerance 0).
    #[arg(long, default_value_t = 20)]
    pub cg_iters: usize,
    /// Timed steps per configuration (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_delimiter = ',', default_value = "512,512")]
    pub hidden: Vec<usize>,
    #[arg(long, default_value_t = 32)]
    pub latent_dim: usize,
    #[arg(long, default_value = "auto")]
    pub device: String,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
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

/// CPU: VmHWM of this process (reset with clear_refs).
pub struct CpuProbe;

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

impl MemProbe for CpuProbe {
    fn start(&mut self) -> Result<()> {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Ok(())
    }
    fn stop(&mut self) -> Result<f64> {
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
    Box::new(CpuProbe)
}

pub fn run(a: BenchArgs) -> Result<()> {
    let dev = crate::device::resolve(&a.device)?;
    savae_implicit::ensure_second_order()?;
    let base = TrainConfig::defaults_for(&a.dataset);
    base.validate()?;
    let text = base.is_text();
    let corpus = savae_train::batch::Corpus::load(
        &a.dataset,
        &data_dir(a.data_dir.as_ref()),
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
            // The plain vae (and lm) step has no inner derivatives: one path to time.
            let passes: Vec<Passes> = if model_kind.refines() && !text {
                a.passes.clone()
            } else {
                a.passes.first().copied().into_iter().collect()
            };
            for (&k, &passes) in ks.iter().flat_map(|k| passes.iter().map(move |p| (k, p))) {
                let cfg = TrainConfig {
                    passes,
                    model: model_kind,
                    grad,
                    batch_size: b,
                    svi_steps: k,
                    cg_iters: a.cg_iters,
                    cg_tol: 0.0,
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
                    // The analytic passes are the MLP decoder's; text runs autograd.
                    "passes": model_kind.refines().then_some(if text { "autograd" } else { passes.name() }),
                    "k": if mode.refines() { Some(k) } else { None },
                    "cg_iters": (*m == BenchMode::SavaeImplicit).then_some(a.cg_iters),
                    "cg_iters_mean": cg_mean,
                    "median_ms": med, "min_ms": times[0], "examples_per_s": b as f64 / (med / 1e3),
                    "peak_mem_mib": peak,
                    "peak_mem_kind": if dev.is_cuda() { "device used (driver), above baseline" } else { "process peak RSS" },
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
    Ok(())
}

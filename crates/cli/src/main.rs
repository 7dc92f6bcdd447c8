//! `savae`: train, evaluate, check and benchmark semi-amortized VAEs.

use anyhow::Result;
use clap::{Parser, Subcommand};
use savae_cli::{bench, data_dir, device, flags, gradcheck, report, sample, train_cmd};
use savae_train::eval::{evaluate_checkpoint, EvalRequest};
use savae_train::options::SviMethod;
use std::path::PathBuf;

/// mimalloc keeps freed pages for reuse: the text model allocates and frees tensors of
/// tens of MB every step (vocabulary logits), and glibc's malloc returned them to the OS
/// and page-faulted them back each time (measured: the `lm` step took 1.03 s with glibc,
/// 0.51 s with its pages kept).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "savae",
    version,
    about = "Semi-amortized VAEs with implicit gradients, on candle"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model (defaults: an amortized VAE on static binarized MNIST; --model savae
    /// for SA-VAE with implicit gradients).
    Train(Box<train_cmd::TrainArgs>),
    /// Evaluate a checkpoint: ELBOs, KL, importance-sampled NLL, active units (JSON).
    Eval(EvalArgs),
    /// Compare the implicit, unrolled and finite-difference parameter gradients (JSON).
    Gradcheck(gradcheck::GradcheckArgs),
    /// Time training steps of each mode (JSON lines).
    Bench(bench::BenchArgs),
    /// Sentences from a text model: prior samples, reconstructions, interpolations.
    Sample(sample::SampleArgs),
    /// Draw a run: training curves, reconstructions, samples, traversals, amortization gap.
    Report(report::ReportArgs),
    /// Copy a checkpoint without its optimizer state (weights and metadata: for eval,
    /// report and sample; not for --resume).
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct ExportArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long)]
    out: PathBuf,
}

fn run_export(a: ExportArgs) -> Result<()> {
    use anyhow::Context;
    let ck = savae_train::checkpoint::load(&a.checkpoint)?;
    let model = ck.model(
        &a.checkpoint,
        ck.meta.config.dtype(),
        &candle_core::Device::Cpu,
    )?;
    savae_train::checkpoint::save(&a.out, &model, None, &ck.meta)
        .with_context(|| format!("--out {}", a.out.display()))?;
    eprintln!(
        "savae: wrote {} (weights and metadata, no optimizer state)",
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A checkpoint written by `savae train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// valid | test (| train).
    #[arg(long, default_value = "test", value_parser = flags::parse_split)]
    split: savae_data::Split,
    /// Importance samples for nll_iw (0 skips it).
    #[arg(long, default_value_t = 500)]
    iw_samples: usize,
    /// SVI refinement steps (default: the checkpoint's).
    #[arg(long)]
    svi_steps: Option<usize>,
    /// SVI refinement optimizer: sgd | adam | newton, at the checkpoint's --svi-lr
    /// (default: the checkpoint's), so that models trained with different refinements
    /// can be scored by the same one.
    #[arg(long, value_enum)]
    svi_optimizer: Option<SviMethod>,
    /// Evaluate the first N examples of the split (file order).
    #[arg(long)]
    max_examples: Option<usize>,
    /// Noise draws for the reported ELBOs.
    #[arg(long, default_value_t = 10)]
    elbo_samples: usize,
    /// Noise draws held fixed during the refinement (default: 8, or the checkpoint's
    /// --samples if larger; one draw overfits the refinement to its noise).
    #[arg(long)]
    refine_samples: Option<usize>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    #[arg(long)]
    quiet: bool,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let dev = device::resolve(&a.device)?;
    let req = EvalRequest {
        checkpoint: a.checkpoint,
        split: a.split,
        iw_samples: a.iw_samples,
        svi_steps: a.svi_steps,
        svi_optimizer: a.svi_optimizer,
        max_examples: a.max_examples,
        elbo_samples: a.elbo_samples,
        refine_samples: a.refine_samples,
        batch_size: a.batch_size,
        seed: a.seed,
        data_dir: data_dir(a.data_dir.as_ref()),
    };
    let (pb, mut progress) = flags::eval_progress(!a.quiet);
    let e = evaluate_checkpoint(&req, &dev, &mut progress)?;
    pb.finish_and_clear();
    println!("{}", e.json);
    Ok(())
}

fn main() {
    savae_implicit::enable_second_order();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => train_cmd::run(*a),
        Command::Eval(a) => run_eval(a),
        Command::Gradcheck(a) => gradcheck::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Export(a) => run_export(a),
        Command::Report(a) => report::run(a),
    };
    if let Err(e) = r {
        eprintln!("savae: error: {}", flags::render(&e));
        std::process::exit(1);
    }
}

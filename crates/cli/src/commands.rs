//! The command tree of `savae`: every subcommand and its flags, parsed to typed
//! arguments in one place ([`parse_from`]), and [`run`] dispatching them. The help of
//! `savae train` shows each setting's default, taken from [`TrainConfig`] itself (image
//! and text defaults), so `--help` cannot drift from what a run uses.

use crate::{bench, flags, gradcheck, report, sample, train_cmd};
use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use savae_train::eval::{evaluate_checkpoint, EvalRequest};
use savae_train::options::{Passes, SviMethod};
use savae_train::{EvalProgressFile, Subset, SubsetOrder, TrainConfig, SETTINGS};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "savae",
    version,
    about = "Semi-amortized VAEs with implicit gradients, on candle"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
pub struct ExportArgs {
    /// The checkpoint to copy (a run's best.safetensors or last.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Where the copy is written (atomically; an existing file is replaced).
    #[arg(long)]
    out: PathBuf,
    /// How the weights are stored: as-trained (exact) or f16 (half the size of f32, each
    /// weight rounded to 11 significant bits; loading converts back).
    #[arg(long, value_enum, default_value_t = savae_train::options::StoredPrecision::AsTrained)]
    precision: savae_train::options::StoredPrecision,
}

fn run_export(a: ExportArgs) -> Result<()> {
    use anyhow::Context;
    let ck = savae_train::checkpoint::load(&a.checkpoint)?;
    let model = ck.model(
        &a.checkpoint,
        ck.meta.config.dtype(),
        &candle_core::Device::Cpu,
    )?;
    savae_train::checkpoint::save_weights(&a.out, &model, &ck.meta, a.precision)
        .with_context(|| format!("--out {}", a.out.display()))?;
    eprintln!(
        "savae: wrote {} (weights stored {}, and metadata; no optimizer state)",
        a.out.display(),
        a.precision
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct EvalArgs {
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
    /// SVI refinement optimizer: sgd | adam | newton | newton-ls, at the checkpoint's --svi-lr
    /// (default: the checkpoint's), so that models trained with different refinements
    /// can be scored by the same one.
    #[arg(long, value_enum)]
    svi_optimizer: Option<SviMethod>,
    /// Proximal weight γ of the SVI refinement (default: the checkpoint's --prox), so that
    /// models trained at different γ can be scored by the same refinement.
    #[arg(long)]
    prox: Option<f64>,
    /// Evaluate N examples of the split, chosen by --subset [default: all].
    #[arg(long)]
    max_examples: Option<usize>,
    /// How --max-examples chooses: random (a sample drawn with --seed: representative
    /// even of the class-sorted MNIST test file) or first (file order).
    #[arg(long, value_enum, default_value_t = SubsetOrder::Random)]
    subset: SubsetOrder,
    /// Noise draws for the reported ELBOs.
    #[arg(long, default_value_t = 10)]
    elbo_samples: usize,
    /// Noise draws held fixed during the refinement (default: 8, or the checkpoint's
    /// --samples if larger; one draw overfits the refinement to its noise).
    #[arg(long)]
    refine_samples: Option<usize>,
    /// Examples evaluated at once (default: the checkpoint's training batch size). The
    /// noise is drawn per batch, so another size moves the figures within their noise.
    #[arg(long)]
    batch_size: Option<usize>,
    #[command(flatten)]
    machine: crate::flags::Machine,
    /// Seed of the subset, the refinement's draws, the ELBO draws and importance samples.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Derivatives of the refinement's objective: analytic or autograd (the reference;
    /// the same numbers up to rounding).
    #[arg(long, value_enum, default_value_t = Passes::Analytic)]
    passes: Passes,
    /// Keep the running totals in FILE (atomically, every --save-every minutes) and
    /// continue from it when it holds this evaluation's: a killed evaluation then resumes
    /// where it stopped, with the same numbers. Removed once the result is printed.
    #[arg(long, value_name = "FILE")]
    progress_file: Option<PathBuf>,
    /// Minutes between writes of --progress-file (0: after every batch).
    #[arg(long, default_value = "10", value_name = "MINUTES", value_parser = flags::minutes)]
    save_every: std::time::Duration,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let dev = a.machine.device()?;
    let req = EvalRequest {
        checkpoint: a.checkpoint,
        split: a.split,
        iw_samples: a.iw_samples,
        svi_steps: a.svi_steps,
        svi_optimizer: a.svi_optimizer,
        prox: a.prox,
        subset: Subset::new(a.max_examples, a.subset, a.seed),
        elbo_samples: a.elbo_samples,
        refine_samples: a.refine_samples,
        batch_size: a.batch_size,
        seed: a.seed,
        data_dir: a.machine.data_dir(),
        passes: a.passes,
        progress_file: a.progress_file.clone().map(|path| EvalProgressFile {
            path,
            save_every: a.save_every,
        }),
    };
    let (pb, mut progress) = flags::eval_progress(!a.quiet);
    let e = evaluate_checkpoint(&req, &dev, &mut progress)?;
    pb.finish_and_clear();
    if let (Some(p), Some(k)) = (&a.progress_file, e.continued_after) {
        eprintln!(
            "savae: continued from {} after {k} of {} batches",
            p.display(),
            e.batches
        );
    }
    println!("{}", e.json);
    if let Some(p) = &a.progress_file {
        // Done: a later evaluation of the same request starts over.
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// The clap command of `savae`, with every training setting's default in its help.
pub fn command() -> clap::Command {
    let img = TrainConfig::default();
    let text = TrainConfig::defaults_for("ptb");
    Cli::command().mut_subcommand("train", |mut c| {
        for &s in SETTINGS {
            let (a, b) = (img.setting_text(s), text.setting_text(s));
            let default = match (a, b) {
                (Some(a), Some(b)) if a != b && s != "dataset" => {
                    format!("[default: {a}; text: {b}]")
                }
                (Some(a), _) => format!("[default: {a}]"),
                _ => continue,
            };
            c = c.mut_arg(s, |arg| {
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                arg.help(format!("{help} {default}"))
            });
        }
        c
    })
}

/// Parses a command line (the program name first).
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let m = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&m)
}

/// Runs a parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train_cmd::run(*a),
        Command::Eval(a) => run_eval(a),
        Command::Gradcheck(a) => gradcheck::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Export(a) => run_export(a),
        Command::Report(a) => report::run(a),
    }
}

//! What the command line adds to the library: flag names in errors, value parsers for
//! types of the lower crates, and the evaluation progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use savae_train::eval::EvalProgress;
use savae_train::SettingError;
use std::path::PathBuf;

/// Where a command computes: `--device`, declared once for every command that takes it
/// with the default `auto` (alone in `sample`, inside [`Machine`] elsewhere).
#[derive(clap::Args, Debug, Clone)]
pub struct DeviceFlag {
    /// cpu | cuda | cuda:N | auto (auto: the first CUDA GPU when this binary was built
    /// with the `cuda` feature and one answers, else the CPU).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl DeviceFlag {
    /// The device `--device` names (see [`crate::device::resolve`]).
    pub fn resolve(&self) -> anyhow::Result<candle_core::Device> {
        crate::device::resolve(&self.device)
    }
}

/// Where a command computes and where it reads the data: `--device` and `--data-dir`,
/// declared once for `train`, `eval`, `report` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct Machine {
    #[command(flatten)]
    pub device: DeviceFlag,
    /// Folder holding mnist/, binarized_mnist/ and ptb/ (default: $SAVAE_DATA_DIR, else
    /// ./data, else the data/ of the source tree this binary was built from).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl Machine {
    /// The device `--device` names.
    pub fn device(&self) -> anyhow::Result<candle_core::Device> {
        self.device.resolve()
    }

    /// The data folder `--data-dir` names, or its default (see [`crate::data_dir`]).
    pub fn data_dir(&self) -> PathBuf {
        crate::data_dir(self.data_dir.as_ref())
    }
}

/// A clap value parser: a number of minutes (0 or more, fractions allowed) as a duration.
pub fn minutes(s: &str) -> Result<std::time::Duration, String> {
    let m: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of minutes"))?;
    if !(m.is_finite() && m >= 0.0) {
        return Err(format!("{s:?}: minutes must be a finite number, 0 or more"));
    }
    Ok(std::time::Duration::from_secs_f64(m * 60.0))
}

/// The program as the user invoked it, for commands we suggest: `savae` when it was
/// found on the PATH, else the path it was run by (`target/release/savae` after
/// `cargo run`), so that a suggested command runs when copied.
pub fn program() -> String {
    match std::env::args().next() {
        Some(p) if p.contains(std::path::MAIN_SEPARATOR) || p.contains('/') => p,
        _ => "savae".to_string(),
    }
}

/// The flag of a setting: `batch_size` → `--batch-size`.
pub fn flag(setting: &str) -> String {
    format!("--{}", setting.replace('_', "-"))
}

/// An error's chain as one line, `a: b: c`, with every [`SettingError`] in it worded
/// with its flag.
pub fn render(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| match c.downcast_ref::<SettingError>() {
            Some(s) => format!("{} {}", flag(s.setting), s.problem),
            None => c.to_string(),
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// `--split`: train, valid or test.
pub fn parse_split(s: &str) -> Result<savae_data::Split, String> {
    savae_data::Split::parse(s).map_err(|e| e.to_string())
}

/// A progress bar for an evaluation (hidden when `show` is false) and the callback that
/// drives it.
pub fn eval_progress(show: bool) -> (ProgressBar, impl FnMut(EvalProgress)) {
    let pb = if show {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "eval {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        pb.set_style(style);
    }
    let bar = pb.clone();
    let update = move |p: EvalProgress| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(format!("elbo {:.2}", p.elbo_refined));
    };
    (pb, update)
}

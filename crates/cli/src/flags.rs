//! What the command line adds to the library: flag names in errors, value parsers for
//! types of the lower crates, and the evaluation progress bar.

use indicatif::{ProgressBar, ProgressStyle};
use savae_train::eval::EvalProgress;
use savae_train::SettingError;

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

//! The `savae` command line over the `savae-train` library: flags parsed to typed
//! settings, progress bars, Ctrl-C, the metrics.jsonl writer, report drawing, sentence
//! sampling, gradient checks, benchmarks and the fault-injection hook of the tests.
//! `commands.rs` holds the command tree and dispatches it; `main.rs` only calls it.

pub mod bench;
pub mod commands;
pub mod device;
pub mod flags;
pub mod gradcheck;
pub mod heap;
pub mod report;
pub mod sample;
pub mod train_cmd;

use std::path::PathBuf;

/// Where the shipped data lives: `--data-dir`, else `$SAVAE_DATA_DIR`, else `data/` of
/// the current directory or of the source tree this binary was built from.
pub fn data_dir(flag: Option<&PathBuf>) -> PathBuf {
    if let Some(d) = flag {
        return d.clone();
    }
    if let Ok(d) = std::env::var("SAVAE_DATA_DIR") {
        return PathBuf::from(d);
    }
    let local = PathBuf::from("data");
    if local.join("binarized_mnist").exists() {
        return local;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"))
}

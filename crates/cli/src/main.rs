//! `savae`: train, evaluate, check and benchmark semi-amortized VAEs.

use savae_cli::{commands, flags};

/// mimalloc keeps freed pages for reuse: the text model allocates and frees tensors of
/// tens of MB every step (vocabulary logits), and glibc's malloc returned them to the OS
/// and page-faulted them back each time (measured: the `lm` step took 1.03 s with glibc,
/// 0.51 s with its pages kept).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    savae_train::configure_cpu_threads();
    savae_implicit::enable_second_order();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = match commands::parse_from(std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = commands::run(cli) {
        eprintln!("savae: error: {}", flags::render(&e));
        std::process::exit(1);
    }
}

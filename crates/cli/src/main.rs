//! `savae`: train, evaluate, check and benchmark semi-amortized VAEs.

use savae_cli::{commands, flags};

/// mimalloc keeps freed pages for reuse: the text model allocates and frees tensors of
/// tens of MB every step (vocabulary logits), and glibc's malloc returned them to the OS
/// and page-faulted them back each time (measured: the `lm` step took 1.03 s with glibc,
/// 0.51 s with its pages kept).
/// (Counting its bytes for `savae bench`, `savae_cli::heap`.)
#[global_allocator]
static GLOBAL: savae_cli::heap::CountingMiMalloc = savae_cli::heap::CountingMiMalloc;

/// Keeps freed memory for reuse: mimalloc returns freed pages to the OS after its
/// `purge_delay` (1 s), and a text step's vocabulary-sized tensors (27 MB each) then come
/// back as fresh pages the kernel must zero. Measured on the PTB implicit and unrolled
/// steps: 360 000–400 000 page faults and 85–89 s of CPU time for two steps of each,
/// against 1 900 and 58–65 s with purging off, for 2–4 % more peak memory.
///
/// `purge_delay` is option 15 of mimalloc v3's `mi_option_e` (libmimalloc-sys exports no
/// constant for it): it is set only when that option and option 18 (`os_tag`) hold their
/// v3 defaults, 1000 and 100 — so a different layout, or a user's `MIMALLOC_PURGE_DELAY`,
/// is left alone.
fn keep_freed_memory() {
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    const OS_TAG: libmimalloc_sys::mi_option_t = 18;
    // SAFETY: plain option reads and writes of the linked allocator.
    unsafe {
        if libmimalloc_sys::mi_option_get(PURGE_DELAY) == 1000
            && libmimalloc_sys::mi_option_get(OS_TAG) == 100
        {
            libmimalloc_sys::mi_option_set(PURGE_DELAY, -1);
        }
    }
}

fn main() {
    keep_freed_memory();
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

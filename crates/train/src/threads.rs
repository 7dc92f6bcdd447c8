//! The CPU threads savae computes on: one pool (rayon's), set up once per process.
//!
//! candle 0.11 has two pools on the CPU: rayon's, which runs its matmuls (gemm) and
//! savae's own kernels and row blocks ([`savae_model::analytic::ElboPoint`]), and a
//! spinning "barrier pool" for elementwise ops over 64k elements. On few cores the two
//! fight: a worker of one spins (25 000 pause loops before it sleeps) on the core the
//! other needs. candle also asks for the thread count on every matmul and, unless
//! `RAYON_NUM_THREADS` is set, counts the physical cores by reading `/proc/cpuinfo` each
//! time. Measured on 2 cores (MNIST implicit step, B = 100, K = 20, CG 20, row blocks,
//! three rounds): 195–234 ms with the barrier pool off against 197–395 ms with it on; in
//! a profile the spinning took 14 % of the samples and the `/proc/cpuinfo` reads about 2 %.

/// Fixes the thread count of candle and rayon (candle's own default: the physical cores,
/// or the CPUs the process may use) and turns candle's barrier pool off, unless the
/// environment already sets `RAYON_NUM_THREADS` or `CANDLE_NUM_THREADS`. Returns the
/// thread count.
///
/// Call it first thing in `main`, before any other thread starts: it sets environment
/// variables, which candle and rayon read when they first start their pools.
pub fn configure_cpu_threads() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // The barrier pool's size is this count minus one (the caller's thread).
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    candle_core::utils::get_num_threads()
}

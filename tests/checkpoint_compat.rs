//! Checkpoints written before the trainer became the `savae-train` library keep loading
//! and resuming exactly: the format-1 fixture of epoch 1 (see tests/fixtures/README.md),
//! resumed through the library to 2 epochs, holds the same weights and Adam moments, bit
//! for bit, as the old build's straight 2-epoch run (to f32 rounding where the matmul runs
//! other kernels than the old build's).

mod common;
use common::{tensors, tmpdir};
use savae_train::{RunOptions, Silent, TrainOverrides, Trainer};
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

#[test]
fn a_checkpoint_of_the_previous_trainer_resumes_to_the_same_bits() {
    savae_implicit::enable_second_order();
    let dir = tmpdir("compat");
    let fixtures = Path::new(FIXTURES);
    std::fs::copy(
        fixtures.join("v1-mnist-savae-implicit-epoch1.safetensors"),
        dir.join("last.safetensors"),
    )
    .unwrap();
    let opts = RunOptions::new(
        dir.clone(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../data").into(),
        candle_core::Device::Cpu,
    );
    let more = TrainOverrides {
        epochs: Some(2),
        ..TrainOverrides::default()
    };
    let mut trainer = Trainer::resume(opts, &[&more]).unwrap();
    assert_eq!((trainer.state().epoch, trainer.state().step), (1, 4));
    let summary = trainer.run(&mut Silent).unwrap();
    assert_eq!((summary.epochs_done, summary.steps), (2, 8));
    let want = tensors(&fixtures.join("v1-mnist-savae-implicit-epoch2.safetensors"));
    let got = tensors(&dir.join("last.safetensors"));
    assert_eq!(want.len(), got.len());
    let same_kernels = !gemm_uses_avx512();
    for ((nw, bw), (ng, bg)) in want.iter().zip(&got) {
        assert_eq!(nw, ng);
        if same_kernels {
            assert!(bw == bg, "{nw} differs from the old trainer's");
        } else {
            // Another matmul kernel rounds otherwise: the same numbers to f32 rounding,
            // grown over 8 steps (measured on an Intel Xeon with AVX-512: at most 2.6e-7 of
            // the tensor's largest entry; a changed formula moves them by 1e-3 and more).
            let (w, g) = (f32s(bw), f32s(bg));
            let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30);
            let err = w
                .iter()
                .zip(&g)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
                / scale;
            assert!(err < 1e-5, "{nw} is {err:e} off the old trainer's");
        }
    }
    // A setting outside the resumable ones is refused, naming it.
    let other = TrainOverrides {
        latent_dim: Some(3),
        ..TrainOverrides::default()
    };
    let opts = trainer.options().clone();
    let err = Trainer::resume(opts, &[&other]).err().unwrap().to_string();
    assert!(
        err.contains("latent_dim") && err.contains("contradicts"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether candle's CPU matmul runs gemm's AVX-512 kernels here (x86-64-v4, chosen at run
/// time): the fixtures were written by the AVX2/FMA kernels, whose bits only those repeat.
fn gemm_uses_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512cd")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Little-endian f32 entries of a tensor's bytes.
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

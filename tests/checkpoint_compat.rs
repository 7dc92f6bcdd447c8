//! Checkpoints written before the trainer became the `savae-train` library keep loading
//! and resuming exactly: the format-1 fixture of epoch 1 (see tests/fixtures/README.md),
//! resumed through the library to 2 epochs, holds the same weights and Adam moments, bit
//! for bit, as the old build's straight 2-epoch run.

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
    let opts = RunOptions {
        run_dir: dir.clone(),
        data_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../../data").into(),
        device: candle_core::Device::Cpu,
        max_bad_batches: 10,
    };
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
    for ((nw, bw), (ng, bg)) in want.iter().zip(&got) {
        assert_eq!(nw, ng);
        assert!(bw == bg, "{nw} differs from the old trainer's");
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

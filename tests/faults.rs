//! Fault injection: damaged checkpoints, numerical blow-ups and bad input each give a clear
//! one-line error naming the file or flag, never a panic, and never cost a saved checkpoint.

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{savae_env as savae, tmpdir};
use std::sync::OnceLock;

const TINY: &[&str] = &[
    "--device",
    "cpu",
    "--quiet",
    "--max-train-examples",
    "200",
    "--valid-examples",
    "50",
    "--hidden",
    "8",
    "--latent-dim",
    "2",
    "--batch-size",
    "50",
    "--svi-steps",
    "2",
    "--cg-iters",
    "2",
];

fn tiny_train(dir: &Path, extra: &[&str]) -> Output {
    let mut a = vec!["train", "--run-dir", dir.to_str().unwrap()];
    a.extend_from_slice(TINY);
    a.extend_from_slice(extra);
    savae(&a, &[])
}

/// A trained checkpoint shared by the checkpoint tests.
fn good_checkpoint() -> &'static PathBuf {
    static CK: OnceLock<PathBuf> = OnceLock::new();
    CK.get_or_init(|| {
        let d = tmpdir("good");
        let out = tiny_train(&d, &["--epochs", "1", "--model", "vae"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        d.join("last.safetensors")
    })
}

fn eval_err(ck: &Path) -> String {
    let out = savae(
        &[
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--max-examples",
            "5",
            "--iw-samples",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "a damaged checkpoint was accepted: {}",
        ck.display()
    );
    assert!(
        !err.contains("panicked"),
        "panic on {}: {err}",
        ck.display()
    );
    assert!(
        err.contains(&ck.display().to_string()),
        "the error does not name the file: {err}"
    );
    err
}

/// Rewrites the good checkpoint after `edit` changes its tensors and metadata JSON.
fn rewrite(
    name: &str,
    edit: impl FnOnce(&mut HashMap<String, Tensor>, &mut serde_json::Value),
) -> PathBuf {
    let bytes = std::fs::read(good_checkpoint()).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("savae").unwrap()).unwrap();
    let mut t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    edit(&mut t, &mut json);
    let md: HashMap<String, String> = [("savae".to_string(), json.to_string())].into();
    let out = safetensors::serialize(t.iter().map(|(n, v)| (n.as_str(), v)), Some(md)).unwrap();
    let p = tmpdir(name).join("ck.safetensors");
    std::fs::write(&p, out).unwrap();
    p
}

#[test]
fn truncated_checkpoint_is_refused() {
    let bytes = std::fs::read(good_checkpoint()).unwrap();
    for (i, cut) in [10usize, bytes.len() / 2, bytes.len() - 3]
        .into_iter()
        .enumerate()
    {
        let p = tmpdir(&format!("trunc{i}")).join("ck.safetensors");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = eval_err(&p);
        assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
    }
}

#[test]
fn corrupted_header_is_refused() {
    let mut bytes = std::fs::read(good_checkpoint()).unwrap();
    for b in bytes.iter_mut().skip(8).take(40) {
        *b = b'#';
    }
    let p = tmpdir("header").join("ck.safetensors");
    std::fs::write(&p, &bytes).unwrap();
    assert!(eval_err(&p).contains("header"));
}

#[test]
fn missing_extra_misshapen_mistyped_and_nonfinite_tensors_are_refused() {
    let p = rewrite("missing", |t, _| {
        t.remove("decoder.layers.1.bias");
    });
    assert!(eval_err(&p).contains("decoder.layers.1.bias is missing"));
    let p = rewrite("extra", |t, _| {
        t.insert(
            "decoder.layers.9.weight".into(),
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(eval_err(&p).contains("decoder.layers.9.weight does not belong"));
    let p = rewrite("shape", |t, _| {
        t.insert(
            "encoder.layers.0.weight".into(),
            Tensor::zeros((8, 783), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let e = eval_err(&p);
    assert!(
        e.contains("encoder.layers.0.weight") && e.contains("shape"),
        "{e}"
    );
    let p = rewrite("dtype", |t, _| {
        t.insert(
            "encoder.layers.0.bias".into(),
            Tensor::zeros(8, DType::U8, &Device::Cpu).unwrap(),
        );
    });
    let e = eval_err(&p);
    assert!(
        e.contains("encoder.layers.0.bias") && e.contains("dtype"),
        "{e}"
    );
    let p = rewrite("nan", |t, _| {
        let w = t["decoder.layers.0.bias"].clone();
        let bad = (w.zeros_like().unwrap() / 0.0).unwrap(); // NaN
        t.insert("decoder.layers.0.bias".into(), bad);
    });
    let e = eval_err(&p);
    assert!(
        e.contains("decoder.layers.0.bias") && e.contains("non-finite"),
        "{e}"
    );
}

#[test]
fn unknown_format_version_and_foreign_files_are_refused() {
    let p = rewrite("version", |_, j| {
        j["format_version"] = serde_json::json!(99)
    });
    assert!(eval_err(&p).contains("format version 99"));
    let p = rewrite("meta", |_, j| *j = serde_json::json!({"hello": 1}));
    assert!(eval_err(&p).contains("metadata is malformed"));
    let bytes = safetensors::serialize(
        [("w", Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap())]
            .iter()
            .map(|(n, t)| (*n, t)),
        None,
    )
    .unwrap();
    let p = tmpdir("foreign").join("ck.safetensors");
    std::fs::write(&p, bytes).unwrap();
    assert!(eval_err(&p).contains("not written by savae"));
}

#[test]
fn non_finite_batches_are_skipped_then_stop_the_run_with_the_checkpoint_intact() {
    let d = tmpdir("nan");
    let out = tiny_train(&d, &["--epochs", "1", "--model", "savae"]);
    assert!(out.status.success());
    let before = std::fs::read(d.join("last.safetensors")).unwrap();
    // One epoch is 4 steps; poison every loss from step 5 on.
    let out = savae(
        &[
            "train",
            "--run-dir",
            d.to_str().unwrap(),
            "--resume",
            "--epochs",
            "3",
            "--max-bad-batches",
            "2",
            "--quiet",
            "--device",
            "cpu",
        ],
        &[("SAVAE_INJECT_NAN_FROM_STEP", "5")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("non-finite") && err.contains("intact"),
        "{err}"
    );
    assert!(
        err.contains("batch skipped"),
        "each bad batch is warned about: {err}"
    );
    let metrics = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"skip\""))
            .count(),
        3,
        "{metrics}"
    );
    // The first poisoned step was step 5, in epoch 2: the epoch-2 checkpoint was never written.
    assert_eq!(std::fs::read(d.join("last.safetensors")).unwrap(), before);
}

#[test]
fn bad_input_is_refused_with_the_flag_named() {
    let d = tmpdir("input");
    let cfg = d.join("bad.toml");
    std::fs::write(&cfg, "epochs = 2\nlearning_rate = 0.1\n").unwrap();
    let unreadable = d.join("missing.toml");
    let run = d.join("r");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--config", cfg.to_str().unwrap()],
            "learning_rate",
        ),
        (
            vec!["train", "--config", unreadable.to_str().unwrap()],
            "missing.toml",
        ),
        (vec!["train", "--svi-steps", "-1"], "--svi-steps"),
        (vec!["train", "--resume", "--overwrite"], "--overwrite"),
        (
            vec![
                "train",
                "--model",
                "savae",
                "--grad",
                "unrolled",
                "--svi-optimizer",
                "adam",
            ],
            "--svi-optimizer",
        ),
        (vec!["train", "--lr", "-1"], "--lr"),
        (vec!["train", "--epochs", "0"], "--epochs"),
        (vec!["train", "--dataset", "cifar"], "dataset"),
        (vec!["train", "--no-such-flag"], "--no-such-flag"),
        (
            vec!["train", "--resume", "--run-dir", "/nonexistent/run"],
            "/nonexistent/run",
        ),
        (
            vec![
                "train",
                "--data-dir",
                "/nonexistent/data",
                "--run-dir",
                run.to_str().unwrap(),
            ],
            "/nonexistent/data",
        ),
    ];
    for (args, needle) in cases {
        let out = savae(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(
            err.contains(needle),
            "{args:?}: the error does not name {needle}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

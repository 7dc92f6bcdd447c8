//! The `savae` binary end to end on tiny configurations of the shipped MNIST.

mod common;
use common::{savae_env, savae_ok as ok, tensors, tmpdir};
use std::path::Path;
use std::process::Output;

fn savae(args: &[&str]) -> Output {
    savae_env(args, &[])
}

const TINY: &[&str] = &[
    "--device",
    "cpu",
    "--quiet",
    "--max-train-examples",
    "300",
    "--valid-examples",
    "100",
    "--hidden",
    "16",
    "--latent-dim",
    "3",
    "--batch-size",
    "50",
    "--svi-steps",
    "3",
    "--cg-iters",
    "4",
];

fn train(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", "--run-dir", dir.to_str().unwrap()];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    ok(&args)
}

/// `savae train --resume` of `dir` until `epochs` are done.
fn resume(dir: &Path, epochs: usize) -> String {
    let epochs = epochs.to_string();
    ok(&[
        "train",
        "--run-dir",
        dir.to_str().unwrap(),
        "--resume",
        "--epochs",
        &epochs,
        "--quiet",
        "--device",
        "cpu",
    ])
}

#[test]
fn resume_is_bit_identical_to_an_uninterrupted_run() {
    for model in [
        &["--model", "savae", "--grad", "implicit"][..],
        &["--model", "vae-svi"][..],
    ] {
        let straight = tmpdir("straight");
        let split = tmpdir("split");
        train(&straight, &[model, &["--epochs", "2"]].concat());
        train(&split, &[model, &["--epochs", "1"]].concat());
        resume(&split, 2);
        let a = tensors(&straight.join("last.safetensors"));
        let b = tensors(&split.join("last.safetensors"));
        assert_eq!(a.len(), b.len());
        assert!(a.iter().any(|(n, _)| n == "decoder.layers.0.weight"));
        assert!(a.iter().any(|(n, _)| n.starts_with("optim.m.")));
        for ((na, da), (nb, db)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(
                da == db,
                "{model:?}: tensor {na} differs between the straight and the resumed run"
            );
        }
        // The two runs' metrics agree too (epoch lines, apart from timings).
        let epochs = |d: &Path| -> Vec<f64> {
            std::fs::read_to_string(d.join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["kind"] == "epoch")
                .map(|v| v["valid_elbo_refined"].as_f64().unwrap())
                .collect()
        };
        assert_eq!(epochs(&straight), epochs(&split));
        let _ = std::fs::remove_dir_all(&straight);
        let _ = std::fs::remove_dir_all(&split);
    }
}

#[test]
fn checkpoint_has_documented_names_and_metadata_and_eval_prints_all_fields() {
    let d = tmpdir("eval");
    train(&d, &["--epochs", "1", "--model", "savae"]);
    let bytes = std::fs::read(d.join("best.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(meta.metadata().as_ref().unwrap().get("savae").unwrap()).unwrap();
    for k in ["format_version", "dataset", "model", "epoch", "step"] {
        assert!(json.get(k).is_some(), "metadata lacks {k}");
    }
    assert_eq!(json["model"]["latent_dim"], 3);
    assert_eq!(json["model"]["hidden"], serde_json::json!([16]));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("encoder.layers.0.weight").unwrap().shape(),
        &[16, 784]
    );
    assert_eq!(
        st.tensor("encoder.layers.1.weight").unwrap().shape(),
        &[6, 16]
    );
    assert_eq!(
        st.tensor("decoder.layers.1.weight").unwrap().shape(),
        &[784, 16]
    );
    assert_eq!(st.tensor("decoder.layers.1.bias").unwrap().shape(), &[784]);
    let ck = d.join("best.safetensors");
    // The arguments of an eval of 40 validation images, 5 refinement steps, and `extra`.
    let eval_args = |extra: &[&'static str]| {
        let mut a = vec![
            "eval",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--split",
            "valid",
            "--max-examples",
            "40",
            "--svi-steps",
            "5",
            "--device",
            "cpu",
            "--quiet",
        ];
        a.extend_from_slice(extra);
        a
    };
    let out = ok(&eval_args(&["--iw-samples", "20"]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "split",
        "examples",
        "elbo_amortized",
        "elbo_refined",
        "kl_refined",
        "nll_iw",
        "iw_samples",
        "active_units",
    ] {
        assert!(v.get(k).is_some(), "eval output lacks {k}: {v}");
    }
    assert_eq!(v["examples"], 40);
    assert_eq!(v["split"], "valid");
    let (ea, er, nll) = (
        v["elbo_amortized"].as_f64().unwrap(),
        v["elbo_refined"].as_f64().unwrap(),
        v["nll_iw"].as_f64().unwrap(),
    );
    assert!(ea < 0.0 && er < 0.0 && nll > 0.0, "{v}");
    // The importance-sampled bound is tighter than the ELBO (up to sampling noise).
    assert!(nll < -er + 5.0, "nll_iw {nll} vs -elbo {}", -er);
    assert_eq!(v["svi_optimizer"], "sgd", "the checkpoint's refinement");

    // `--svi-optimizer` scores the same checkpoint with another refinement: same
    // amortized numbers, a different refined ELBO.
    let with = |opt: &'static str| eval_args(&["--iw-samples", "0", "--svi-optimizer", opt]);
    let w: serde_json::Value = serde_json::from_str(ok(&with("newton")).trim()).unwrap();
    assert_eq!(w["svi_optimizer"], "newton");
    assert_eq!(w["elbo_amortized"], v["elbo_amortized"]);
    let erw = w["elbo_refined"].as_f64().unwrap();
    assert!(
        (erw - er).abs() > 1e-6,
        "newton refined {erw} = sgd refined {er}"
    );
    // The line-searched Newton parses as the name it prints.
    let ls: serde_json::Value = serde_json::from_str(ok(&with("newton-ls")).trim()).unwrap();
    assert_eq!(ls["svi_optimizer"], "newton-ls");
    assert!(ls["elbo_refined"].as_f64().unwrap().is_finite(), "{ls}");
    // `--prox` likewise: the checkpoint's γ (1) by default, another on request.
    assert_eq!(v["svi_prox"], 1.0);
    let p: serde_json::Value =
        serde_json::from_str(ok(&eval_args(&["--iw-samples", "0", "--prox", "5"])).trim()).unwrap();
    assert_eq!(p["svi_prox"], 5.0);
    assert_eq!(p["elbo_amortized"], v["elbo_amortized"]);
    let erp = p["elbo_refined"].as_f64().unwrap();
    assert!(
        (erp - er).abs() > 1e-6,
        "γ = 5 refined {erp} = γ = 1 refined {er}"
    );
    let out = savae(&with("lbfgs"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--svi-optimizer") && err.contains("lbfgs"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_checkpoint_of_another_architecture_is_refused_naming_the_tensor() {
    let d = tmpdir("arch");
    train(&d, &["--epochs", "1", "--model", "vae"]);
    let out = savae(&[
        "train",
        "--run-dir",
        d.to_str().unwrap(),
        "--resume",
        "--hidden",
        "32",
        "--device",
        "cpu",
        "--quiet",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hidden") && err.contains("contradicts"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_flags_and_occupied_run_dirs_are_refused_clearly() {
    let d = tmpdir("flags");
    for (args, needle) in [
        (vec!["train", "--batch-size", "0"], "--batch-size"),
        (vec!["train", "--latent-dim", "0"], "--latent-dim"),
        (vec!["train", "--model", "vqvae"], "--model"),
        (vec!["train", "--activation", "swish"], "activation"),
        (vec!["train", "--device", "tpu"], "--device"),
        (vec!["train", "--encoder-loss", "both"], "--encoder-loss"),
        (vec!["train", "--patience", "0"], "--patience"),
        // The default refinement is SGD, which has no Newton solve to loosen.
        (vec!["train", "--newton-solve", "inexact"], "--newton-solve"),
        (
            vec!["eval", "--checkpoint", "x.safetensors", "--prox=-1"],
            "--prox",
        ),
        (
            vec!["eval", "--checkpoint", "/nonexistent.safetensors"],
            "/nonexistent.safetensors",
        ),
        (
            vec!["gradcheck", "--newton-steps", "2", "--newton-tol=-1"],
            "--newton-tol",
        ),
        // A per-example tolerance without the refinement it stops.
        (vec!["gradcheck", "--newton-tol", "0.1"], "--newton-steps"),
    ] {
        let mut a = args.clone();
        a.extend(
            ["--run-dir", d.to_str().unwrap()]
                .iter()
                .filter(|_| args[0] == "train"),
        );
        let out = savae(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{a:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{a:?} panicked: {err}");
    }
    train(&d, &["--epochs", "1", "--model", "vae"]);
    let out = savae(&[
        "train",
        "--run-dir",
        d.to_str().unwrap(),
        "--device",
        "cpu",
        "--quiet",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already holds a run"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn without_cuda_the_cuda_device_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        eprintln!("skipped: this build has CUDA support");
        return;
    }
    let out = savae(&["train", "--device", "cuda", "--run-dir", "/tmp/never"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("without CUDA support") && !err.contains("panicked"),
        "{err}"
    );
}

/// The JSON report stored as the metadata of a gradcheck `--out` file.
fn gradcheck_meta(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta
        .metadata()
        .clone()
        .expect("gradcheck output has metadata");
    serde_json::from_str(&meta["gradcheck"]).unwrap()
}

/// `savae gradcheck` on 2 images, 4 differenced parameters, 1500 steps, plus `extra`.
fn small_gradcheck<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "gradcheck",
        "--examples",
        "2",
        "--fd-params",
        "4",
        "--svi-steps",
        "1500",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn gradcheck_passes_on_a_small_fresh_model() {
    let d = tmpdir("gradcheck");
    let out_file = d.join("grads.safetensors");
    let out = ok(&small_gradcheck(&["--out", out_file.to_str().unwrap()]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pass"], true, "{v}");
    assert!(v["rel_err_implicit_vs_fd"].as_f64().unwrap() < 1e-6);
    assert!(v["rel_err_implicit_vs_unrolled"].as_f64().unwrap() < 1e-6);
    // The step came from the curvature, and every setting is recorded.
    let s = &v["settings"];
    assert_eq!(s["svi"]["lr_from"], "curvature", "{s}");
    let l = v["curvature_at_lambda0"]["largest_eigenvalue"][0]
        .as_f64()
        .unwrap();
    assert!(l > 5.0, "γI − H has eigenvalues ≥ γ − ‖H‖: {l}");
    assert_eq!(s["outer_noise"], "fresh", "the training default: {s}");
    for k in [
        "model",
        "dataset",
        "split",
        "batch_indices",
        "seed",
        "beta",
        "loss",
        "cg_max_iters",
        "cg_tol",
        "hvp",
        "encoder_loss",
        "stationarity_tol",
        "tol",
    ] {
        assert!(!s[k].is_null(), "settings lack {k}: {s}");
    }
    assert!(v["refinement_implicit"]["steps"].as_u64().unwrap() < 1500);
    assert_eq!(v["refinement_unrolled"]["steps"], 1500);
    let bytes = std::fs::read(&out_file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for k in [
        "batch_indices",
        "images",
        "eps",
        "outer_eps",
        "lambda0",
        "lambda_star",
        "decoder.layers.0.weight",
        "grad.implicit.decoder.layers.0.weight",
        "grad.unrolled.encoder.layers.1.bias",
    ] {
        assert!(st.tensor(k).is_ok(), "gradcheck output lacks {k}");
    }
    assert_eq!(st.tensor("images").unwrap().shape(), &[2, 784]);
    assert_eq!(gradcheck_meta(&out_file), v, "the file carries the report");
    assert_eq!(s["passes"], "analytic");
    // The autograd reference passes the same check.
    let out = ok(&small_gradcheck(&["--passes", "autograd"]));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (&r["pass"], &r["settings"]["passes"]),
        (&true.into(), &"autograd".into())
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The three-way check holds with several draws per example (training's `--samples`), and
/// `--cg-iters` measures what capping the adjoint CG costs against the converged solve.
#[test]
fn gradcheck_with_several_draws_and_a_capped_solve() {
    let out = ok(&small_gradcheck(&[
        "--samples",
        "3",
        "--cg-iters",
        "2",
        "--newton-steps",
        "2",
    ]));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pass"], true, "{v}");
    assert_eq!(v["settings"]["noise_samples"], 3, "{v}");
    assert!(v["rel_err_implicit_vs_fd"].as_f64().unwrap() < 1e-6, "{v}");
    assert!(
        v["rel_err_implicit_vs_unrolled"].as_f64().unwrap() < 1e-6,
        "{v}"
    );
    let c = &v["cg_capped"];
    assert_eq!(c["max_iters"], 2, "{c}");
    assert_eq!(c["cg"]["iters_max"], 2, "{c}");
    // Two CG iterations on an 8-dimensional system leave an error, small but far above
    // the converged solve's.
    let e = c["rel_err_vs_converged"].as_f64().unwrap();
    assert!(e > 1e-8 && e < 0.5, "{c}");
    assert!(c["cosine"].as_f64().unwrap() > 0.8, "{c}");
    // Two newton-ls steps, exact and inexact: each gradient is near the converged one,
    // not equal to it, and the inexact solves take fewer products for a less stationary λ_K.
    let n = v["newton_refinement"].as_array().unwrap();
    assert_eq!(
        (n[0]["solve"].as_str(), n[1]["solve"].as_str()),
        (Some("exact"), Some("inexact")),
        "{v}"
    );
    for r in n {
        let e = r["rel_err_vs_converged"].as_f64().unwrap();
        assert!(e > 1e-12 && e < 0.5, "{r}");
    }
    let num = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    assert!(
        num(&n[1], "hessian_products") < num(&n[0], "hessian_products"),
        "{v}"
    );
    assert!(
        num(&n[1], "final_grad_norm_max") > num(&n[0], "final_grad_norm_max"),
        "{v}"
    );
    for r in n {
        assert_eq!(
            (r["tol"].as_f64(), r["steps"].as_u64()),
            (Some(0.0), Some(2))
        );
    }
    // With a per-example tolerance every example already meets at λ0, none steps: each is
    // evaluated once, and the gradient at λ0 is further off than after two steps.
    let out = ok(&small_gradcheck(&[
        "--newton-steps",
        "2",
        "--newton-tol",
        "1e6",
    ]));
    let t: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for (r, r2) in t["newton_refinement"].as_array().unwrap().iter().zip(n) {
        assert_eq!(
            (r["steps"].as_u64(), r["evaluated_rows"].as_u64()),
            (Some(0), Some(2)),
            "{r}"
        );
        assert_eq!(r["hessian_products"], 0, "{r}");
        assert!(
            num(r, "rel_err_vs_converged") > num(r2, "rel_err_vs_converged"),
            "{r} against {r2}"
        );
    }
    // Without the flags there is no capped solve and no short refinement.
    let plain = ok(&small_gradcheck(&[]));
    let p: serde_json::Value = serde_json::from_str(plain.trim()).unwrap();
    assert!(p["cg_capped"].is_null(), "{p}");
    assert_eq!(p["newton_refinement"], serde_json::json!([]), "{p}");
    assert_eq!(p["settings"]["noise_samples"], 1, "{p}");
}

/// With `--encoder-loss amortized` the encoder's gradient is that of its own ELBO at λ0,
/// not of the loss at λ*: finite differences take each parameter's own loss, and the
/// check passes on encoder and decoder parameters alike.
#[test]
fn gradcheck_differentiates_the_encoders_own_loss_when_it_is_amortized() {
    let out = ok(&[
        "gradcheck",
        "--examples",
        "2",
        "--svi-steps",
        "1500",
        "--encoder-loss",
        "amortized",
        "--samples",
        "3",
        "--fd-params",
        "8",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["pass"], true, "{v}");
    assert!(v["rel_err_implicit_vs_fd"].as_f64().unwrap() < 1e-6, "{v}");
    let checked = v["fd_params"].as_array().unwrap();
    let nonzero = |of: &str| {
        checked
            .iter()
            .filter(|c| c["of"] == of && c["fd"].as_f64().unwrap().abs() > 1e-3)
            .count()
    };
    // The seed picks encoder weights that matter and decoder ones (the L of λ*).
    assert!(nonzero("amortized") >= 1 && nonzero("refined") >= 1, "{v}");
    for c in checked {
        let enc = c["param"].as_str().unwrap().starts_with("encoder.");
        assert_eq!(c["of"], if enc { "amortized" } else { "refined" }, "{c}");
    }
}

/// A check that fails says why and what to change, and its output file is marked.
#[test]
fn gradcheck_failures_are_explained_and_marked() {
    let d = tmpdir("gradcheck-fail");
    let out_file = d.join("grads.safetensors");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "gradcheck",
            "--examples",
            "2",
            "--fd-params",
            "2",
            "--outer-noise",
            "same",
            "--out",
            out_file.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let out = savae(&args);
        assert!(!out.status.success());
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        assert_eq!(v["pass"], false, "{v}");
        assert_eq!(gradcheck_meta(&out_file)["pass"], false);
        assert_eq!(v["settings"]["outer_noise"], "same");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // Too few steps: not stationary, and the implicit gradient is off.
    let err = run(&["--svi-steps", "20"]);
    assert!(
        err.contains("not stationary") && err.contains("raise --svi-steps"),
        "{err}"
    );
    // A step far above 3/L: the refinement diverges.
    let err = run(&["--svi-steps", "300", "--svi-lr", "0.5"]);
    assert!(
        err.contains("diverged") && err.contains("lower --svi-lr") && err.contains("non-finite"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The shipped MNIST checkpoints stay loadable and still score what checkpoints/README.md
/// says (test NLL 92.9, 92.1 and 90.8; here a random 200 images and 50 samples, so a band).
#[test]
fn the_shipped_mnist_checkpoints_evaluate() {
    for name in [
        "mnist-vae",
        "mnist-savae-unrolled-ft",
        "mnist-savae-unrolled",
        "mnist-savae-implicit",
    ] {
        let ck = format!(
            "{}/../../checkpoints/{name}.safetensors",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = ok(&[
            "eval",
            "--checkpoint",
            &ck,
            "--max-examples",
            "200",
            "--iw-samples",
            "50",
            "--quiet",
        ]);
        let e: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let nll = e["nll_iw"].as_f64().unwrap();
        // A random 200 of the class-sorted test file, so near the whole split's 92–93
        // (the first 200, all zeros, score about 103).
        assert_eq!(e["subset"]["selection"], "random", "{e}");
        assert!((88.0..98.0).contains(&nll), "{name}: {e}");
        assert!(
            e["elbo_refined"].as_f64().unwrap() > e["elbo_amortized"].as_f64().unwrap(),
            "{name}: {e}"
        );
    }
}

/// The first step's amortized ELBO of a run (computed before its first update).
fn first_step_elbo(dir: &Path) -> f64 {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "step")
        .expect("a step line")["elbo_amortized"]
        .as_f64()
        .unwrap()
}

#[test]
fn init_from_starts_from_the_checkpoint_and_refuses_what_does_not_fit() {
    let base = tmpdir("init-base");
    train(&base, &["--model", "vae", "--epochs", "4", "--lr", "3e-3"]);
    let start = base.join("best.safetensors");
    let start_s = start.to_str().unwrap();
    let tuned = tmpdir("init-tuned");
    let fresh = tmpdir("init-fresh");
    let sa = ["--model", "savae", "--epochs", "1", "--log-every", "1"];
    train(&tuned, &[&sa[..], &["--init-from", start_s]].concat());
    train(&fresh, &sa);
    let (t, f) = (first_step_elbo(&tuned), first_step_elbo(&fresh));
    assert!(
        t > f + 20.0,
        "the fine-tuned run did not start from the trained weights: first ELBO {t} vs fresh {f}"
    );
    // The run records where it started, and resumes without the flag.
    let out = ok(&[
        "eval",
        "--checkpoint",
        tuned.join("last.safetensors").to_str().unwrap(),
        "--split",
        "valid",
        "--max-examples",
        "50",
        "--iw-samples",
        "0",
        "--quiet",
        "--device",
        "cpu",
    ]);
    assert!(out.contains("elbo_refined"), "{out}");
    let bytes = std::fs::read(tuned.join("last.safetensors")).unwrap();
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let savae_meta = &st_meta.metadata().as_ref().unwrap()["savae"];
    assert!(savae_meta.contains("\"init_from\""), "{savae_meta}");
    resume(&tuned, 2);
    // What does not fit is refused, naming the flag and what differs.
    let cases: [(&[&str], &[&str]); 3] = [
        (
            &["--init-from", "/nonexistent/best.safetensors"],
            &["--init-from", "/nonexistent/best.safetensors"],
        ),
        (
            &["--init-from", start_s, "--activation", "tanh"],
            &["--init-from", "activation softplus there, tanh here"],
        ),
        (
            &["--init-from", start_s, "--dataset", "mnist-dynamic"],
            &["--init-from", "dataset mnist,", "dataset mnist-dynamic"],
        ),
    ];
    for (extra, wanted) in cases {
        let dir = tmpdir("init-bad");
        let mut args = vec!["train", "--run-dir", dir.to_str().unwrap()];
        args.extend_from_slice(TINY);
        args.extend_from_slice(&sa);
        args.extend_from_slice(extra);
        let out = savae(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        for w in wanted {
            assert!(
                err.contains(w),
                "{extra:?}: the error does not say {w:?}:\n{err}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    for d in [base, tuned, fresh] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A settings file sets the run folder and settings; flags override the file.
#[test]
fn a_settings_file_sets_run_dir_and_flags_override_it() {
    let d = tmpdir("config-file");
    let run = d.join("from-file");
    let file = d.join("settings.toml");
    std::fs::write(
        &file,
        format!(
            "run_dir = {:?}\nepochs = 1\nlatent_dim = 2\nlog_every = 1\n",
            run.to_str().unwrap()
        ),
    )
    .unwrap();
    let mut args = vec!["train", "--config", file.to_str().unwrap()];
    args.extend_from_slice(TINY);
    ok(&args);
    let ck = savae_train::checkpoint::load(&run.join("last.safetensors")).unwrap();
    // The file's epochs, and the flag's latent_dim (TINY: 3) over the file's 2.
    assert_eq!((ck.meta.epoch, ck.meta.config.latent_dim), (1, 3));
    // A run_dir that is not a string is refused, naming the file.
    std::fs::write(&file, "run_dir = 3\n").unwrap();
    let out = savae(&["train", "--config", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("settings.toml") && err.contains("run_dir"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// `savae bench` on a tiny model: one JSON line per mode with its time and the heap it
/// needed, counted by the allocator; the unrolled step, which keeps every λ_k's point for
/// its backward, needs more than the implicit one.
#[test]
fn bench_reports_time_and_the_heap_each_step_needs() {
    let out = ok(&[
        "bench",
        "--device",
        "cpu",
        "--modes",
        "savae-unrolled,savae-implicit",
        "--k",
        "20",
        "--batch",
        "20",
        "--hidden",
        "64",
        "--latent-dim",
        "4",
        "--cg-iters",
        "5",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--passes",
        "analytic",
    ]);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("median_ms").is_some())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    let heap = |mode: &str| {
        let v = lines.iter().find(|v| v["mode"] == mode).unwrap();
        assert!(v["median_ms"].as_f64().unwrap() > 0.0);
        let kind = v["peak_mem_kind"].as_str().unwrap();
        assert!(kind.starts_with("heap bytes"), "{kind}");
        v["peak_mem_mib"].as_f64().unwrap()
    };
    let (unrolled, implicit) = (heap("savae-unrolled"), heap("savae-implicit"));
    assert!(
        implicit > 0.0 && unrolled > 2.0 * implicit,
        "{unrolled} vs {implicit}"
    );
}

/// `--patience N` ends a run once the validation ELBO has not improved for N epochs: with
/// a learning rate too small to change the weights, the validation ELBO only moves with
/// its draws, so the run stops N epochs after its best; a resume keeps the decision.
#[test]
fn patience_stops_a_run_that_no_longer_improves() {
    let dir = tmpdir("patience");
    let out = train(
        &dir,
        &[
            "--model",
            "vae",
            "--epochs",
            "12",
            "--patience",
            "1",
            "--lr",
            "1e-30",
        ],
    );
    let s: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let done = s["epochs_done"].as_u64().unwrap();
    let best = s["best_epoch"].as_u64().unwrap();
    assert_eq!(s["early_stopped"], true, "{s}");
    assert_eq!(done, best + 1, "{s}");
    assert!(done < 12, "{s}");
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let valid: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .map(|v| v["valid_elbo_amortized"].as_f64().unwrap())
        .collect();
    assert_eq!(valid.len() as u64, done);
    let top = valid.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(valid[best as usize - 1], top, "{valid:?}");
    assert!(valid[done as usize - 1] <= top);
    let again: serde_json::Value =
        serde_json::from_str(resume(&dir, 20).lines().last().unwrap()).unwrap();
    assert_eq!(again["epochs_done"].as_u64().unwrap(), done, "{again}");
    assert_eq!(again["early_stopped"], true);
}

/// The heap of each step in metrics.jsonl: the unrolled gradient's grows with the number
/// of refinement steps K (it keeps every step for the reverse pass), the implicit
/// gradient's does not; the epoch line carries the epoch's largest step heap.
#[test]
fn step_lines_report_the_heap_which_grows_with_k_only_when_unrolled() {
    let least_step_heap = |grad: &str, k: &str| -> f64 {
        let d = tmpdir(&format!("heap-{grad}-{k}"));
        // TINY with this K in place of its --svi-steps.
        let at = TINY.iter().position(|&a| a == "--svi-steps").unwrap();
        let mut args = vec!["train", "--run-dir", d.to_str().unwrap()];
        args.extend_from_slice(&TINY[..at]);
        args.extend_from_slice(&TINY[at + 2..]);
        args.extend_from_slice(&["--model", "savae", "--grad", grad, "--svi-steps", k]);
        args.extend_from_slice(&["--epochs", "1", "--log-every", "1"]);
        ok(&args);
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let steps: Vec<f64> = lines
            .iter()
            .filter(|v| v["kind"] == "step")
            .map(|v| v["heap_mib"].as_f64().unwrap())
            .collect();
        let epoch = lines.iter().find(|v| v["kind"] == "epoch").unwrap()["step_heap_peak_mib"]
            .as_f64()
            .unwrap();
        assert_eq!(steps.len(), 6, "{grad} K={k}");
        assert!(
            steps.iter().all(|&h| h > 0.0 && h <= epoch),
            "{steps:?} vs {epoch}"
        );
        assert!(steps.contains(&epoch), "{steps:?} vs {epoch}");
        let _ = std::fs::remove_dir_all(&d);
        // The smallest step's: the count is process-wide, and when the worker threads
        // allocate and free their buffers lifts a step's peak by 0.03–0.17 MiB at random
        // (0.571 → 0.741 MiB at K = 60, in any step, sometimes in half of them); the
        // lower envelope is the step's own need. One step's figure made this test flaky.
        steps.iter().cloned().fold(f64::INFINITY, f64::min)
    };
    let (u3, u60) = (
        least_step_heap("unrolled", "3"),
        least_step_heap("unrolled", "60"),
    );
    let (i3, i60) = (
        least_step_heap("implicit", "3"),
        least_step_heap("implicit", "60"),
    );
    assert!(u60 > 5.0 * u3, "unrolled: K=3 {u3} MiB, K=60 {u60} MiB");
    assert!(
        (i60 - i3).abs() < 0.1 * i3,
        "implicit: K=3 {i3} MiB, K=60 {i60} MiB"
    );
    assert!(i60 < u3, "implicit K=60 {i60} MiB vs unrolled K=3 {u3} MiB");
}

#[test]
fn newton_solve_inexact_reaches_the_refinement_and_its_products_are_logged() {
    // The Newton solves' Hessian-vector products of each step, from the step lines.
    let products = |solve: &str| -> Vec<u64> {
        let d = tmpdir(&format!("newton-solve-{solve}"));
        train(
            &d,
            &[
                "--model",
                "savae",
                "--svi-optimizer",
                "newton-ls",
                "--samples",
                "2",
                "--newton-solve",
                solve,
                "--epochs",
                "1",
                "--log-every",
                "1",
            ],
        );
        let text = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
        let _ = std::fs::remove_dir_all(&d);
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "step")
            .map(|v| v["svi"]["hessian_products"].as_u64().unwrap())
            .collect()
    };
    let (exact, inexact) = (products("exact"), products("inexact"));
    assert_eq!(exact.len(), 6);
    assert!(exact.iter().all(|&p| p > 0), "{exact:?}");
    assert!(
        inexact.iter().sum::<u64>() < exact.iter().sum::<u64>(),
        "inexact {inexact:?} against exact {exact:?}"
    );
}

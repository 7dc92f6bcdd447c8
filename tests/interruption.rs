//! Interruptions: SIGTERM mid-epoch saves the position and resumes bit-identically;
//! SIGKILL at random moments never leaves an unloadable checkpoint.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::{savae_cmd as bin, tensors, tmpdir};
use std::time::{Duration, Instant};

const TINY: &[&str] = &[
    "--device",
    "cpu",
    "--quiet",
    "--max-train-examples",
    "1000",
    "--valid-examples",
    "100",
    "--hidden",
    "16",
    "--latent-dim",
    "3",
    "--batch-size",
    "25",
    "--svi-steps",
    "3",
    "--cg-iters",
    "3",
    "--model",
    "savae",
    "--log-every",
    "1",
];

fn train_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "train".into(),
        "--run-dir".into(),
        dir.display().to_string(),
    ];
    a.extend(TINY.iter().map(|s| s.to_string()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Trains the tiny configuration into `dir` for `epochs` epochs; panics with savae's
/// stderr if it fails.
fn train_tiny(dir: &Path, epochs: &str) {
    assert_ok(
        &bin()
            .args(train_args(dir, &["--epochs", epochs]))
            .output()
            .unwrap(),
    );
}

/// Panics with savae's stderr unless it exited successfully.
fn assert_ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Panics unless the two run folders' last.safetensors hold the same tensors, bit for bit.
fn assert_same_weights(a: &Path, b: &Path, after: &str) {
    let (ta, tb) = (
        tensors(&a.join("last.safetensors")),
        tensors(&b.join("last.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for ((name, da), (_, db)) in ta.iter().zip(&tb) {
        assert!(da == db, "tensor {name} differs after {after}");
    }
}

fn steps_logged(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .map(|s| {
            s.lines()
                .filter(|l| l.contains("\"kind\":\"step\""))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn sigterm_mid_epoch_saves_and_resume_is_bit_identical() {
    // Three epochs, interrupted in the second or third: a tiny epoch takes about a
    // second, so an interruption aimed at the last epoch could land after its last step.
    let straight = tmpdir("straight");
    train_tiny(&straight, "3");
    let cut = tmpdir("cut");
    // Run one epoch so that a checkpoint exists, then interrupt the rest mid-way.
    train_tiny(&cut, "1");
    let child = bin()
        .args([
            "train",
            "--run-dir",
            cut.to_str().unwrap(),
            "--resume",
            "--epochs",
            "3",
            "--quiet",
            "--device",
            "cpu",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let before = steps_logged(&cut);
    while steps_logged(&cut) < before + 5 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("--resume"),
        "the message says how to resume: {err}"
    );
    let resumed = bin()
        .args([
            "train",
            "--run-dir",
            cut.to_str().unwrap(),
            "--resume",
            "--quiet",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_ok(&resumed);
    // The resume is recorded at the step the interruption saved.
    let marks: Vec<serde_json::Value> = std::fs::read_to_string(cut.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "interrupt" || v["kind"] == "resume")
        .collect();
    let kinds: Vec<&str> = marks.iter().map(|v| v["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["resume", "interrupt", "resume"], "{marks:?}");
    for k in ["epoch", "batch", "step"] {
        assert_eq!(marks[1][k], marks[2][k], "{k}: {marks:?}");
    }
    // The epoch records agree too: the interrupted epoch's counters and training ELBO are
    // carried through the checkpoint, not restarted at the resume.
    let epochs = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["kind"] == "epoch")
            .collect()
    };
    let (es, ec) = (epochs(&straight), epochs(&cut));
    assert_eq!(es.len(), 3);
    assert_eq!(ec.len(), 3);
    let counters = ["not_stationary", "cg_fallbacks", "svi_resets", "train_elbo"];
    assert!(
        es.iter().any(|e| e["not_stationary"].as_u64().unwrap() > 0),
        "the tiny run should have non-stationary examples, or this check is empty: {es:?}"
    );
    for (s, c) in es.iter().zip(&ec) {
        for k in counters {
            assert_eq!(s[k], c[k], "epoch {}: {k}", s["epoch"]);
        }
    }
    assert_same_weights(&straight, &cut, "an interrupted and resumed run");
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&cut);
}

#[test]
fn sigkill_at_random_moments_always_leaves_a_loadable_checkpoint() {
    let dir = tmpdir("kill");
    train_tiny(&dir, "1");
    let mut epochs = 1;
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for round in 0..20 {
        epochs += 1;
        let e = epochs.to_string();
        let mut child = bin()
            .args([
                "train",
                "--run-dir",
                dir.to_str().unwrap(),
                "--resume",
                "--epochs",
                &e,
                "--quiet",
                "--device",
                "cpu",
            ])
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(300 + seed % 1500));
        let _ = child.kill();
        let _ = child.wait();
        // Whatever moment it died at, the checkpoint loads and evaluates.
        let ck = dir.join("last.safetensors");
        let out = bin()
            .args([
                "eval",
                "--checkpoint",
                ck.to_str().unwrap(),
                "--max-examples",
                "10",
                "--iw-samples",
                "2",
                "--svi-steps",
                "1",
                "--quiet",
                "--device",
                "cpu",
                "--split",
                "valid",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: checkpoint unloadable: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert!(
            leftovers.len() <= 4,
            "round {round}: stray files {leftovers:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/park.sh` from the repository root, with `PARKED_DIR` and `SAVAE` set.
fn park(args: &[&str], parked: &Path) -> std::process::Output {
    park_with(args, parked, &[])
}

/// `park` with more environment variables.
fn park_with(args: &[&str], parked: &Path, env: &[(&str, &str)]) -> std::process::Output {
    Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/park.sh"
        ))
        .args(args)
        .env("PARKED_DIR", parked)
        .env("SAVAE", env!("CARGO_BIN_EXE_savae"))
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn a_parked_run_resumes_bit_identically_on_a_fresh_runs_folder() {
    // A session parks its unfinished run in the repository (park.sh save), the next one
    // gets a machine without runs/ and restores it: the resumed run must be the straight one.
    let straight = tmpdir("park-straight");
    train_tiny(&straight, "2");
    let runs = tmpdir("park-runs");
    let parked = tmpdir("park-parked").join("parked");
    let run = runs.join("tiny");
    train_tiny(&run, "1");
    let last_written = std::fs::read(run.join("last.safetensors")).unwrap();
    // A finished run (test.json written) is not parked.
    std::fs::create_dir_all(runs.join("done")).unwrap();
    std::fs::copy(
        run.join("last.safetensors"),
        runs.join("done/last.safetensors"),
    )
    .unwrap();
    std::fs::write(runs.join("done/test.json"), "{}").unwrap();
    // A run whose best epoch is not where it stopped (here another run's best): its best
    // is parked as a file of its own.
    let other = runs.join("other");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["last.safetensors", "metrics.jsonl"] {
        std::fs::copy(run.join(f), other.join(f)).unwrap();
    }
    std::fs::copy(
        straight.join("best.safetensors"),
        other.join("best.safetensors"),
    )
    .unwrap();
    // A park in the first layout (files straight in parked/tiny/), older than any save.
    let first_layout = parked.join("tiny");
    std::fs::create_dir_all(&first_layout).unwrap();
    for f in ["last.safetensors", "metrics.jsonl"] {
        std::fs::copy(straight.join(f), first_layout.join(f)).unwrap();
    }

    // A run over PARK_MAX_MIB stays where it is (a tiny run is under 1 MiB, so 0 refuses it).
    let capped = park_with(
        &["save", runs.to_str().unwrap()],
        &parked,
        &[("PARK_MAX_MIB", "0")],
    );
    let log = String::from_utf8_lossy(&capped.stdout).to_string()
        + &String::from_utf8_lossy(&capped.stderr);
    assert!(capped.status.success(), "{log}");
    assert!(log.contains("0 run(s) parked"), "{log}");
    assert!(log.contains("over PARK_MAX_MIB"), "{log}");
    assert!(!parked.join("other").exists(), "parked over the cap: {log}");
    assert!(run.join("last.safetensors").is_file(), "{log}");

    let saved = park(&["save", runs.to_str().unwrap()], &parked);
    let log = String::from_utf8_lossy(&saved.stdout).to_string()
        + &String::from_utf8_lossy(&saved.stderr);
    assert!(saved.status.success(), "{log}");
    assert!(log.contains("2 run(s) parked"), "{log}");
    assert!(
        !parked.join("done").exists(),
        "a finished run was parked: {log}"
    );
    // The older park is kept (a removal counts in a submission's size), and said so.
    assert!(log.contains("older parks, kept"), "{log}");
    assert!(first_layout.join("last.safetensors").is_file(), "{log}");
    let generation = |name: &str| -> std::path::PathBuf {
        let mut g: Vec<_> = std::fs::read_dir(parked.join(name))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(g.len(), 1, "{name}: parks {g:?}: {log}");
        g.pop().unwrap()
    };
    let p = generation("tiny");
    assert!(
        p.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("step-0"),
        "{p:?}"
    );
    // It stopped at the end of an epoch that improved: best is last's export, not a file.
    for f in ["last.safetensors.pk", "metrics.jsonl", "best-is-last"] {
        assert!(p.join(f).is_file(), "{f} not parked: {log}");
    }
    assert!(!p.join("best.safetensors.pk").exists(), "{log}");
    let q = generation("other");
    assert!(q.join("best.safetensors.pk").is_file(), "{log}");
    assert!(!q.join("best-is-last").exists(), "{log}");
    // Packing shrinks the file (f32 bytes in lanes, deflated).
    let packed = std::fs::metadata(p.join("last.safetensors.pk"))
        .unwrap()
        .len();
    assert!(packed < last_written.len() as u64, "{packed} bytes packed");
    // Saving again at the same position adds nothing.
    let again = park(&["save", runs.to_str().unwrap()], &parked);
    assert!(String::from_utf8_lossy(&again.stdout).contains("at this position already"));

    // The fresh machine: no run folder at all. restore takes the newest park.
    std::fs::remove_dir_all(&runs).unwrap();
    let restored = park(&["restore", "tiny", runs.to_str().unwrap()], &parked);
    assert_ok(&restored);
    assert!(
        std::fs::read(run.join("last.safetensors")).unwrap() == last_written,
        "the restored last.safetensors is not the one written"
    );
    // best without Adam's moments, the weights of last: what an export writes.
    let weights = |f: &Path| -> Vec<(String, Vec<u8>)> {
        tensors(f)
            .into_iter()
            .filter(|(n, _)| !n.starts_with("optim."))
            .collect()
    };
    let best = tensors(&run.join("best.safetensors"));
    assert!(!best.iter().any(|(n, _)| n.starts_with("optim.")));
    assert!(best == weights(&run.join("last.safetensors")));
    let restored_other = park(&["restore", "other", runs.to_str().unwrap()], &parked);
    assert_ok(&restored_other);
    assert!(
        tensors(&other.join("best.safetensors")) == weights(&straight.join("best.safetensors"))
    );
    // A second restore leaves the run it finds alone.
    let again = park(&["restore", "tiny", runs.to_str().unwrap()], &parked);
    assert!(String::from_utf8_lossy(&again.stdout).contains("left as it is"));
    let missing = park(&["restore", "nosuch", runs.to_str().unwrap()], &parked);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nosuch"));
    // prune keeps the newest park only.
    assert_ok(&park(&["prune", "tiny"], &parked));
    assert!(!first_layout.join("last.safetensors").exists());
    assert!(p.join("last.safetensors.pk").is_file());

    let resumed = bin()
        .args([
            "train",
            "--run-dir",
            run.to_str().unwrap(),
            "--resume",
            "--epochs",
            "2",
            "--quiet",
            "--device",
            "cpu",
        ])
        .output()
        .unwrap();
    assert_ok(&resumed);
    assert_same_weights(&straight, &run, "parking and resuming");
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&runs);
    let _ = std::fs::remove_dir_all(parked.parent().unwrap());
}

#[test]
fn epoch_snapshots_hold_the_epoch_end_and_park_while_the_run_trains() {
    // scripts/snapshot-epochs.sh copies a training run aside at each epoch's end, so that a
    // session can park it there without stopping it.
    let root = tmpdir("snapshots");
    let run = root.join("runs/tiny");
    let snap = root.join("snap");
    train_tiny(&run, "1");
    let last_written = std::fs::read(run.join("last.safetensors")).unwrap();
    // The next epoch has begun: its step lines follow the epoch line.
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    std::fs::write(
        run.join("metrics.jsonl"),
        format!("{metrics}{{\"kind\":\"step\",\"epoch\":2,\"step\":41}}\n"),
    )
    .unwrap();
    /// Kills the watcher however the test ends.
    struct Watcher(std::process::Child);
    impl Drop for Watcher {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut watcher = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/snapshot-epochs.sh"
        ))
        .args([run.to_str().unwrap(), snap.to_str().unwrap(), "0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Watcher)
        .unwrap();
    let at = snap.join("epoch-1/tiny");
    let started = Instant::now();
    let missed = snap.join("epoch-1/MISSED");
    while !at.exists() && !missed.exists() && started.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        at.exists(),
        "no snapshot of epoch 1: {:?}",
        std::fs::read_to_string(&missed)
    );
    assert!(std::fs::read(at.join("last.safetensors")).unwrap() == last_written);
    assert!(at.join("best.safetensors").is_file());
    let kept = std::fs::read_to_string(at.join("metrics.jsonl")).unwrap();
    assert_eq!(
        kept, metrics,
        "the snapshot's metrics are not those of epoch 1's end"
    );

    // park.sh refuses a folder that a savae train writes, whatever the binary is called.
    let fake = root.join("bin/savae-bin-0123abc");
    std::fs::create_dir_all(fake.parent().unwrap()).unwrap();
    // Short sleeps in a loop: killing the shell leaves no long-lived child behind.
    std::fs::write(&fake, "#!/bin/sh\nwhile :; do sleep 0.1; done\n").unwrap();
    let mut writer = Command::new("sh")
        .arg(&fake)
        .args(["train", "--run-dir", at.to_str().unwrap(), "--resume"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let parked = root.join("parked");
    let epoch_dir = snap.join("epoch-1");
    let refused = park(&["save", epoch_dir.to_str().unwrap()], &parked);
    let _ = writer.kill();
    let _ = writer.wait();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("still writing"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let saved = park(&["save", epoch_dir.to_str().unwrap()], &parked);
    assert_ok(&saved);
    let p = parked.join("tiny/step-000000040");
    assert!(p.join("best-is-last").is_file(), "{p:?}");
    assert_eq!(
        std::fs::read_to_string(p.join("metrics.jsonl")).unwrap(),
        metrics
    );

    // The watcher stops once the run has its test.json.
    std::fs::write(run.join("test.json"), "{}").unwrap();
    let started = Instant::now();
    let mut status = None;
    while status.is_none() && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        status = watcher.0.try_wait().unwrap();
    }
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let mut said = String::new();
    std::io::Read::read_to_string(watcher.0.stdout.as_mut().unwrap(), &mut said).unwrap();
    assert!(said.contains("test.json written; done"), "{said}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Fails the run at one step, as a process killed without warning would stop: nothing is
/// saved at that moment.
struct KilledAtStep(u64);

impl savae_train::Observer for KilledAtStep {
    fn on_step(&mut self, r: &savae_train::trainer::StepRecord) -> anyhow::Result<()> {
        if r.step == self.0 {
            anyhow::bail!("killed at step {}", r.step);
        }
        Ok(())
    }
}

#[test]
fn a_run_killed_between_periodic_saves_resumes_from_the_last_one_bit_identically() {
    use savae_train::options::{GradientKind, ModelKind};
    use savae_train::{RunOptions, Silent, TrainConfig, Trainer};
    savae_implicit::enable_second_order();
    let data: std::path::PathBuf = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data").into();
    // 200 examples in batches of 50: steps 1–4 are epoch 1, steps 5–8 epoch 2.
    let cfg = TrainConfig {
        model: ModelKind::Savae,
        grad: GradientKind::Implicit,
        epochs: 2,
        batch_size: 50,
        hidden: vec![16],
        latent_dim: 3,
        svi_steps: 3,
        max_train_examples: Some(200),
        valid_examples: Some(50),
        ..TrainConfig::defaults_for("mnist")
    };
    let opts = |d: &Path| RunOptions::new(d.to_path_buf(), data.clone(), candle_core::Device::Cpu);
    let straight = tmpdir("straight-lib");
    Trainer::create(cfg.clone(), opts(&straight), true)
        .unwrap()
        .run(&mut Silent)
        .unwrap();
    let killed = tmpdir("killed-lib");
    let every_batch = RunOptions {
        save_every: Some(Duration::ZERO),
        ..opts(&killed)
    };
    let err = Trainer::create(cfg, every_batch, true)
        .unwrap()
        .run(&mut KilledAtStep(7))
        .expect_err("the observer stops the run");
    assert!(err.to_string().contains("killed at step 7"), "{err}");
    // Saved before epoch 2's third batch (step 6); step 7 is lost and taken again. With
    // saves at epoch ends only, the run would resume at epoch 2's start (step 4).
    let mut resumed = Trainer::resume(opts(&killed), &[]).unwrap();
    let s = resumed.state();
    assert_eq!((s.epoch, s.batch, s.step), (1, 2, 6));
    let summary = resumed.run(&mut Silent).unwrap();
    assert_eq!((summary.epochs_done, summary.steps), (2, 8));
    assert_same_weights(&straight, &killed, "a kill and a resume");
    let _ = std::fs::remove_dir_all(&straight);
    let _ = std::fs::remove_dir_all(&killed);
}

#[test]
fn a_killed_evaluation_continues_from_its_progress_file_with_the_same_numbers() {
    let dir = tmpdir("eval-progress");
    let progress = dir.join("test.progress");
    let ck = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../checkpoints/mnist-vae.safetensors"
    );
    let args = |seed: &str| -> Vec<String> {
        [
            "eval",
            "--checkpoint",
            ck,
            "--max-examples",
            "400",
            "--iw-samples",
            "100",
            "--batch-size",
            "20",
            "--quiet",
            "--device",
            "cpu",
            "--seed",
            seed,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let with_file = |seed: &str| -> Vec<String> {
        let mut a = args(seed);
        a.extend(["--progress-file".into(), progress.display().to_string()]);
        a.extend(["--save-every".into(), "0".into()]);
        a
    };
    let straight = bin().args(args("7")).output().unwrap();
    assert_ok(&straight);
    let mut child = bin()
        .args(with_file("7"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !progress.exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(progress.exists(), "the evaluation wrote no progress file");
    // Another evaluation (here another seed) refuses the file, naming it.
    let other = bin().args(with_file("8")).output().unwrap();
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(!other.status.success());
    assert!(
        err.contains("test.progress") && err.contains("another evaluation"),
        "{err}"
    );
    let resumed = bin().args(with_file("7")).output().unwrap();
    assert_ok(&resumed);
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        err.contains("continued from") && !err.contains("after 20 of 20"),
        "the second run should continue the first: {err}"
    );
    assert_eq!(
        String::from_utf8_lossy(&straight.stdout),
        String::from_utf8_lossy(&resumed.stdout),
        "a continued evaluation reports what a straight one does"
    );
    assert!(!progress.exists(), "the progress file is removed once done");
    let _ = std::fs::remove_dir_all(&dir);
}

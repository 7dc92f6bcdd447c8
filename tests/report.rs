//! `savae report` writes readable pictures and a summary whose numbers are `savae eval`'s.

mod common;
use common::savae_ok as savae;

#[test]
fn report_draws_the_run_and_agrees_with_eval() {
    let d = std::env::temp_dir().join(format!("savae-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let ds = d.to_str().unwrap();
    savae(&[
        "train",
        "--run-dir",
        ds,
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
        "4",
        "--batch-size",
        "50",
        "--svi-steps",
        "3",
        "--cg-iters",
        "3",
        "--epochs",
        "2",
        "--log-every",
        "1",
        "--model",
        "savae",
    ]);
    savae(&[
        "report",
        ds,
        "--device",
        "cpu",
        "--quiet",
        "--max-examples",
        "60",
        "--iw-samples",
        "10",
        "--split",
        "valid",
    ]);
    let rep = d.join("report");
    for (f, w, h) in [
        ("curves_elbo.png", 900, 540),
        ("curves_kl_beta.png", 900, 540),
        ("curves_cg.png", 900, 540),
        ("curves_svi.png", 900, 540),
        ("curves_speed.png", 900, 540),
        ("amortization_gap.png", 900, 540),
        ("reconstructions.png", 1080, 340),
        ("samples.png", 740, 790),
        ("traversal.png", 990, 430),
    ] {
        let img =
            image::open(rep.join(f)).unwrap_or_else(|e| panic!("{f} is not a valid image: {e}"));
        assert_eq!(
            (img.width(), img.height()),
            (w, h),
            "{f} has an unexpected size"
        );
        let px = img.to_luma8();
        let dark = px.pixels().filter(|p| p.0[0] < 128).count();
        assert!(dark > 500, "{f} looks empty ({dark} dark pixels)");
    }
    let summary = std::fs::read_to_string(rep.join("summary.md")).unwrap();
    let json = summary
        .split("```json\n")
        .nth(1)
        .unwrap()
        .split("\n```")
        .next()
        .unwrap();
    let from_report: serde_json::Value = serde_json::from_str(json).unwrap();
    let eval = savae(&[
        "eval",
        "--checkpoint",
        d.join("best.safetensors").to_str().unwrap(),
        "--split",
        "valid",
        "--iw-samples",
        "10",
        "--max-examples",
        "60",
        "--elbo-samples",
        "10",
        "--seed",
        "1234",
        "--device",
        "cpu",
        "--quiet",
    ]);
    let from_eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(
        from_report, from_eval,
        "the summary's numbers differ from savae eval's"
    );
    assert!(summary.contains(&format!(
        "{:.4}",
        from_eval["elbo_refined"].as_f64().unwrap()
    )));
    let _ = std::fs::remove_dir_all(&d);
}

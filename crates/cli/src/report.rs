//! `savae report RUN_DIR`: the pictures and the summary a researcher looks at after a run.
//!
//! Writes into `RUN_DIR/report/` (or `--out`): training curves from `metrics.jsonl`
//! (`curves_elbo.png`, `curves_kl_beta.png`, `curves_cg.png`, `curves_svi.png`,
//! `curves_speed.png`), MNIST grids (`reconstructions.png`: input, amortized and refined
//! reconstructions; `samples.png` from the prior; `traversal.png` along the most active
//! latent dimensions), `amortization_gap.png` (histogram of per-example
//! ELBO(refined) − ELBO(amortized) on the evaluated split) and `summary.md`, whose numbers
//! are those `savae eval` prints for the same checkpoint and options.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use plotters::prelude::*;
use plotters::style::FontStyle;
use savae_train::eval::{evaluate_checkpoint, EvalRequest, Evaluated, Subset, SubsetOrder};
use serde_json::Value;
use std::path::{Path, PathBuf};

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// A run folder written by `savae train` (uses best.safetensors and metrics.jsonl).
    pub run_dir: Option<PathBuf>,
    /// Report on this checkpoint instead (curves only if its folder has metrics.jsonl).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Output folder [default: RUN_DIR/report; with --checkpoint DIR/NAME.safetensors:
    /// DIR/NAME-report].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// valid | test (| train): the split the reconstructions, gap and samples come from.
    #[arg(long, default_value = "valid", value_parser = crate::flags::parse_split)]
    pub split: savae_data::Split,
    /// Importance samples of the NLL in the summary (0 skips it).
    #[arg(long, default_value_t = 100)]
    pub iw_samples: usize,
    /// Examples of the split evaluated: a random sample drawn with --seed.
    #[arg(long, default_value_t = 1000)]
    pub max_examples: usize,
    /// SVI refinement steps (default: the checkpoint's).
    #[arg(long)]
    pub svi_steps: Option<usize>,
    /// Noise draws for the reported ELBOs.
    #[arg(long, default_value_t = 10)]
    pub elbo_samples: usize,
    /// Seed of the examples drawn, the refinement's draws and the samples.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[command(flatten)]
    pub machine: crate::flags::Machine,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok()
    });
    if !ok {
        bail!("cannot load the bundled font");
    }
    Ok(())
}

fn perr<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e:?}")
}

/// One named series of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Series with identical points drawn as one line whose legend names them all
/// ("a = b"), so that none hides another.
fn merge_equal(series: &[Series]) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for s in series.iter().filter(|s| !s.points.is_empty()) {
        match out.iter_mut().find(|o| o.points == s.points) {
            Some(o) => o.name = format!("{} = {}", o.name, s.name),
            None => out.push(Series {
                name: s.name.clone(),
                points: s.points.clone(),
            }),
        }
    }
    out
}

/// An axis tick: integers without a decimal point (epoch 2, not 2.0).
fn tick(v: &f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A line chart with title, axis labels and a legend, 900×540 pixels. Series with equal
/// points share one line and one legend entry.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let series = &merge_equal(series)[..];
    let pts: Vec<&(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0).abs() * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(perr)?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(p.clone(), color.stroke_width(2)))
            .map_err(perr)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        if p.len() <= 60 {
            chart
                .draw_series(
                    p.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(perr)?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(perr)?;
    root.present().map_err(perr)?;
    Ok(())
}

/// A histogram of `values` with `bins` bins, 900×540 pixels.
pub fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    values: &[f64],
    bins: usize,
) -> Result<()> {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Ok(());
    }
    let lo = v.iter().copied().fold(f64::MAX, f64::min);
    let mut hi = v.iter().copied().fold(f64::MIN, f64::max);
    if hi <= lo {
        hi = lo + 1.0;
    }
    let w = (hi - lo) / bins as f64;
    let mut counts = vec![0usize; bins];
    for x in &v {
        counts[(((x - lo) / w) as usize).min(bins - 1)] += 1;
    }
    let cmax = *counts.iter().max().unwrap_or(&1);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(lo..hi, 0usize..(cmax + cmax / 10 + 1))
        .map_err(perr)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("examples")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(perr)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x = lo + i as f64 * w;
            Rectangle::new([(x, 0), (x + w, c)], BLUE.mix(0.6).filled())
        }))
        .map_err(perr)?;
    root.present().map_err(perr)?;
    Ok(())
}

/// A titled grid of 28×28 images in [0, 1]: `rows[r][c]` is 784 values; each row has a label.
pub fn image_grid(
    path: &Path,
    title: &str,
    row_labels: &[String],
    rows: &[Vec<Vec<f32>>],
) -> Result<()> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let cell = 3i32; // pixels per image pixel
    let img = 28 * cell + 6;
    let label_w = if row_labels.iter().any(|l| !l.is_empty()) {
        170
    } else {
        10
    };
    let (w, h) = (
        (label_w + cols as i32 * img + 10) as u32,
        (60 + rows.len() as i32 * img + 10) as u32,
    );
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(perr)?;
    root.draw(&Text::new(
        title.to_string(),
        (10, 15),
        ("sans-serif", 24).into_font(),
    ))
    .map_err(perr)?;
    for (r, row) in rows.iter().enumerate() {
        let y0 = 55 + r as i32 * img;
        if let Some(l) = row_labels.get(r) {
            root.draw(&Text::new(
                l.clone(),
                (8, y0 + img / 2 - 8),
                ("sans-serif", 17).into_font(),
            ))
            .map_err(perr)?;
        }
        for (c, im) in row.iter().enumerate() {
            let x0 = label_w + c as i32 * img;
            for (p, &v) in im.iter().enumerate() {
                let g = (255.0 * (1.0 - v.clamp(0.0, 1.0))) as u8;
                let (px, py) = (x0 + (p % 28) as i32 * cell, y0 + (p / 28) as i32 * cell);
                root.draw(&Rectangle::new(
                    [(px, py), (px + cell, py + cell)],
                    RGBColor(g, g, g).filled(),
                ))
                .map_err(perr)?;
            }
        }
    }
    root.present().map_err(perr)?;
    Ok(())
}

fn read_metrics(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(current_records(
        text.lines().filter_map(|l| serde_json::from_str(l).ok()),
    ))
}

/// The records of the run as it stands. A process killed between saves logged steps
/// past its last checkpoint; the process that resumed from that checkpoint (a `resume`
/// record at step S) takes them again, so the records before it with a step after S are
/// dropped.
pub fn current_records(lines: impl IntoIterator<Item = Value>) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for v in lines {
        if v["kind"] == "resume" {
            if let Some(s) = v["step"].as_u64() {
                out.retain(|r| r["step"].as_u64().is_none_or(|t| t <= s));
            }
        }
        out.push(v);
    }
    out
}

fn series(lines: &[&Value], name: &str, x: &str, y: &[&str]) -> Series {
    let get = |v: &Value, path: &[&str]| -> Option<f64> {
        let mut cur = v;
        for k in path {
            cur = cur.get(*k)?;
        }
        cur.as_f64()
    };
    Series {
        name: name.into(),
        points: lines
            .iter()
            .filter_map(|v| Some((v.get(x)?.as_f64()?, get(v, y)?)))
            .collect(),
    }
}

/// What the curves need to know of the run beyond its metrics.
pub struct RunInfo {
    /// The model refines λ (otherwise its "refined" ELBO is the amortized one).
    pub refines: bool,
    /// The implicit gradient's `--stationarity-tol` (drawn on the SVI chart).
    pub stationarity_tol: Option<f64>,
}

/// Draws the training curves; returns the files written.
pub fn curves(metrics: &[Value], out: &Path, run: &RunInfo) -> Result<Vec<String>> {
    let epochs: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "epoch").collect();
    let steps: Vec<&Value> = metrics.iter().filter(|v| v["kind"] == "step").collect();
    let mut files = Vec::new();
    let mut draw = |file: &str, title: &str, x: &str, y: &str, s: Vec<Series>| -> Result<()> {
        if s.iter().any(|s| !s.points.is_empty()) {
            line_chart(&out.join(file), title, x, y, &s)?;
            files.push(file.to_string());
        }
        Ok(())
    };
    draw(
        "curves_elbo.png",
        "ELBO per epoch",
        "epoch",
        "ELBO (nats per example)",
        vec![
            series(
                &epochs,
                "train (β-weighted, loss)",
                "epoch",
                &["train_elbo"],
            ),
            series(
                &epochs,
                "valid, amortized λ0",
                "epoch",
                &["valid_elbo_amortized"],
            ),
            if run.refines {
                series(
                    &epochs,
                    "valid, refined λ*",
                    "epoch",
                    &["valid_elbo_refined"],
                )
            } else {
                Series::empty()
            },
        ],
    )?;
    draw(
        "curves_kl_beta.png",
        "KL and KL weight β per logged step",
        "step",
        "nats (KL) / weight (β)",
        vec![
            series(&steps, "KL (train batch)", "step", &["kl"]),
            series(&steps, "β × 10", "step", &["beta"]).scaled(10.0),
        ],
    )?;
    draw(
        "curves_cg.png",
        "Adjoint CG per logged step",
        "step",
        "iterations / examples",
        vec![
            series(&steps, "mean CG iterations", "step", &["cg", "iters_mean"]),
            series(
                &steps,
                "negative curvature (examples)",
                "step",
                &["cg", "negative_curvature"],
            ),
            series(
                &steps,
                "steepest-descent fallbacks (examples)",
                "step",
                &["cg", "fallbacks"],
            ),
        ],
    )?;
    let mut svi = vec![
        series(
            &steps,
            "max over batch",
            "step",
            &["svi", "final_grad_norm_max"],
        ),
        series(
            &steps,
            "mean over batch",
            "step",
            &["svi", "final_grad_norm_mean"],
        ),
    ];
    if let Some(tol) = run.stationarity_tol {
        let steps = &svi[0].points;
        if let (Some(&(a, _)), Some(&(b, _))) = (steps.first(), steps.last()) {
            svi.push(Series {
                name: format!(
                    "--stationarity-tol {} (above: identity fallback)",
                    tick(&tol)
                ),
                points: vec![(a, tol), (b, tol)],
            });
        }
    }
    draw(
        "curves_svi.png",
        "SVI stationarity at λ_K per logged step",
        "step",
        "‖∇F(λ_K)‖",
        svi,
    )?;
    draw(
        "curves_speed.png",
        "Training speed per logged step",
        "step",
        "examples / s",
        vec![series(&steps, "examples/s", "step", &["examples_per_s"])],
    )?;
    Ok(files)
}

impl Series {
    fn empty() -> Self {
        Self {
            name: String::new(),
            points: Vec::new(),
        }
    }
    fn scaled(mut self, k: f64) -> Self {
        self.points.iter_mut().for_each(|p| p.1 *= k);
        self
    }
}

fn probs(decoder: &savae_model::Decoder, z: &Tensor) -> Result<Vec<Vec<f32>>> {
    let p = candle_nn::ops::sigmoid(&decoder.as_mlp()?.forward(z)?)?;
    Ok(p.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}

fn mnist_pictures(e: &Evaluated, out: &Path, device: &Device) -> Result<Vec<String>> {
    let model = &e.model;
    let dtype = model.dtype();
    let d = model.latent_dim();
    let savae_train::batch::SplitData::Images(split) = &e.split else {
        return Ok(Vec::new());
    };
    let n = split.len;
    let picks: Vec<usize> = (0..10.min(n)).map(|i| i * n / 10.min(n)).collect();
    let mut rng = savae_data::Stream::ReportReconstructions.rng(e.options.seed, 0, 0);
    let x = savae_train::batch::images(split, &picks, &mut rng, dtype, device)?;
    let inputs: Vec<Vec<f32>> = x.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let lam0 = model.encode(&savae_model::Batch::Images(x.clone()))?;
    let mu0 = lam0.mu()?;
    let mu_ref = Tensor::from_vec(
        picks
            .iter()
            .flat_map(|&i| e.report.refined_means[i].iter().map(|&v| v as f32))
            .collect::<Vec<f32>>(),
        (picks.len(), d),
        device,
    )?
    .to_dtype(dtype)?;
    let rows = vec![
        inputs,
        probs(&model.decoder, &mu0)?,
        probs(&model.decoder, &mu_ref)?,
    ];
    let labels = vec![
        "input".to_string(),
        "amortized λ0".into(),
        format!("refined ({} SVI)", e.options.svi.steps),
    ];
    image_grid(
        &out.join("reconstructions.png"),
        "Reconstructions (decoder mean at the posterior mean)",
        &labels,
        &rows,
    )?;
    // Samples from the prior.
    let mut r2 = savae_data::Stream::ReportPrior.rng(e.options.seed, 0, 0);
    let z = savae_train::batch::noise(&mut r2, 1, 64, d, dtype, device)?
        .0
        .squeeze(0)?;
    let s = probs(&model.decoder, &z)?;
    let grid: Vec<Vec<Vec<f32>>> = s.chunks(8).map(|c| c.to_vec()).collect();
    image_grid(
        &out.join("samples.png"),
        "Samples from the prior (decoder mean, z ~ N(0, I))",
        &[],
        &grid,
    )?;
    // Traversal along the most active dimensions (variance of the refined means).
    let means = &e.report.refined_means;
    let m = means.len().max(1) as f64;
    let mut var: Vec<(usize, f64)> = (0..d)
        .map(|j| {
            let mu = means.iter().map(|r| r[j]).sum::<f64>() / m;
            (
                j,
                means.iter().map(|r| (r[j] - mu).powi(2)).sum::<f64>() / m,
            )
        })
        .collect();
    var.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for &(j, v) in var.iter().take(6) {
        let mut zs = vec![0f32; 9 * d];
        for (k, t) in (-4..=4).enumerate() {
            zs[k * d + j] = t as f32 * 0.75;
        }
        let z = Tensor::from_vec(zs, (9, d), device)?.to_dtype(dtype)?;
        rows.push(probs(&model.decoder, &z)?);
        labels.push(format!("z[{j}], activity {v:.2}"));
    }
    image_grid(
        &out.join("traversal.png"),
        "Latent traversal: z_j from −3 to 3 (others 0); activity = Var_x E_q[z_j]",
        &labels,
        &rows,
    )?;
    Ok(vec![
        "reconstructions.png".into(),
        "samples.png".into(),
        "traversal.png".into(),
    ])
}

/// Text models: `samples.txt` with sentences from the prior (greedy and sampled) and
/// greedy reconstructions of ten sentences of the split at their refined posterior means.
fn text_samples(e: &Evaluated, out: &Path, device: &Device) -> Result<Vec<String>> {
    use crate::sample::{decode, Decoding};
    let (Some(vocab), savae_train::batch::SplitData::Text(split)) = (&e.vocab, &e.split) else {
        return Ok(Vec::new());
    };
    let model = &e.model;
    let dec = model.decoder.detached();
    let dec = dec.as_lstm()?;
    let latent = model.config.has_latent();
    let mut rng = savae_data::Stream::ReportSentences.rng(e.options.seed, 0, 0);
    let mut text = String::new();
    for (name, how) in [
        ("greedy", Decoding::Greedy),
        ("sampled", Decoding::Sample { temperature: 1.0 }),
    ] {
        let z = if latent {
            Some(
                savae_train::batch::noise(
                    &mut rng,
                    1,
                    8,
                    model.latent_dim(),
                    model.dtype(),
                    device,
                )?
                .0
                .squeeze(0)?,
            )
        } else {
            None
        };
        text.push_str(&format!("# from the prior, {name}\n"));
        for s in decode(dec, z.as_ref(), 8, how, 40, &mut rng, device)? {
            text.push_str(&format!("- {}\n", vocab.decode(&s)));
        }
        text.push('\n');
    }
    // Reconstructions: the refined means are in evaluation order (grouped by length).
    let order: Vec<usize> = split.eval_batches(e.options.batch_size).concat();
    let n = order.len();
    if latent && n > 0 {
        let picks: Vec<usize> = (0..10.min(n)).map(|i| i * n / 10.min(n)).collect();
        let d = model.latent_dim();
        let mus: Vec<f32> = picks
            .iter()
            .flat_map(|&p| e.report.refined_means[p].iter().map(|&v| v as f32))
            .collect();
        let z = Tensor::from_vec(mus, (picks.len(), d), device)?.to_dtype(model.dtype())?;
        let recon = decode(
            dec,
            Some(&z),
            picks.len(),
            Decoding::Greedy,
            40,
            &mut rng,
            device,
        )?;
        text.push_str("# reconstructions (greedy, at the refined posterior mean)\n");
        for (p, r) in picks.iter().zip(recon) {
            text.push_str(&format!(
                "input: {}\noutput: {}\n\n",
                vocab.decode(&split.sentences[order[*p]]),
                vocab.decode(&r)
            ));
        }
    }
    std::fs::write(out.join("samples.txt"), text)
        .with_context(|| format!("cannot write {}", out.join("samples.txt").display()))?;
    Ok(vec!["samples.txt".into()])
}

pub fn run(a: ReportArgs) -> Result<()> {
    register_font()?;
    if let Some(r) = &a.run_dir {
        if !r.is_dir() {
            bail!("run folder {} does not exist", r.display());
        }
    }
    if let Some(c) = &a.checkpoint {
        if !c.is_file() {
            bail!("--checkpoint {}: no such file", c.display());
        }
    }
    let (ck, run_dir) = match (&a.checkpoint, &a.run_dir) {
        (Some(c), _) => (
            c.clone(),
            a.run_dir
                .clone()
                .or_else(|| c.parent().map(Path::to_path_buf)),
        ),
        (None, Some(r)) => {
            let best = r.join("best.safetensors");
            (
                if best.exists() {
                    best
                } else {
                    r.join("last.safetensors")
                },
                Some(r.clone()),
            )
        }
        (None, None) => bail!("give a RUN_DIR or --checkpoint FILE"),
    };
    // A run's report goes into its folder; a lone checkpoint's next to it, under its own
    // name, so that reports of two checkpoints in one folder do not overwrite each other.
    let out = match (&a.out, &a.checkpoint, &run_dir) {
        (Some(o), _, _) => o.clone(),
        (None, None, Some(r)) => r.join("report"),
        (None, Some(c), _) => {
            let stem = c
                .file_stem()
                .map_or("checkpoint".into(), |s| s.to_string_lossy());
            c.with_file_name(format!("{stem}-report"))
        }
        (None, None, None) => PathBuf::from("report"),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let device = a.machine.device()?;
    let req = EvalRequest {
        checkpoint: ck.clone(),
        split: a.split,
        iw_samples: a.iw_samples,
        svi_steps: a.svi_steps,
        svi_optimizer: None,
        prox: None,
        subset: Subset::new(Some(a.max_examples), SubsetOrder::Random, a.seed),
        elbo_samples: a.elbo_samples,
        refine_samples: None,
        batch_size: None,
        seed: a.seed,
        data_dir: a.machine.data_dir(),
        passes: savae_model::Passes::Analytic,
        progress_file: None,
    };
    let (pb, mut progress) = crate::flags::eval_progress(!a.quiet);
    let e = evaluate_checkpoint(&req, &device, &mut progress)?;
    pb.finish_and_clear();
    let mut files = Vec::new();
    if let Some(m) = run_dir
        .as_ref()
        .map(|r| r.join("metrics.jsonl"))
        .filter(|p| p.exists())
    {
        let cfg = &e.meta.config;
        let run = RunInfo {
            refines: cfg.model.refines(),
            stationarity_tol: (cfg.model == savae_train::options::ModelKind::Savae
                && cfg.grad == savae_train::options::GradientKind::Implicit)
                .then_some(cfg.stationarity_tol),
        };
        files.extend(curves(&read_metrics(&m)?, &out, &run)?);
    }
    files.extend(mnist_pictures(&e, &out, &device)?);
    files.extend(text_samples(&e, &out, &device)?);
    let gap: Vec<f64> = e
        .report
        .per_example_refined
        .iter()
        .zip(&e.report.per_example_amortized)
        .map(|(r, a)| r - a)
        .collect();
    histogram(
        &out.join("amortization_gap.png"),
        &format!(
            "Amortization gap on {} ({} examples)",
            e.report.split, e.report.examples
        ),
        "ELBO(refined) − ELBO(amortized), nats",
        &gap,
        40,
    )?;
    files.push("amortization_gap.png".into());
    let r = &e.report;
    let mean_gap = gap.iter().sum::<f64>() / gap.len().max(1) as f64;
    let cmd = format!(
        "savae eval --checkpoint {} --split {} --iw-samples {} --max-examples {} --elbo-samples {} --seed {}{}",
        ck.display(),
        a.split.name(),
        a.iw_samples,
        a.max_examples,
        a.elbo_samples,
        a.seed,
        a.svi_steps.map(|k| format!(" --svi-steps {k}")).unwrap_or_default()
    );
    let mut md = String::new();
    md.push_str(&format!("# savae report: {}\n\n", ck.display()));
    md.push_str(&format!(
        "Model `{}`{}, latent {}, hidden {:?}, {}; dataset `{}`; epoch {}, step {}.\n\n",
        e.meta.config.model,
        match e.meta.config.model {
            savae_train::options::ModelKind::Savae => format!(" ({} gradient)", e.meta.config.grad),
            _ => String::new(),
        },
        e.meta.model.latent_dim,
        e.meta.model.hidden,
        e.meta.model.activation.name(),
        e.meta.dataset,
        e.meta.epoch,
        e.meta.step
    ));
    md.push_str(&format!(
        "## Evaluation on `{}` ({} examples, nats per example)\n\n",
        r.split, r.examples
    ));
    md.push_str("| quantity | value |\n|---|---|\n");
    md.push_str(&format!(
        "| ELBO, amortized λ0 | {:.4} |\n",
        r.elbo_amortized
    ));
    md.push_str(&format!(
        "| ELBO, refined λ* ({} {} steps) | {:.4} |\n",
        r.svi_steps,
        match r.svi_optimizer {
            "newton" => "Newton",
            "newton-ls" => "line-searched Newton",
            "adam" => "Adam",
            _ => "SGD",
        },
        r.elbo_refined
    ));
    md.push_str(&format!("| mean amortization gap | {mean_gap:.4} |\n"));
    md.push_str(&format!("| KL, refined | {:.4} |\n", r.kl_refined));
    if let Some(n) = r.nll_iw {
        md.push_str(&format!(
            "| NLL, importance sampled ({} samples) | {:.4} |\n",
            r.iw_samples, n
        ));
    }
    md.push_str(&format!(
        "| active units (refined / amortized) | {} / {} |\n\n",
        r.active_units, r.active_units_amortized
    ));
    md.push_str(&format!(
        "The same numbers come from:\n\n```sh\n{cmd}\n```\n\nwhich prints:\n\n```json\n{}\n```\n\n",
        e.json
    ));
    md.push_str("## Pictures\n\n");
    for f in &files {
        md.push_str(&format!("![{f}]({f})\n\n"));
    }
    std::fs::write(out.join("summary.md"), md)
        .with_context(|| format!("cannot write {}", out.join("summary.md").display()))?;
    eprintln!(
        "savae: report written to {} ({} files and summary.md)",
        out.display(),
        files.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_resume_drops_the_steps_logged_after_its_checkpoint() {
        let lines = vec![
            json!({"kind": "step", "step": 100, "loss": 3.0}),
            json!({"kind": "epoch", "epoch": 1, "step": 120}),
            json!({"kind": "step", "step": 200, "loss": 2.0}),
            // Killed here; the last save was at step 150.
            json!({"kind": "resume", "step": 150}),
            json!({"kind": "step", "step": 200, "loss": 2.5}),
            json!({"kind": "interrupt", "step": 230}),
            json!({"kind": "resume", "step": 230}),
        ];
        let kept = current_records(lines.clone());
        let want = [0, 1, 3, 4, 5, 6].map(|i| lines[i].clone());
        assert_eq!(kept, want);
    }
}

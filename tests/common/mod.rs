//! Helpers shared by the integration tests: running the `savae` binary on the shipped data,
//! scratch folders, and reading a checkpoint's tensors.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `savae` with `SAVAE_DATA_DIR` pointing at the repository's data.
pub fn savae_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_savae"));
    c.env(
        "SAVAE_DATA_DIR",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"),
    );
    c
}

/// Runs `savae args` with extra environment variables.
pub fn savae_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = savae_cmd();
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run savae")
}

/// Runs `savae args`, asserting success; returns stdout.
pub fn savae_ok(args: &[&str]) -> String {
    let out = savae_env(args, &[]);
    assert!(
        out.status.success(),
        "savae {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh scratch folder unique to this test process.
pub fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("savae-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A checkpoint's tensors as (name, raw bytes), sorted by name.
pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The SA-VAE implicit gradient of the agreement tests: a tight CG (50 iterations,
/// tolerance 1e-13, 3 retries) and no stationarity cut, with `hvp` products.
pub fn savae_implicit(hvp: savae_implicit::HvpKind) -> savae_train::Mode {
    use savae_train::{ImplicitGradient, Mode, SavaeGradient};
    Mode::Savae {
        gradient: SavaeGradient::Implicit(ImplicitGradient {
            solve: savae_implicit::ShiftedSolve {
                cg: savae_implicit::CgConfig {
                    max_iters: 50,
                    tol: 1e-13,
                    ..Default::default()
                },
                damping: 0.0,
                retries: 3,
            },
            hvp,
            stationarity_tol: f64::INFINITY,
        }),
        encoder_loss: savae_train::options::EncoderLoss::Refined,
    }
}

/// The SA-VAE unrolled gradient (encoder through the refinement).
pub fn savae_unrolled() -> savae_train::Mode {
    savae_train::Mode::Savae {
        gradient: savae_train::SavaeGradient::Unrolled { reverse_clip: None },
        encoder_loss: savae_train::options::EncoderLoss::Refined,
    }
}

/// The step settings of the gradient-agreement tests: SGD refinement (lr 0.5, momentum
/// 0.5, no clip, γ = 2), β = 0.7.
pub fn step_cfg(mode: savae_train::Mode, steps: usize) -> savae_train::StepConfig {
    savae_train::StepConfig {
        mode,
        beta: 0.7,
        svi: savae_inference::SviConfig {
            steps,
            optimizer: savae_inference::SviOptimizer::Sgd {
                lr: 0.5,
                momentum: 0.5,
                clip: 1e9,
            },
            prox: 2.0,
            tol: 0.0,
            batch_size: 1,
        },
        passes: savae_model::Passes::Analytic,
    }
}

/// The SA-VAE parameter gradient three ways on one batch (f64): implicit and unrolled
/// through `steps` SGD steps, and central differences (step 1e-5) of the whole pipeline
/// — refine, then the loss — at the entries `entries(len)` of every parameter tensor.
pub struct PipelineGradients {
    /// The loss of the implicit step.
    pub loss: f64,
    /// max_b ‖∇F_b(λ_K)‖ of the implicit step's refinement.
    pub final_grad_norm_max: f64,
    pub implicit: Vec<f64>,
    pub unrolled: Vec<f64>,
    /// The implicit gradient at the differenced entries, and the differences.
    pub implicit_picked: Vec<f64>,
    pub differences: Vec<f64>,
}

impl PipelineGradients {
    /// Asserts that the refinement converged (max ‖∇F‖ < 1e-10) and that the implicit
    /// gradient agrees with the unrolled one and with the differences to `tol` (relative).
    pub fn assert_agree(&self, tol: f64) {
        use savae_cli::gradcheck::rel_err;
        assert!(
            self.final_grad_norm_max < 1e-10,
            "refinement did not converge: {}",
            self.final_grad_norm_max
        );
        let e = rel_err(&self.implicit, &self.unrolled);
        assert!(e < tol, "implicit vs unrolled relative error {e}");
        let e = rel_err(&self.implicit_picked, &self.differences);
        assert!(
            e < tol,
            "implicit vs finite differences relative error {e}: {:?} vs {:?}",
            self.implicit_picked,
            self.differences
        );
    }
}

/// With `outer`, the loss takes its own draws (`train_step_outer`).
pub fn pipeline_gradients(
    model: &savae_model::Vae,
    x: &savae_model::Batch,
    eps: &savae_model::Noise,
    outer: Option<&savae_model::Noise>,
    steps: usize,
    entries: impl Fn(usize) -> Vec<usize>,
) -> PipelineGradients {
    use candle_core::Tensor;
    use savae_implicit::HvpKind;
    use savae_train::step::train_step_outer;
    let flat = |ts: &[Tensor]| -> Vec<f64> {
        ts.iter()
            .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            .collect()
    };
    let cfg = step_cfg(savae_implicit(HvpKind::Exact), steps);
    let imp = train_step_outer(model, x, eps, outer, &cfg).unwrap();
    let unr = train_step_outer(model, x, eps, outer, &step_cfg(savae_unrolled(), steps)).unwrap();
    let implicit = flat(&imp.grads);
    let vars = model.params.vars();
    let (mut differences, mut implicit_picked) = (Vec::new(), Vec::new());
    let h = 1e-5;
    let mut offset = 0;
    for var in &vars {
        let base = flat(std::slice::from_ref(var.as_tensor()));
        for j in entries(base.len()) {
            let at = |d: f64| {
                let mut w = base.clone();
                w[j] += d;
                var.set(&Tensor::from_vec(w, var.shape(), var.device()).unwrap())
                    .unwrap();
                train_step_outer(model, x, eps, outer, &cfg).unwrap().loss
            };
            differences.push((at(h) - at(-h)) / (2.0 * h));
            var.set(&Tensor::from_vec(base.clone(), var.shape(), var.device()).unwrap())
                .unwrap();
            implicit_picked.push(implicit[offset + j]);
        }
        offset += base.len();
    }
    PipelineGradients {
        loss: imp.loss,
        final_grad_norm_max: imp.svi.as_ref().unwrap().final_grad_norm_max,
        unrolled: flat(&unr.grads),
        implicit,
        implicit_picked,
        differences,
    }
}

/// candle autograd's derivatives of the ELBO at `lambda` (the reference for the analytic
/// passes): values and ∇_λ with the decoder detached, H v by double backward, and the
/// mixed product ∇_θ(vᵀ∇_λ f) for every decoder parameter (in `decoder_params` order).
pub struct AutogradReference {
    pub values: candle_core::Tensor,
    pub grad: candle_core::Tensor,
    pub hvp: candle_core::Tensor,
    pub mixed: Vec<candle_core::Tensor>,
    pub names: Vec<String>,
}

pub fn autograd_reference(
    model: &savae_model::Vae,
    batch: &savae_model::Batch,
    eps: &savae_model::Noise,
    beta: f64,
    lambda: &candle_core::Tensor,
    v: &candle_core::Tensor,
) -> AutogradReference {
    use savae_implicit::{value_and_grad, BatchedOperator, ExactHvp};
    use savae_model::{elbo, VariationalParams};
    let at = |dec: &savae_model::Decoder| {
        value_and_grad(
            |l| Ok(elbo(dec, batch, &VariationalParams(l.clone()), eps, beta)?.elbo),
            lambda,
        )
        .unwrap()
    };
    let reference = at(&model.decoder.detached());
    let hvp = ExactHvp {
        lambda: reference.lambda.clone(),
        grad: reference.grad.clone(),
    }
    .apply(v)
    .unwrap();
    let with_params = at(&model.decoder);
    let dp = model.decoder_params();
    let names: Vec<String> = dp.iter().map(|(n, _)| n.to_string()).collect();
    let params: Vec<candle_core::Tensor> = dp.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let refs: Vec<&candle_core::Tensor> = params.iter().collect();
    let mixed = savae_implicit::mixed_product_exact(&with_params, v, &refs).unwrap();
    AutogradReference {
        values: reference.values,
        grad: reference.grad,
        hvp,
        mixed,
        names,
    }
}

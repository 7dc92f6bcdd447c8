//! The SA-VAE parameter gradient by implicit differentiation, by unrolled differentiation
//! and by central finite differences of the whole pipeline agree (f64).

mod common;
use candle_core::{DType, Device, Tensor};
use common::{savae_implicit, savae_unrolled, step_cfg};
use savae_cli::gradcheck::rel_err;
use savae_implicit::HvpKind;
use savae_model::{Batch, ModelConfig, Noise, Vae};
use savae_train::step::{train_step, Mode};

fn setup(act: &str) -> (Vae, Batch, Noise) {
    savae_implicit::enable_second_order();
    let cfg = ModelConfig {
        kind: savae_model::ModelKind::Savae,
        latent_dim: 2,
        hidden: vec![6],
        activation: savae_model::Activation::parse(act).unwrap(),
        input_dim: 12,
        vocab_size: 0,
        embed_dim: 0,
        dropout: 0.0,
    };
    let dev = Device::Cpu;
    let model = Vae::new(&cfg, 3, DType::F64, &dev).unwrap();
    let xs: Vec<f64> = (0..3 * 12)
        .map(|i| ((i * 7 + 3) % 5 < 2) as u8 as f64)
        .collect();
    let x = Tensor::from_vec(xs, (3, 12), &dev).unwrap();
    let e: Vec<f64> = (0..2 * 3 * 2).map(|i| ((i as f64) * 0.77).sin()).collect();
    let eps = Noise(Tensor::from_vec(e, (2, 3, 2), &dev).unwrap());
    (model, Batch::Images(x), eps)
}

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

#[test]
fn implicit_unrolled_and_finite_differences_agree_in_f64() {
    let (model, x, eps) = setup("tanh");
    savae_implicit::ensure_second_order().unwrap();
    common::pipeline_gradients(&model, &x, &eps, None, 400, |n| vec![0, n / 2, n - 1])
        .assert_agree(1e-6);
}

/// The outer loss on draws independent of the refinement's (`--outer-noise fresh`): the
/// Hessian and the mixed term stay with the refinement's draws, g = ∇_λ L moves to the
/// outer ones. Checked against unrolled differentiation and differences of the pipeline.
#[test]
fn implicit_gradient_with_independent_outer_draws_matches_differences() {
    let (model, x, eps) = setup("softplus");
    savae_implicit::ensure_second_order().unwrap();
    let e: Vec<f64> = (0..3 * 3 * 2)
        .map(|i| ((i as f64) * 1.31 + 0.4).cos())
        .collect();
    let outer = Noise(Tensor::from_vec(e, (3, 3, 2), &Device::Cpu).unwrap());
    let same = common::pipeline_gradients(&model, &x, &eps, None, 400, |_| vec![]);
    let g = common::pipeline_gradients(&model, &x, &eps, Some(&outer), 400, |n| {
        vec![0, n / 3, n - 1]
    });
    // The outer draws are used: the loss and the gradient move.
    assert!(
        (g.loss - same.loss).abs() > 1e-3,
        "outer draws ignored: loss {} vs {}",
        g.loss,
        same.loss
    );
    assert!(rel_err(&g.implicit, &same.implicit) > 1e-3);
    g.assert_agree(1e-6);
}

/// `--encoder-loss amortized`: the decoder keeps the implicit gradient of the loss at λ*,
/// and the encoder's gradient is that of its own ELBO at λ0 — the plain VAE's encoder
/// gradient on the same draws (another path, f64), not the one through the refinement.
#[test]
fn amortized_encoder_loss_gives_the_encoder_the_vae_gradient_and_keeps_the_decoders() {
    use savae_train::step::EncoderLoss;
    let (model, x, eps) = setup("softplus");
    savae_implicit::ensure_second_order().unwrap();
    let through = step_cfg(savae_implicit(HvpKind::Exact), 400);
    let own = savae_train::StepConfig {
        mode: match through.mode {
            Mode::Savae { gradient, .. } => Mode::Savae {
                gradient,
                encoder_loss: EncoderLoss::Amortized,
            },
            other => other,
        },
        ..through
    };
    let g_through = train_step(&model, &x, &eps, &through).unwrap().grads;
    let g_own = train_step(&model, &x, &eps, &own).unwrap().grads;
    let g_vae = train_step(&model, &x, &eps, &step_cfg(Mode::Vae, 0))
        .unwrap()
        .grads;
    let part = |g: &[Tensor], prefix: &str| -> Vec<f64> {
        let picked: Vec<Tensor> = model
            .params
            .iter()
            .zip(g)
            .filter(|((n, _), _)| n.starts_with(prefix))
            .map(|(_, t)| t.clone())
            .collect();
        assert!(!picked.is_empty(), "no {prefix} parameters");
        flat(&picked)
    };
    let e = rel_err(&part(&g_own, "encoder."), &part(&g_vae, "encoder."));
    assert!(e < 1e-10, "encoder gradient vs the VAE's: {e}");
    let e = rel_err(&part(&g_own, "decoder."), &part(&g_through, "decoder."));
    assert!(e < 1e-12, "decoder gradient changed: {e}");
    // The option changes what the encoder learns from.
    let e = rel_err(&part(&g_own, "encoder."), &part(&g_through, "encoder."));
    assert!(e > 1e-2, "encoder gradient unchanged by the option: {e}");
}

#[test]
fn finite_difference_hvp_backend_matches_exact() {
    let (model, x, eps) = setup("softplus");
    let exact = train_step(
        &model,
        &x,
        &eps,
        &step_cfg(savae_implicit(HvpKind::Exact), 300),
    )
    .unwrap();
    let fd = train_step(
        &model,
        &x,
        &eps,
        &step_cfg(savae_implicit(HvpKind::FiniteDifference), 300),
    )
    .unwrap();
    let e = rel_err(&flat(&fd.grads), &flat(&exact.grads));
    assert!(e < 1e-6, "fd vs exact HVP backend: relative error {e}");
}

#[test]
fn exact_hvp_matches_finite_differences_on_the_elbo_for_each_activation() {
    use savae_implicit::{value_and_grad, BatchedOperator, ExactHvp, FdHvp};
    use savae_model::{elbo, VariationalParams};
    for act in ["softplus", "tanh", "relu", "elu"] {
        let (model, x, eps) = setup(act);
        let dec = model.decoder.detached();
        let f = |l: &Tensor| Ok(elbo(&dec, &x, &VariationalParams(l.clone()), &eps, 1.0)?.elbo);
        let lam = Tensor::from_vec(
            (0..12)
                .map(|i| ((i as f64) * 0.61).cos() * 0.5)
                .collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let v = Tensor::from_vec(
            (0..12)
                .map(|i| ((i as f64) * 1.7).sin())
                .collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let vg = value_and_grad(f, &lam).unwrap();
        let exact = ExactHvp {
            lambda: vg.lambda,
            grad: vg.grad,
        }
        .apply(&v)
        .unwrap();
        let fd = FdHvp {
            grad_fn: |l: &Tensor| Ok(value_and_grad(f, l)?.grad.detach()),
            lambda: lam.clone(),
            rel_step: 1e-5,
        }
        .apply(&v)
        .unwrap();
        let e = rel_err(&flat(&[exact]), &flat(&[fd]));
        assert!(e < 1e-6, "{act}: exact vs fd HVP relative error {e}");
    }
}

#[test]
fn implicit_and_unrolled_agree_in_f32() {
    let (model, x, eps) = setup("softplus");
    let m32 = model.to(DType::F32, &Device::Cpu).unwrap();
    let x32 = Batch::Images(x.images().unwrap().to_dtype(DType::F32).unwrap());
    let eps32 = Noise(eps.0.to_dtype(DType::F32).unwrap());
    let imp = train_step(
        &m32,
        &x32,
        &eps32,
        &step_cfg(savae_implicit(HvpKind::Exact), 300),
    )
    .unwrap();
    let unr = train_step(&m32, &x32, &eps32, &step_cfg(savae_unrolled(), 300)).unwrap();
    let conv = |o: &savae_train::step::StepOutput| {
        o.grads
            .iter()
            .map(|g| g.to_dtype(DType::F64).unwrap())
            .collect::<Vec<_>>()
    };
    let e = rel_err(&flat(&conv(&imp)), &flat(&conv(&unr)));
    assert!(e < 1e-3, "f32 implicit vs unrolled relative error {e}");
}

//! The hand-derived ELBO passes of the MLP decoder (value, gradient in λ, Hessian-vector
//! products) against candle's autograd (the reference: backward and double backward), in
//! f64, for every activation, several draws and two hidden layers; and whole training
//! steps on either path.

mod common;

use candle_core::{DType, Device, Tensor};
use savae_model::{Activation, Batch, MlpElbo, ModelConfig, Noise, Vae};

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum::<f64>();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>();
    (num / den.max(1e-300)).sqrt()
}

const ACTIVATIONS: [Activation; 4] = [
    Activation::Softplus,
    Activation::Tanh,
    Activation::Relu,
    Activation::Elu,
];

/// A small f64 image model (latent d, the given hidden sizes, p pixels), seeded.
fn mlp_model(act: Activation, d: usize, hidden: &[usize], p: usize, seed: u64) -> Vae {
    let cfg = ModelConfig {
        kind: savae_model::ModelKind::Savae,
        latent_dim: d,
        hidden: hidden.to_vec(),
        activation: act,
        input_dim: p,
        vocab_size: 0,
        embed_dim: 0,
        dropout: 0.0,
    };
    Vae::new(&cfg, seed, DType::F64, &Device::Cpu).unwrap()
}

/// Binary images `[b, p]` and draws `[s, b, d]`, deterministic.
fn batch(b: usize, p: usize, s: usize, d: usize) -> (Tensor, Noise) {
    let dev = Device::Cpu;
    let xs: Vec<f64> = (0..b * p)
        .map(|i| ((i * 7 + 3) % 5 < 2) as u8 as f64)
        .collect();
    let e: Vec<f64> = (0..s * b * d).map(|i| ((i as f64) * 0.77).sin()).collect();
    (
        Tensor::from_vec(xs, (b, p), &dev).unwrap(),
        Noise(Tensor::from_vec(e, (s, b, d), &dev).unwrap()),
    )
}

#[test]
fn analytic_gradient_hvp_and_mixed_product_match_autograd_for_every_activation() {
    savae_implicit::enable_second_order();
    let dev = Device::Cpu;
    let (b, d, p, s) = (4, 3, 10, 3);
    for act in ACTIVATIONS {
        let model = mlp_model(act, d, &[7, 5], p, 11);
        let dec = model.decoder.detached();
        let (x, eps) = batch(b, p, s, d);
        let l: Vec<f64> = (0..b * 2 * d)
            .map(|i| ((i as f64) * 0.31).cos() * 0.8)
            .collect();
        let lambda = Tensor::from_vec(l, (b, 2 * d), &dev).unwrap();
        let v: Vec<f64> = (0..b * 2 * d).map(|i| ((i as f64) * 1.7).sin()).collect();
        let v = Tensor::from_vec(v, (b, 2 * d), &dev).unwrap();
        let beta = 0.7;
        let batch = Batch::Images(x.clone());
        let reference = common::autograd_reference(&model, &batch, &eps, beta, &lambda, &v);
        let ref_hvp = reference.hvp.clone();
        let analytic = MlpElbo {
            mlp: dec.as_mlp().unwrap(),
            x: &x,
            eps: &eps,
            beta,
        };
        let pt = analytic.at(&lambda, true).unwrap();
        let (ev, eg, eh) = (
            rel(&pt.values, &reference.values),
            rel(&pt.grad, &reference.grad),
            rel(&pt.hvp(&v).unwrap(), &ref_hvp),
        );
        assert!(
            ev < 1e-12 && eg < 1e-10 && eh < 1e-10,
            "{act:?}: value {ev:e}, grad {eg:e}, hvp {eh:e}"
        );
        // The mixed product ∇_θ(vᵀ∇_λ f) against double backward through the graph
        // with the decoder's parameters.
        let want = &reference.mixed;
        let (hv, got) = pt.hvp_and_mixed(&v).unwrap();
        assert!(rel(&hv, &ref_hvp) < 1e-10);
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            assert_eq!(g.dims(), w.dims(), "{act:?}: parameter {k}");
            let e = rel(g, w);
            assert!(
                e < 1e-10,
                "{act:?}: mixed product of parameter {k} off by {e:e}"
            );
        }
        // The gradient-only evaluation gives the same gradient, and refuses products.
        let g_only = analytic.at(&lambda, false).unwrap();
        assert!(rel(&g_only.grad, &pt.grad) == 0.0);
        assert!(g_only.hvp(&v).is_err());
        // The products are of a symmetric matrix: uᵀ H v = vᵀ H u.
        let u = (&v * 0.5).unwrap().cos().unwrap();
        let uhv = (&u * pt.hvp(&v).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let vhu = (&v * pt.hvp(&u).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(
            (uhv - vhu).abs() <= 1e-10 * uhv.abs().max(1.0),
            "{act:?}: {uhv} vs {vhu}"
        );
    }
}

/// Whole steps on the analytic and on the autograd path give the same loss and
/// gradients (f64): SA-VAE implicit (refinement and adjoint on the analytic passes) and
/// unrolled (the recorded path), Newton refinement (its Hessians) alone and under the
/// implicit gradient (exact and inexact solves), the plain VAE, vae-svi
/// and the encoder on its own ELBO (the hand backward of the encoder), every activation, for a
/// batch in one piece and one in row blocks.
#[test]
fn training_steps_agree_on_both_paths() {
    use savae_train::step::train_step;
    use savae_train::Mode;
    savae_implicit::enable_second_order();
    let (d, p, s) = (2, 12, 2);
    // 34 examples are evaluated in row blocks (two threads), 3 as one.
    for (act, b) in ACTIVATIONS.iter().flat_map(|&a| [(a, 3), (a, 34)]) {
        let model = mlp_model(act, d, &[6], p, 3);
        let (x, eps) = batch(b, p, s, d);
        let x = Batch::Images(x);
        let newton = {
            let mut c = common::step_cfg(Mode::VaeSvi, 4);
            c.svi.optimizer = savae_inference::SviMethod::Newton.with_lr(1.0);
            c
        };
        // The implicit gradient on line-searched Newton (the adjoint reuses the point the
        // refinement ends on), with exact and with inexact Newton solves.
        let implicit_newton_ls = |solve| {
            let mut c = common::step_cfg(common::savae_implicit(savae_implicit::HvpKind::Exact), 3);
            c.svi.optimizer = savae_inference::SviMethod::NewtonLs
                .with_lr(1.0)
                .with_newton_solve(solve);
            c
        };
        let amortized = common::step_cfg(
            Mode::Savae {
                gradient: savae_train::SavaeGradient::Unrolled { reverse_clip: None },
                encoder_loss: savae_train::options::EncoderLoss::Amortized,
            },
            30,
        );
        for (name, base) in [
            (
                "implicit",
                common::step_cfg(common::savae_implicit(savae_implicit::HvpKind::Exact), 60),
            ),
            ("unrolled", common::step_cfg(common::savae_unrolled(), 60)),
            ("newton", newton),
            (
                "implicit, newton-ls",
                implicit_newton_ls(savae_inference::NewtonSolve::Exact),
            ),
            (
                "implicit, newton-ls inexact",
                implicit_newton_ls(savae_inference::NewtonSolve::Inexact),
            ),
            ("vae", common::step_cfg(Mode::Vae, 0)),
            ("vae-svi", common::step_cfg(Mode::VaeSvi, 10)),
            ("savae amortized encoder", amortized),
        ] {
            let run = |passes| {
                let mut c = base;
                c.passes = passes;
                train_step(&model, &x, &eps, &c).unwrap()
            };
            let a = run(savae_model::Passes::Analytic);
            let r = run(savae_model::Passes::Autograd);
            let flat = |o: &savae_train::StepOutput| {
                Tensor::cat(
                    &o.grads
                        .iter()
                        .map(|g| g.flatten_all().unwrap())
                        .collect::<Vec<_>>(),
                    0,
                )
                .unwrap()
            };
            let e = rel(&flat(&a), &flat(&r));
            assert!(e < 1e-10, "{act:?} {name} B={b}: gradients differ by {e:e}");
            assert!(
                (a.loss - r.loss).abs() <= 1e-10 * r.loss.abs(),
                "{act:?} {name} B={b}: loss {} vs {}",
                a.loss,
                r.loss
            );
        }
    }
}

/// A batch large enough to be evaluated in row blocks on two threads gives what the
/// whole batch gives at once: values, gradient, Hessian-vector and mixed products (the
/// blocks' mixed products summed), several draws, every activation, f64.
#[test]
fn row_blocks_give_the_whole_batch_result() {
    use savae_model::DecoderElbo;
    let dev = Device::Cpu;
    let (b, d, p, s) = (34, 3, 10, 2);
    for act in ACTIVATIONS {
        let model = mlp_model(act, d, &[7, 5], p, 5);
        let dec = model.decoder.detached();
        let (x, eps) = batch(b, p, s, d);
        let lambda = Tensor::from_vec(
            (0..b * 2 * d)
                .map(|i| ((i as f64) * 0.31).cos() * 0.8)
                .collect(),
            (b, 2 * d),
            &dev,
        )
        .unwrap();
        let v = (&lambda * 1.3).unwrap().sin().unwrap();
        let whole = MlpElbo {
            mlp: dec.as_mlp().unwrap(),
            x: &x,
            eps: &eps,
            beta: 0.7,
        };
        let want = whole.at(&lambda, true).unwrap();
        let blocked = DecoderElbo::Mlp(MlpElbo { ..whole });
        let got = blocked.at(&lambda, true).unwrap();
        assert_eq!(got.blocks(), savae_model::analytic::ROW_CHUNKS);
        assert!(rel(got.values(), &want.values) < 1e-14, "{act:?}");
        assert!(rel(got.grad(), &want.grad) < 1e-14, "{act:?}");
        let (hv, mixed) = got.hvp_and_mixed(&v).unwrap();
        let (want_hv, want_mixed) = want.hvp_and_mixed(&v).unwrap();
        assert!(rel(&hv, &want_hv) < 1e-14, "{act:?}");
        assert!(rel(&got.hvp(&v).unwrap(), &want_hv) < 1e-14, "{act:?}");
        for (k, (g, w)) in mixed.iter().zip(&want_mixed).enumerate() {
            assert!(rel(g, w) < 1e-12, "{act:?}: mixed product {k}");
        }
        let (got, want) = (got.weight_grads().unwrap(), want.weight_grads().unwrap());
        assert_eq!(got.len(), want.len());
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(rel(g, w) < 1e-12, "{act:?}: weight gradient {k}");
        }
    }
}

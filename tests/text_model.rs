//! The LSTM sentence VAE: its ELBO gradients against finite differences (f64), exact
//! Hessian-vector products through the LSTM, implicit vs unrolled vs finite differences
//! of the whole SA-VAE pipeline, and perplexities on a toy model whose value is known.

mod common;
use candle_core::{DType, Device, Tensor, Var};
use common::{savae_implicit, savae_unrolled, step_cfg};
use rand::SeedableRng;
use savae_cli::gradcheck::rel_err;
use savae_data::TextSplit;
use savae_implicit::{value_and_grad, BatchedOperator, ExactHvp, FdHvp, HvpKind};
use savae_inference::{SviConfig, SviOptimizer};
use savae_model::{elbo, Batch, ModelConfig, Noise, Vae, VariationalParams};
use savae_train::batch::{token_batch, Dropout, SplitData};
use savae_train::eval::{evaluate, EvalOptions};
use savae_train::step::{train_step, Mode};

const V: usize = 7;

fn config(kind: &str) -> ModelConfig {
    ModelConfig {
        kind: match kind {
            "lm" => savae_model::ModelKind::Lm,
            _ => savae_model::ModelKind::Savae,
        },
        latent_dim: 2,
        hidden: vec![4],
        activation: savae_model::Activation::Softplus,
        input_dim: 0,
        vocab_size: V,
        embed_dim: 3,
        dropout: 0.3,
    }
}

/// A tiny model (weights ±0.5 so that the LSTM is not near-linear), three sentences of
/// four words (one `<unk>`), optional fixed dropout masks, and two noise draws.
fn setup(dropout: bool) -> (Vae, Batch, Noise) {
    let sents = [vec![3u32, 4, 5, 6], vec![6, 0, 3, 3], vec![5, 5, 4, 3]];
    setup_with(dropout, &sents)
}

/// [`setup`] for `b` made-up sentences of four words.
fn setup_n(dropout: bool, b: usize) -> (Vae, Batch, Noise) {
    let sents: Vec<Vec<u32>> = (0..b)
        .map(|i| (0..4).map(|t| ((i * 3 + t * 5) % V) as u32).collect())
        .collect();
    setup_with(dropout, &sents)
}

fn setup_with(dropout: bool, sents: &[Vec<u32>]) -> (Vae, Batch, Noise) {
    savae_implicit::enable_second_order();
    let dev = Device::Cpu;
    let b = sents.len();
    let model = Vae::new(&config("savae"), 5, DType::F64, &dev).unwrap();
    for (_, v) in model.params.iter() {
        let t = (v.as_tensor() * 5.0).unwrap();
        v.set(&t).unwrap();
    }
    let refs: Vec<&Vec<u32>> = sents.iter().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let dr = dropout.then_some(Dropout {
        p: 0.3,
        embed: 3,
        hidden: 4,
    });
    let x = token_batch(&refs, &mut rng, DType::F64, &dev, dr).unwrap();
    assert_eq!(x.dropout.is_some(), dropout);
    let e: Vec<f64> = (0..2 * b * 2).map(|i| ((i as f64) * 0.77).sin()).collect();
    let eps = Noise(Tensor::from_vec(e, (2, b, 2), &dev).unwrap());
    (model, Batch::Text(x), eps)
}

fn lam() -> Tensor {
    Tensor::from_vec(
        (0..12)
            .map(|i| ((i as f64) * 0.61).cos() * 0.5)
            .collect::<Vec<_>>(),
        (3, 4),
        &Device::Cpu,
    )
    .unwrap()
}

fn flat(ts: &[Tensor]) -> Vec<f64> {
    ts.iter()
        .flat_map(|t| t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
        .collect()
}

fn scalar(t: &Tensor) -> f64 {
    t.sum_all().unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn lstm_elbo_gradients_match_central_differences() {
    for dropout in [false, true] {
        let (model, x, eps) = setup(dropout);
        let f = |l: &Tensor| {
            elbo(&model.decoder, &x, &VariationalParams(l.clone()), &eps, 0.8)
                .unwrap()
                .elbo
        };
        // ∇_λ.
        let l0 = lam();
        let var = Var::from_tensor(&l0).unwrap();
        let store = f(var.as_tensor()).sum_all().unwrap().backward().unwrap();
        let g = flat(&[store.get(var.as_tensor()).unwrap().clone()]);
        let base = flat(std::slice::from_ref(&l0));
        let h = 1e-6;
        let fd: Vec<f64> = (0..base.len())
            .map(|j| {
                let at = |d: f64| {
                    let mut w = base.clone();
                    w[j] += d;
                    scalar(&f(&Tensor::from_vec(w, (3, 4), &Device::Cpu).unwrap()))
                };
                (at(h) - at(-h)) / (2.0 * h)
            })
            .collect();
        let e = rel_err(&g, &fd);
        assert!(e < 1e-7, "dropout {dropout}: ∇_λ ELBO vs differences: {e}");
        // ∇_θ of every decoder tensor (three entries each) in the same backward pass.
        let mut got = Vec::new();
        let mut want = Vec::new();
        for (name, p) in model.decoder_params().iter() {
            let gp = flat(&[store.get(p.as_tensor()).unwrap().clone()]);
            let pb = flat(&[p.as_tensor().clone()]);
            for j in [0, pb.len() / 2, pb.len() - 1] {
                let at = |d: f64| {
                    let mut w = pb.clone();
                    w[j] += d;
                    p.set(&Tensor::from_vec(w, p.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    scalar(&f(&l0))
                };
                let d = (at(h) - at(-h)) / (2.0 * h);
                p.set(&Tensor::from_vec(pb.clone(), p.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                got.push(gp[j]);
                want.push(d);
                assert!(
                    (gp[j] - d).abs() <= 1e-6 * (1.0 + d.abs()),
                    "{name}[{j}]: {} vs {d}",
                    gp[j]
                );
            }
        }
        assert!(rel_err(&got, &want) < 1e-7);
    }
}

#[test]
fn exact_hvp_through_the_lstm_matches_differences_of_the_gradient() {
    let (model, x, eps) = setup(true);
    savae_implicit::ensure_second_order().unwrap();
    let dec = model.decoder.detached();
    let f = |l: &Tensor| Ok(elbo(&dec, &x, &VariationalParams(l.clone()), &eps, 1.0)?.elbo);
    let v = Tensor::from_vec(
        (0..12)
            .map(|i| ((i as f64) * 1.7).sin())
            .collect::<Vec<_>>(),
        (3, 4),
        &Device::Cpu,
    )
    .unwrap();
    let vg = value_and_grad(f, &lam()).unwrap();
    let exact = ExactHvp {
        lambda: vg.lambda,
        grad: vg.grad,
    }
    .apply(&v)
    .unwrap();
    let fd = FdHvp {
        grad_fn: |l: &Tensor| Ok(value_and_grad(f, l)?.grad.detach()),
        lambda: lam(),
        rel_step: 1e-5,
    }
    .apply(&v)
    .unwrap();
    let e = rel_err(&flat(std::slice::from_ref(&exact)), &flat(&[fd]));
    assert!(e < 1e-7, "exact vs differenced HVP through the LSTM: {e}");
    assert!(
        scalar(&exact.abs().unwrap()) > 1e-3,
        "the HVP is trivially small"
    );
}

#[test]
fn text_savae_implicit_unrolled_and_finite_differences_agree() {
    let (model, x, eps) = setup(true);
    savae_implicit::ensure_second_order().unwrap();
    // A few entries of every tensor: the first and the last.
    common::pipeline_gradients(&model, &x, &eps, None, 300, |n| vec![0, n - 1]).assert_agree(1e-6);
}

#[test]
fn every_mode_takes_a_finite_step_on_text() {
    let (model, x, eps) = setup(true);
    for mode in [
        Mode::Vae,
        Mode::Svi,
        Mode::VaeSvi,
        savae_implicit(HvpKind::Exact),
        savae_unrolled(),
    ] {
        let out = train_step(&model, &x, &eps, &step_cfg(mode, 5)).unwrap();
        assert!(out.loss.is_finite(), "{mode:?}");
        let norm: f64 = flat(&out.grads).iter().map(|v| v * v).sum();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{mode:?}: gradient norm² {norm}"
        );
    }
    let lm = Vae::new(&config("lm"), 5, DType::F64, &Device::Cpu).unwrap();
    assert!(lm.encoder.is_none() && lm.params.get("decoder.init.weight").is_none());
    let out = train_step(&lm, &x, &eps, &step_cfg(Mode::Lm, 0)).unwrap();
    assert!(out.loss > 0.0 && out.kl == 0.0);
}

/// Every weight zero but the output bias, set to log p for a unigram distribution p: the
/// decoder ignores z and log p(x) = Σ_t log p(x_t) exactly, so both perplexities are
/// exp(−Σ log p / tokens), whatever the proposal.
#[test]
fn perplexity_of_a_unigram_toy_model_is_exact() {
    savae_implicit::enable_second_order();
    let p: [f64; V] = [0.05, 0.01, 0.2, 0.3, 0.15, 0.25, 0.04];
    let sentences = vec![vec![3u32, 4, 5], vec![5, 5], vec![6, 3, 0, 4], vec![4, 4]];
    let tokens: usize = sentences.iter().map(|s| s.len() + 1).sum();
    let logp: f64 = sentences
        .iter()
        .map(|s| {
            s.iter().map(|&w| p[w as usize].ln()).sum::<f64>()
                + p[savae_data::text::EOS as usize].ln()
        })
        .sum();
    let exact = (-logp / tokens as f64).exp();
    let split = SplitData::Text(TextSplit { sentences });
    for kind in ["savae", "lm"] {
        let model = Vae::new(&config(kind), 1, DType::F64, &Device::Cpu).unwrap();
        for (name, v) in model.params.iter() {
            let t = if name == "decoder.out.bias" {
                Tensor::from_vec(
                    p.iter().map(|x| x.ln()).collect::<Vec<_>>(),
                    V,
                    &Device::Cpu,
                )
                .unwrap()
            } else {
                v.as_tensor().zeros_like().unwrap()
            };
            v.set(&t).unwrap();
        }
        let opts = EvalOptions {
            svi: SviConfig {
                steps: 5,
                optimizer: SviOptimizer::Sgd {
                    lr: 1.0,
                    momentum: 0.5,
                    clip: 5.0,
                },
                prox: 1.0,
                tol: 0.0,
                batch_size: 2,
            },
            refine: true,
            iw_samples: 7,
            elbo_samples: 3,
            refine_samples: 2,
            batch_size: 2,
            seed: 1,
            passes: savae_model::Passes::Analytic,
        };
        let r = evaluate(&model, &split, "toy", &opts, &Device::Cpu).unwrap();
        assert_eq!(r.tokens, Some(tokens));
        let (pb, pi) = (r.ppl_bound.unwrap(), r.ppl_iw.unwrap());
        assert!(
            (pi - exact).abs() < 1e-9 * exact,
            "{kind}: ppl_iw {pi} vs {exact}"
        );
        assert!(
            (pb - exact).abs() < 1e-9 * exact,
            "{kind}: ppl_bound {pb} vs {exact}"
        );
        assert!(r.kl_refined.abs() < 1e-12, "{kind}: kl {}", r.kl_refined);
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    rel_err(
        &a.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        &b.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
    )
}

/// The LSTM decoder's analytic passes (`savae_model::analytic::lstm`) against autograd in
/// f64, with and without dropout: value, ∇_λ, Hessian-vector products (double backward)
/// and the mixed product ∇_θ(vᵀ∇_λ f) for every decoder parameter.
#[test]
fn lstm_analytic_passes_match_autograd_with_and_without_dropout() {
    for dropout in [false, true] {
        let (model, x, eps) = setup(dropout);
        let dec = model.decoder.detached();
        let lambda = lam();
        let v = Tensor::from_vec(
            (0..12)
                .map(|i| ((i as f64) * 1.3).sin())
                .collect::<Vec<_>>(),
            (3, 4),
            &Device::Cpu,
        )
        .unwrap();
        let beta = 0.8;
        let reference = common::autograd_reference(&model, &x, &eps, beta, &lambda, &v);
        let ref_hvp = reference.hvp.clone();
        let Batch::Text(tokens) = &x else { panic!() };
        let analytic = savae_model::LstmElbo {
            decoder: dec.as_lstm().unwrap(),
            x: tokens,
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
            "dropout {dropout}: value {ev:e}, grad {eg:e}, hvp {eh:e}"
        );
        let (want, names) = (&reference.mixed, &reference.names);
        let (hv, got) = pt.hvp_and_mixed(&v).unwrap();
        assert!(rel(&hv, &ref_hvp) < 1e-10);
        assert_eq!(got.len(), want.len(), "{names:?}");
        for ((g, w), name) in got.iter().zip(want).zip(names) {
            assert_eq!(g.dims(), w.dims(), "{name}");
            let e = rel(g, w);
            assert!(
                e < 1e-10,
                "dropout {dropout}: mixed product of {name} off by {e:e}"
            );
        }
        // Symmetry: uᵀ H v = vᵀ H u.
        let u = (&v * 0.5).unwrap().cos().unwrap();
        let uhv = scalar(&(&u * pt.hvp(&v).unwrap()).unwrap());
        let vhu = scalar(&(&v * pt.hvp(&u).unwrap()).unwrap());
        assert!(
            (uhv - vhu).abs() <= 1e-10 * uhv.abs().max(1.0),
            "{uhv} vs {vhu}"
        );
        assert!(analytic.at(&lambda, false).unwrap().hvp(&v).is_err());
    }
}

/// Whole text steps give the same loss and gradients on the analytic and the autograd
/// path (f64, dropout on): the vae step (the encoder's hand backward), implicit SA-VAE
/// with either encoder loss, vae-svi at B = 3 and at B = 34 (two row blocks); unrolled
/// SA-VAE, Newton refinement and implicit SA-VAE on the line-searched Newton refinement
/// (PTB's recipe; exact and inexact solves) at B = 3.
#[test]
fn text_training_steps_agree_on_both_paths() {
    let newton = {
        let mut c = step_cfg(Mode::VaeSvi, 4);
        c.svi.optimizer = savae_inference::SviMethod::Newton.with_lr(1.0);
        c
    };
    let implicit_newton_ls = {
        let mut c = step_cfg(savae_implicit(HvpKind::Exact), 3);
        c.svi.optimizer = savae_inference::SviMethod::NewtonLs.with_lr(1.0);
        c.svi.prox = 20.0;
        c
    };
    let implicit_newton_ls_inexact = {
        let mut c = implicit_newton_ls;
        c.svi.optimizer = c
            .svi
            .optimizer
            .with_newton_solve(savae_inference::NewtonSolve::Inexact);
        c
    };
    // Each example stopping on its own (PTB's recipe): the refinement evaluates the rows
    // still moving, and the adjoint evaluates λ_K again.
    let implicit_newton_ls_tol = {
        let mut c = implicit_newton_ls;
        c.svi.steps = 6;
        c.svi.tol = 1e-3;
        c
    };
    let own_encoder = match savae_implicit(HvpKind::Exact) {
        Mode::Savae { gradient, .. } => Mode::Savae {
            gradient,
            encoder_loss: savae_train::options::EncoderLoss::Amortized,
        },
        m => m,
    };
    for b in [3, 34] {
        let (model, x, eps) = setup_n(true, b);
        let mut cases = vec![
            ("vae", step_cfg(Mode::Vae, 0)),
            ("implicit", step_cfg(savae_implicit(HvpKind::Exact), 30)),
            ("implicit, own encoder loss", step_cfg(own_encoder, 10)),
            ("vae-svi", step_cfg(Mode::VaeSvi, 10)),
        ];
        if b == 3 {
            cases.extend([
                ("unrolled", step_cfg(savae_unrolled(), 30)),
                ("newton", newton),
                ("implicit, newton-ls", implicit_newton_ls),
                ("implicit, newton-ls inexact", implicit_newton_ls_inexact),
                ("implicit, newton-ls to a tolerance", implicit_newton_ls_tol),
            ]);
        }
        for (name, base) in cases {
            assert_paths_agree(&model, &x, &eps, base, &format!("{name}, B = {b}"));
        }
    }
}

/// One step of `cfg` on the analytic and on the autograd path: the same loss and
/// gradients to 1e-10 (relative).
fn assert_paths_agree(
    model: &Vae,
    x: &Batch,
    eps: &Noise,
    cfg: savae_train::StepConfig,
    what: &str,
) {
    let run = |passes| {
        let mut c = cfg;
        c.passes = passes;
        train_step(model, x, eps, &c).unwrap()
    };
    let a = run(savae_model::Passes::Analytic);
    let r = run(savae_model::Passes::Autograd);
    assert!(flat(&a.grads).iter().all(|g| g.is_finite()), "{what}");
    let e = rel_err(&flat(&a.grads), &flat(&r.grads));
    assert!(e < 1e-10, "{what}: gradients differ by {e:e}");
    assert!(
        (a.loss - r.loss).abs() <= 1e-10 * r.loss.abs(),
        "{what}: loss {} vs {}",
        a.loss,
        r.loss
    );
}

/// The language model's hand-derived step gives autograd's loss and gradients (f64,
/// dropout on), at B = 3 and at B = 34 (two row blocks).
#[test]
fn language_model_steps_agree_on_both_paths() {
    let dev = Device::Cpu;
    for b in [3usize, 34] {
        let lm = Vae::new(&config("lm"), 5, DType::F64, &dev).unwrap();
        for (_, v) in lm.params.iter() {
            v.set(&(v.as_tensor() * 5.0).unwrap()).unwrap();
        }
        let (_, x, eps) = setup_n(true, b);
        assert_paths_agree(
            &lm,
            &x,
            &eps,
            step_cfg(Mode::Lm, 0),
            &format!("lm, B = {b}"),
        );
    }
}

/// The LSTM passes in row blocks (34 sentences: two blocks on two threads) give what the
/// whole batch gives: values, gradient, Hessian-vector and mixed products, with dropout
/// masks (cut with their sentences) and two draws, f64.
#[test]
fn lstm_row_blocks_give_the_whole_batch_result() {
    use savae_model::{DecoderElbo, LstmElbo};
    savae_implicit::enable_second_order();
    let dev = Device::Cpu;
    let model = Vae::new(&config("savae"), 5, DType::F64, &dev).unwrap();
    let b = 34;
    let sents: Vec<Vec<u32>> = (0..b)
        .map(|i| (0..4).map(|t| ((i * 3 + t * 5) % V) as u32).collect())
        .collect();
    let refs: Vec<&Vec<u32>> = sents.iter().collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let dr = Some(Dropout {
        p: 0.3,
        embed: 3,
        hidden: 4,
    });
    let x = token_batch(&refs, &mut rng, DType::F64, &dev, dr).unwrap();
    let e: Vec<f64> = (0..2 * b * 2).map(|i| ((i as f64) * 0.77).sin()).collect();
    let eps = Noise(Tensor::from_vec(e, (2, b, 2), &dev).unwrap());
    let lambda = Tensor::from_vec(
        (0..b * 4)
            .map(|i| ((i as f64) * 0.61).cos() * 0.5)
            .collect::<Vec<_>>(),
        (b, 4),
        &dev,
    )
    .unwrap();
    let v = (&lambda * 1.3).unwrap().sin().unwrap();
    let dec = model.decoder.detached();
    let whole = LstmElbo {
        decoder: dec.as_lstm().unwrap(),
        x: &x,
        eps: &eps,
        beta: 0.8,
    };
    let want = whole.at(&lambda, true).unwrap();
    let got = DecoderElbo::Lstm(LstmElbo { ..whole })
        .at(&lambda, true)
        .unwrap();
    assert_eq!(got.blocks(), savae_model::analytic::ROW_CHUNKS);
    assert!(rel(got.values(), &want.values) < 1e-14);
    assert!(rel(got.grad(), &want.grad) < 1e-14);
    let (hv, mixed) = got.hvp_and_mixed(&v).unwrap();
    let (want_hv, want_mixed) = want.hvp_and_mixed(&v).unwrap();
    assert!(rel(&hv, &want_hv) < 1e-14);
    for (k, (g, w)) in mixed.iter().zip(&want_mixed).enumerate() {
        assert!(rel(g, w) < 1e-12, "mixed product {k}");
    }
}

/// The Newton refinement stops each sentence on its own (`tol`) and evaluates only those
/// still moving — their rows of the batch, with their dropout masks and draws: on both
/// paths every sentence ends where it ends when refined alone (f64).
#[test]
fn newton_refinement_stops_each_sentence_on_its_own() {
    use savae_train::step::refine_elbo;
    let b = 6;
    let (model, x, eps) = setup_n(true, b);
    let dec = model.decoder.detached();
    let lambda0 = Tensor::from_vec(
        (0..b * 4)
            .map(|i| ((i as f64) * 0.91).cos() * 1.5)
            .collect::<Vec<_>>(),
        (b, 4),
        &Device::Cpu,
    )
    .unwrap();
    let svi = SviConfig {
        steps: 10,
        optimizer: savae_inference::SviMethod::NewtonLs.with_lr(1.0),
        prox: 1.0,
        tol: 1e-8,
        batch_size: b,
    };
    for passes in [savae_model::Passes::Analytic, savae_model::Passes::Autograd] {
        let r = refine_elbo(&dec, &x, &eps, 0.8, &lambda0, &svi, false, passes).unwrap();
        assert!(
            r.final_grad_norm.iter().all(|&g| g < 1e-8),
            "{passes:?}: {:?}",
            r.final_grad_norm
        );
        let mut alone_steps = vec![];
        let mut alone_rows = 0;
        for i in 0..b {
            let xi = x.rows(i, 1).unwrap();
            let ei = Noise(eps.0.narrow(1, i, 1).unwrap());
            let li = lambda0.narrow(0, i, 1).unwrap();
            let ri = refine_elbo(&dec, &xi, &ei, 0.8, &li, &svi, false, passes).unwrap();
            let e = rel(&r.lambda.narrow(0, i, 1).unwrap(), &ri.lambda);
            assert!(e < 1e-10, "{passes:?}, sentence {i}: {e:e}");
            alone_steps.push(ri.steps);
            alone_rows += ri.evaluated_rows;
        }
        assert!(
            alone_steps.iter().min() < alone_steps.iter().max(),
            "the sentences should need different numbers of steps: {alone_steps:?}"
        );
        assert_eq!(r.steps, *alone_steps.iter().max().unwrap(), "{passes:?}");
        // The rows the sentences alone evaluate, and the Hessians of the moving ones
        // evaluated again where the last evaluations covered twice as many.
        assert!(r.evaluated_rows >= alone_rows, "{passes:?}");
    }
}

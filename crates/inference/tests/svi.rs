//! SVI refinement on objectives with known optima.

use anyhow::Result;
use candle_core::{Device, Tensor};
use savae_inference::{refine, SviConfig, SviOptimizer};

/// f_b(λ) = −½‖λ − c_b‖² (maximum at c_b); example 1 returns NaN when `poison`.
fn quad(c: Tensor, poison: bool) -> impl Fn(&Tensor) -> Result<(Tensor, Tensor)> {
    move |l: &Tensor| {
        let d = (l - &c)?;
        let mut g = d.neg()?;
        if poison {
            let mask = Tensor::new(&[[0.0f64], [f64::NAN]], l.device())?;
            g = g.broadcast_add(&mask)?;
        }
        Ok(((d.sqr()?.sum(1)? * -0.5)?, g))
    }
}

fn cfg(opt: SviOptimizer, steps: usize, prox: f64, tol: f64) -> SviConfig {
    SviConfig {
        steps,
        optimizer: opt,
        prox,
        tol,
        batch_size: 1,
    }
}

#[test]
fn sgd_and_adam_reach_the_proximal_optimum() {
    let c = Tensor::new(&[[1.0f64, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
    let l0 = Tensor::zeros((2, 2), candle_core::DType::F64, &Device::Cpu).unwrap();
    // With γ = 1 the optimum of −½‖λ−c‖² − ½‖λ−λ0‖² is (c + λ0)/2 = c/2.
    for opt in [
        SviOptimizer::Sgd {
            lr: 0.3,
            momentum: 0.5,
            clip: 5.0,
        },
        SviOptimizer::Adam {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        },
    ] {
        let r = refine(
            &quad(c.clone(), false),
            &l0,
            &cfg(opt, 3000, 1.0, 1e-9),
            false,
        )
        .unwrap();
        let got = r.lambda.to_vec2::<f64>().unwrap();
        assert!(
            (got[0][0] - 0.5).abs() < 1e-6 && (got[1][1] - 1.5).abs() < 1e-6,
            "{opt:?}: {got:?}"
        );
        assert!(r.steps < 3000, "early stop did not trigger");
        assert!(r.final_grad_norm.iter().all(|&g| g < 1e-9));
        assert_eq!(r.trace.len(), r.steps + 1);
        assert!(r.trace.last().unwrap().mean_objective > r.trace[0].mean_objective);
    }
}

#[test]
fn gradient_clipping_bounds_each_examples_step() {
    let c = Tensor::new(&[[100.0f64, 0.0], [0.1, 0.0]], &Device::Cpu).unwrap();
    let l0 = Tensor::zeros((2, 2), candle_core::DType::F64, &Device::Cpu).unwrap();
    let r = refine(
        &quad(c, false),
        &l0,
        &cfg(
            SviOptimizer::Sgd {
                lr: 1.0,
                momentum: 0.0,
                clip: 5.0,
            },
            1,
            0.0,
            0.0,
        ),
        true,
    )
    .unwrap();
    let got = r.lambda.to_vec2::<f64>().unwrap();
    assert!(
        (got[0][0] - 5.0).abs() < 1e-12,
        "clipped to norm 5: {got:?}"
    );
    assert!(
        (got[1][0] - 0.1).abs() < 1e-12,
        "the other example is not affected: {got:?}"
    );
    assert_eq!(r.path.as_ref().unwrap().len(), 1);
}

#[test]
fn a_diverging_example_is_reset_to_its_start_and_counted() {
    let c = Tensor::new(&[[1.0f64, 1.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    let l0 = Tensor::new(&[[0.0f64, 0.0], [0.25, -0.25]], &Device::Cpu).unwrap();
    let r = refine(
        &quad(c, true),
        &l0,
        &cfg(
            SviOptimizer::Sgd {
                lr: 0.5,
                momentum: 0.5,
                clip: 5.0,
            },
            5,
            0.0,
            0.0,
        ),
        false,
    )
    .unwrap();
    assert_eq!(r.resets, 1);
    let got = r.lambda.to_vec2::<f64>().unwrap();
    assert_eq!(got[1], vec![0.25, -0.25]);
    assert!(
        got[0][0] > 0.5 && got[0][0].is_finite(),
        "the healthy example refined: {got:?}"
    );
}

#[test]
fn newton_reaches_the_optimum_of_a_nonquadratic_objective_in_a_few_steps() {
    use savae_implicit::{enable_second_order, value_and_grad, BatchedOperator, ExactHvp};
    use savae_inference::refine_with_hvp;
    enable_second_order();
    // f_b(λ) = Σ_j −cosh(λ_j − c_bj): concave, maximum at c_b, Hessian −cosh(λ − c).
    let c = Tensor::new(&[[0.5f64, -1.0], [1.5, 0.25]], &Device::Cpu).unwrap();
    let f = |l: &Tensor| -> Result<Tensor> {
        let d = (l - &c)?;
        Ok(((d.exp()? + d.neg()?.exp()?)? * -0.5)?.sum(1)?)
    };
    let grad_fn = |l: &Tensor| -> Result<(Tensor, Tensor)> {
        let vg = value_and_grad(f, l)?;
        Ok((vg.values.detach(), vg.grad.detach()))
    };
    let oracle = |l: &Tensor| -> Result<(Tensor, Tensor, Box<dyn BatchedOperator>)> {
        let vg = value_and_grad(f, l)?;
        let (v, g) = (vg.values.detach(), vg.grad.detach());
        Ok((
            v,
            g,
            Box::new(ExactHvp {
                lambda: vg.lambda,
                grad: vg.grad,
            }),
        ))
    };
    let l0 = Tensor::zeros((2, 2), candle_core::DType::F64, &Device::Cpu).unwrap();
    let opt = SviOptimizer::parse("newton", 1.0).unwrap();
    let r = refine_with_hvp(
        &grad_fn,
        Some(&oracle),
        &l0,
        &cfg(opt, 8, 0.0, 1e-10),
        false,
    )
    .unwrap();
    let got = r.lambda.to_vec2::<f64>().unwrap();
    let want = c.to_vec2::<f64>().unwrap();
    for b in 0..2 {
        for j in 0..2 {
            assert!((got[b][j] - want[b][j]).abs() < 1e-9, "{got:?} vs {want:?}");
        }
    }
    assert!(r.steps <= 8, "Newton took {} steps", r.steps);
    // SGD at a stable step needs far more steps for the same accuracy.
    let sgd = SviOptimizer::Sgd {
        lr: 0.5,
        momentum: 0.5,
        clip: 5.0,
    };
    let rs = refine_with_hvp(&grad_fn, None, &l0, &cfg(sgd, 8, 0.0, 1e-10), false).unwrap();
    assert!(
        rs.final_grad_norm.iter().any(|&g| g > 1e-6),
        "SGD unexpectedly converged in 8 steps"
    );
}

/// A value-and-gradient function and its Hessian oracle (exact, by double backward) for
/// `f: λ [B, n] ↦ [B]`, each counting its calls in `calls`.
#[allow(clippy::type_complexity)]
fn oracles<'a>(
    f: &'a dyn Fn(&Tensor) -> Result<Tensor>,
    calls: &'a std::cell::Cell<usize>,
) -> (
    impl Fn(&Tensor) -> Result<(Tensor, Tensor)> + 'a,
    impl Fn(&Tensor) -> Result<(Tensor, Tensor, Box<dyn savae_implicit::BatchedOperator>)> + 'a,
) {
    use savae_implicit::{value_and_grad, ExactHvp};
    let grad_fn = move |l: &Tensor| -> Result<(Tensor, Tensor)> {
        calls.set(calls.get() + 1);
        let vg = value_and_grad(f, l)?;
        Ok((vg.values.detach(), vg.grad.detach()))
    };
    let oracle = move |l: &Tensor| {
        calls.set(calls.get() + 1);
        let vg = value_and_grad(f, l)?;
        let (v, g) = (vg.values.detach(), vg.grad.detach());
        let op: Box<dyn savae_implicit::BatchedOperator> = Box::new(ExactHvp {
            lambda: vg.lambda,
            grad: vg.grad,
        });
        Ok((v, g, op))
    };
    (grad_fn, oracle)
}

/// The Newton optimizer `name` (`newton` or `newton-ls`) with its steps uncapped.
fn uncapped(name: &str) -> SviOptimizer {
    match SviOptimizer::parse(name, 1.0).unwrap() {
        SviOptimizer::Newton {
            lr,
            cg_iters,
            line_search,
            solve,
            ..
        } => SviOptimizer::Newton {
            lr,
            cg_iters,
            max_step: f64::INFINITY,
            line_search,
            solve,
        },
        other => panic!("{other:?} is not Newton"),
    }
}

#[test]
fn newton_line_search_converges_where_the_full_step_diverges_and_costs_nothing_when_unused() {
    use savae_inference::refine_with_hvp;
    savae_implicit::enable_second_order();
    // f_b(λ) = −√(1 + (λ − c_b)²): concave, maximum at c_b. The full Newton step maps
    // x = λ − c to −x³, so from x = 1.5 (steps uncapped) plain Newton
    // diverges. Example 1
    // starts at x = 0.25, where the full step converges; its refinement must not depend on
    // example 0's backtracking.
    let c = Tensor::new(&[[0.0f64], [-0.25]], &Device::Cpu).unwrap();
    let f = |l: &Tensor| -> Result<Tensor> { Ok(((l - &c)?.sqr()? + 1.0)?.sqrt()?.neg()?.sum(1)?) };
    let l0 = Tensor::new(&[[1.5f64], [0.0]], &Device::Cpu).unwrap();
    let calls = std::cell::Cell::new(0);
    let (grad_fn, oracle) = oracles(&f, &calls);
    let run = |name: &str| {
        let opt = uncapped(name);
        refine_with_hvp(&grad_fn, Some(&oracle), &l0, &cfg(opt, 8, 0.0, 0.0), false).unwrap()
    };
    let plain = run("newton");
    let ls = run("newton-ls");
    // (It oscillates outward until δ = 1e-3 of the damping bounds the step, far from 0.)
    let lp = plain.lambda.to_vec2::<f64>().unwrap();
    assert!(
        lp[0][0].abs() > 10.0 && plain.final_grad_norm[0] > 0.9,
        "plain Newton should move away from the optimum from 1.5: {lp:?}"
    );
    assert_eq!(plain.backtracks, 0);
    assert!(ls.backtracks >= 1, "the line search never backtracked");
    let got = ls.lambda.to_vec2::<f64>().unwrap();
    assert!(got[0][0].abs() < 1e-9, "newton-ls: {got:?}");
    assert!((got[1][0] + 0.25).abs() < 1e-9, "newton-ls: {got:?}");
    assert!(ls.final_grad_norm.iter().all(|&g| g < 1e-9));

    // Where every full step raises F (−cosh, from 0), the line search takes the same
    // steps as plain Newton with the same number of evaluations: its accepted trial is
    // the next step's evaluation.
    let c = Tensor::new(&[[0.5f64, -1.0], [1.5, 0.25]], &Device::Cpu).unwrap();
    let f = |l: &Tensor| -> Result<Tensor> {
        let d = (l - &c)?;
        Ok(((d.exp()? + d.neg()?.exp()?)? * -0.5)?.sum(1)?)
    };
    let l0 = Tensor::zeros((2, 2), candle_core::DType::F64, &Device::Cpu).unwrap();
    let mut out = vec![];
    for name in ["newton", "newton-ls"] {
        let calls = std::cell::Cell::new(0);
        let (grad_fn, oracle) = oracles(&f, &calls);
        let opt = SviOptimizer::parse(name, 1.0).unwrap();
        let r =
            refine_with_hvp(&grad_fn, Some(&oracle), &l0, &cfg(opt, 4, 1.0, 0.0), false).unwrap();
        out.push((
            r.lambda.to_vec2::<f64>().unwrap(),
            r.backtracks,
            calls.get(),
        ));
    }
    assert_eq!(out[1].1, 0, "no step should have been rejected");
    assert_eq!(out[0].0, out[1].0, "same steps");
    assert_eq!(out[0].2, out[1].2, "same number of evaluations");
    assert_eq!(
        out[1].2, 5,
        "K = 4 steps: 4 Hessian points and the last gradient"
    );
}

#[test]
fn every_refinement_method_parses_from_its_name_and_unknown_names_list_them() {
    use savae_inference::SviMethod;
    // Exhaustive: a new method fails to compile here until ALL lists it.
    let index = |m: SviMethod| match m {
        SviMethod::Sgd => 0,
        SviMethod::Adam => 1,
        SviMethod::Newton => 2,
        SviMethod::NewtonLs => 3,
    };
    for (i, m) in SviMethod::ALL.into_iter().enumerate() {
        assert_eq!(index(m), i);
        assert_eq!(SviOptimizer::parse(m.name(), 0.5).unwrap().method(), m);
    }
    let err = SviOptimizer::parse("lbfgs", 1.0).unwrap_err().to_string();
    assert!(
        err.contains("\"lbfgs\"") && err.contains("sgd, adam, newton, newton-ls"),
        "{err}"
    );
}

#[test]
fn inexact_newton_takes_fewer_hessian_products_and_still_converges() {
    use savae_inference::{refine_with_hvp, NewtonSolve};
    savae_implicit::enable_second_order();
    // f_b(λ) = −Σ_j a_j cosh(λ_j − c_bj), a = (1, …, 6): concave, maximum at c_b, Hessian
    // diag(−a_j cosh(λ_j − c_bj)) with six distinct curvatures, so an exact solve takes up
    // to six CG products per step.
    let n = 6;
    let a = Tensor::new(&[[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]], &Device::Cpu).unwrap();
    let c = Tensor::new(
        &[
            [0.5f64, -1.0, 0.25, 1.0, -0.5, 0.75],
            [1.5, 0.25, -0.75, 0.5, 1.0, -1.25],
        ],
        &Device::Cpu,
    )
    .unwrap();
    let f = |l: &Tensor| -> Result<Tensor> {
        let d = (l - &c)?;
        Ok(((d.exp()? + d.neg()?.exp()?)?.broadcast_mul(&a)? * -0.5)?.sum(1)?)
    };
    let calls = std::cell::Cell::new(0);
    let (grad_fn, oracle) = oracles(&f, &calls);
    let l0 = Tensor::zeros((2, n), candle_core::DType::F64, &Device::Cpu).unwrap();
    let run = |solve: NewtonSolve, steps: usize, tol: f64| {
        let opt = SviOptimizer::parse("newton-ls", 1.0)
            .unwrap()
            .with_newton_solve(solve);
        refine_with_hvp(
            &grad_fn,
            Some(&oracle),
            &l0,
            &cfg(opt, steps, 0.0, tol),
            false,
        )
        .unwrap()
    };
    let max =
        |r: &savae_inference::Refinement| r.final_grad_norm.iter().copied().fold(0.0, f64::max);
    // A training budget of 3 steps: the inexact directions cost a quarter of the products
    // (each the whole batch's) and leave every example far closer to its optimum than it
    // started (‖∇F(λ0)‖ ≈ 10), though not as close as exact Newton.
    let exact = run(NewtonSolve::Exact, 3, 0.0);
    let inexact = run(NewtonSolve::Inexact, 3, 0.0);
    assert!(
        inexact.hessian_products * 3 < exact.hessian_products,
        "inexact {} products against exact {}",
        inexact.hessian_products,
        exact.hessian_products
    );
    assert!(max(&exact) < 1e-3, "{:?}", exact.final_grad_norm);
    assert!(max(&inexact) < 0.5, "{:?}", inexact.final_grad_norm);
    // Given the steps, the forcing term tightens as ‖∇F‖ falls and the inexact iteration
    // reaches the optimum to the same precision.
    let far = run(NewtonSolve::Inexact, 20, 1e-9);
    let want = c.to_vec2::<f64>().unwrap();
    let got = far.lambda.to_vec2::<f64>().unwrap();
    for b in 0..2 {
        for j in 0..n {
            assert!((got[b][j] - want[b][j]).abs() < 1e-8, "{got:?} vs {want:?}");
        }
    }
    assert!(
        max(&far) < 1e-9 && far.steps <= 10,
        "{} steps: {:?}",
        far.steps,
        far.final_grad_norm
    );
    // SGD and Adam have no Newton solve to loosen.
    let sgd = SviOptimizer::parse("sgd", 1.0).unwrap();
    assert_eq!(sgd.with_newton_solve(NewtonSolve::Inexact), sgd);
}

/// f_b(λ) = Σ_j −√(1 + (λ_bj − c_bj)²) on the rows asked for, with its exact Hessian
/// (diagonal: −(1 + x²)^{-3/2}), counting the rows evaluated in `rows_seen`.
#[allow(clippy::type_complexity)]
fn sqrt_rows<'a>(
    c: &'a Tensor,
    rows_seen: &'a std::cell::Cell<usize>,
) -> (
    impl Fn(&Tensor, Option<&Tensor>) -> Result<(Tensor, Tensor)> + 'a,
    impl Fn(
            &Tensor,
            Option<&Tensor>,
        ) -> Result<(Tensor, Tensor, Box<dyn savae_implicit::BatchedOperator>)>
        + 'a,
) {
    struct Diag(Tensor);
    impl savae_implicit::BatchedOperator for Diag {
        fn apply(&self, v: &Tensor) -> Result<Tensor> {
            Ok((v * &self.0)?)
        }
    }
    let parts = move |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor, Tensor)> {
        let (l, c) = match rows {
            Some(r) => (l.index_select(r, 0)?, c.index_select(r, 0)?),
            None => (l.clone(), c.clone()),
        };
        rows_seen.set(rows_seen.get() + l.dim(0)?);
        let x = (l - c)?;
        let s = (x.sqr()? + 1.0)?.sqrt()?;
        let v = s.neg()?.sum(1)?;
        let g = (x.neg()? / &s)?;
        let h = (s.powf(3.0)?.recip()?).neg()?;
        Ok((v, g, h))
    };
    let gf = move |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
        let (v, g, _) = parts(l, rows)?;
        Ok((v, g))
    };
    let oracle = move |l: &Tensor, rows: Option<&Tensor>| {
        let (v, g, h) = parts(l, rows)?;
        let op: Box<dyn savae_implicit::BatchedOperator> = Box::new(Diag(h));
        Ok((v, g, op))
    };
    (gf, oracle)
}

#[test]
fn newton_stops_each_example_on_its_own_and_evaluates_only_those_still_moving() {
    use savae_inference::{refine_rows, refine_with_hvp};
    // Four examples at different distances from their optimum (|λ0 − c| from 1e-3 to
    // 1.5, where the full step overshoots and the line search halves it), γ = 0.05.
    let dev = Device::Cpu;
    let c = Tensor::new(&[[1e-3f64, 0.0], [0.3, -0.2], [1.5, 0.0], [0.8, 1.2]], &dev).unwrap();
    let l0 = Tensor::zeros((4, 2), candle_core::DType::F64, &dev).unwrap();
    // Uncapped steps, so that the full step from 1.5 overshoots to −2.3 and is halved.
    let opt = uncapped("newton-ls");
    let config = |tol: f64| cfg(opt, 12, 0.05, tol);
    let seen = std::cell::Cell::new(0);
    let (gf, oracle) = sqrt_rows(&c, &seen);
    let r = refine_rows(&gf, Some(&oracle), &l0, &config(1e-10), false).unwrap();
    let batch_rows = seen.get();
    assert_eq!(r.evaluated_rows, batch_rows, "the refinement's own count");
    assert!(r.backtracks > 0, "no line-search trial was rejected");
    assert!(
        r.final_grad_norm.iter().all(|&g| g < 1e-10),
        "{:?}",
        r.final_grad_norm
    );
    // Each example as a batch of its own: the same λ_K, and together the same work.
    let got = r.lambda.to_vec2::<f64>().unwrap();
    let (mut alone_rows, mut alone_steps) = (0, vec![]);
    for (b, got_b) in got.iter().enumerate() {
        let seen_b = std::cell::Cell::new(0);
        let cb = c.narrow(0, b, 1).unwrap();
        let (gf_b, oracle_b) = sqrt_rows(&cb, &seen_b);
        let l0b = l0.narrow(0, b, 1).unwrap();
        let rb = refine_rows(&gf_b, Some(&oracle_b), &l0b, &config(1e-10), false).unwrap();
        let want = rb.lambda.to_vec2::<f64>().unwrap();
        for j in 0..2 {
            assert!(
                (got_b[j] - want[0][j]).abs() < 1e-12,
                "example {b}: batch {:?} alone {:?}",
                got_b,
                want[0]
            );
        }
        alone_rows += seen_b.get();
        alone_steps.push(rb.steps);
    }
    // What the examples alone evaluate, and the Hessians of the moving ones evaluated
    // again where the last evaluations covered twice as many.
    assert!(
        batch_rows >= alone_rows && batch_rows < alone_rows + 4 * r.steps,
        "rows evaluated: the batch {batch_rows}, its examples alone {alone_rows}"
    );
    assert_eq!(r.steps, *alone_steps.iter().max().unwrap());
    assert!(
        alone_steps.iter().min() < alone_steps.iter().max(),
        "the examples should need different numbers of steps: {alone_steps:?}"
    );
    // A whole-batch objective (every evaluation covers all four) reaches the same λ_K and
    // evaluates (steps and trials) × 4 rows.
    let seen_full = std::cell::Cell::new(0);
    let (gf_rows, oracle_rows) = sqrt_rows(&c, &seen_full);
    let gf_full = |l: &Tensor| gf_rows(l, None);
    let oracle_full = |l: &Tensor| oracle_rows(l, None);
    let rf = refine_with_hvp(&gf_full, Some(&oracle_full), &l0, &config(1e-10), false).unwrap();
    assert_eq!(rf.lambda.to_vec2::<f64>().unwrap(), got);
    assert_eq!(rf.evaluated_rows, batch_rows);
    assert!(
        seen_full.get() > batch_rows && seen_full.get().is_multiple_of(4),
        "whole-batch evaluations: {} rows, by rows: {batch_rows}",
        seen_full.get()
    );
    // With tol = 0 every example takes all K steps.
    let seen0 = std::cell::Cell::new(0);
    let (gf0, oracle0) = sqrt_rows(&c, &seen0);
    let r0 = refine_rows(&gf0, Some(&oracle0), &l0, &config(0.0), false).unwrap();
    assert_eq!(r0.steps, 12);
    assert!(seen0.get() >= 13 * 4);
}

/// The Hessian evaluations alive at once during a Newton refinement, counted in the rows
/// they were evaluated for (on the analytic passes each holds those rows' forward caches).
#[derive(Default)]
struct LiveRows {
    now: std::cell::Cell<usize>,
    peak: std::cell::Cell<usize>,
}

/// An operator that counts itself in [`LiveRows`] while it lives.
struct Tracked {
    op: Box<dyn savae_implicit::BatchedOperator>,
    rows: usize,
    live: std::rc::Rc<LiveRows>,
}

impl Tracked {
    fn new(
        op: Box<dyn savae_implicit::BatchedOperator>,
        rows: usize,
        live: &std::rc::Rc<LiveRows>,
    ) -> Self {
        live.now.set(live.now.get() + rows);
        live.peak.set(live.peak.get().max(live.now.get()));
        Self {
            op,
            rows,
            live: live.clone(),
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.live.now.set(self.live.now.get() - self.rows);
    }
}

impl savae_implicit::BatchedOperator for Tracked {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        self.op.apply(v)
    }
}

#[test]
fn newton_drops_each_hessian_evaluation_once_no_example_needs_it() {
    use savae_inference::refine_rows;
    // The four examples of the per-example test, which finish after different numbers of
    // steps; some trials are halved. A done example's evaluation, and every block once
    // the step's direction is solved for, must not stay alive beside the next
    // evaluations: at most one step's trial points (4 rows) and a halved trial of some of
    // them (2) at once. Holding them, the refinement had 11 rows' alive.
    let dev = Device::Cpu;
    let c = Tensor::new(&[[1e-3f64, 0.0], [0.3, -0.2], [1.5, 0.0], [0.8, 1.2]], &dev).unwrap();
    let l0 = Tensor::zeros((4, 2), candle_core::DType::F64, &dev).unwrap();
    let seen = std::cell::Cell::new(0);
    let (gf, oracle) = sqrt_rows(&c, &seen);
    let live = std::rc::Rc::new(LiveRows::default());
    let tracked = |l: &Tensor, rows: Option<&Tensor>| {
        let (v, g, op) = oracle(l, rows)?;
        let n = v.dim(0)?;
        let op: Box<dyn savae_implicit::BatchedOperator> = Box::new(Tracked::new(op, n, &live));
        Ok((v, g, op))
    };
    let r = refine_rows(
        &gf,
        Some(&tracked),
        &l0,
        &cfg(uncapped("newton-ls"), 12, 0.05, 1e-10),
        false,
    )
    .unwrap();
    assert!(r.backtracks > 0 && r.steps > 2, "{r:?}");
    assert_eq!(live.now.get(), 0, "an evaluation outlived the refinement");
    assert!(
        live.peak.get() <= 6,
        "{} rows' Hessian evaluations alive at once",
        live.peak.get()
    );
}

#[test]
fn a_newton_step_that_passes_no_line_search_trial_takes_the_last_and_is_counted() {
    use savae_inference::refine_rows;
    // f_b(λ) = sin(ωλ), γ = 0. Example 0 starts at phase ωλ = −π/4, where f is convex:
    // the Newton solve meets negative curvature, falls back to the gradient and its step is
    // capped at 2, so the trials move λ by 2, 1, ½, ¼ and ⅛ — and ω⅛ = 2π − 0.05 puts each
    // of them 0.8, 0.4, 0.2, 0.1 and 0.05 rad of phase behind the start, every one lower
    // than F there. No trial passes Armijo's test: the last is taken (refusing it left
    // more PTB examples non-stationary) and counted. Example 1 starts at phase π/2 − 0.3,
    // in the concave cap around a maximum: its full step passes, and it converges there.
    let dev = Device::Cpu;
    let omega = (2.0 * std::f64::consts::PI - 0.05) / 0.125;
    let phases = [
        -std::f64::consts::FRAC_PI_4,
        std::f64::consts::FRAC_PI_2 - 0.3,
    ];
    let l0 = Tensor::new(&[[phases[0] / omega], [phases[1] / omega]], &dev).unwrap();
    let parts = |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor, Tensor)> {
        let l = match rows {
            Some(r) => l.index_select(r, 0)?,
            None => l.clone(),
        };
        let p = (l * omega)?;
        let v = p.sin()?.sum(1)?;
        let g = (p.cos()? * omega)?;
        let h = (p.sin()? * -(omega * omega))?;
        Ok((v, g, h))
    };
    struct Diag(Tensor);
    impl savae_implicit::BatchedOperator for Diag {
        fn apply(&self, v: &Tensor) -> Result<Tensor> {
            Ok((v * &self.0)?)
        }
    }
    let gf = |l: &Tensor, rows: Option<&Tensor>| -> Result<(Tensor, Tensor)> {
        let (v, g, _) = parts(l, rows)?;
        Ok((v, g))
    };
    let oracle = |l: &Tensor, rows: Option<&Tensor>| {
        let (v, g, h) = parts(l, rows)?;
        let op: Box<dyn savae_implicit::BatchedOperator> = Box::new(Diag(h));
        Ok((v, g, op))
    };
    let opt = SviOptimizer::parse("newton-ls", 1.0).unwrap();
    // One step: example 0 halves four times and takes t = 1/16, example 1 its full step.
    let r = refine_rows(&gf, Some(&oracle), &l0, &cfg(opt, 1, 0.0, 0.0), false).unwrap();
    let got = r.lambda.to_vec2::<f64>().unwrap();
    assert!(
        (got[0][0] * omega - (phases[0] + 2.0 * std::f64::consts::PI - 0.05)).abs() < 1e-12,
        "example 0 at phase {}, not the last trial's",
        got[0][0] * omega
    );
    assert_eq!(r.line_search_failures, 1, "{r:?}");
    assert_eq!(r.backtracks, 4, "{r:?}");
    // Six steps: example 1 at its maximum, phase π/2, as if alone.
    let r = refine_rows(&gf, Some(&oracle), &l0, &cfg(opt, 6, 0.0, 1e-9), false).unwrap();
    let got = r.lambda.to_vec2::<f64>().unwrap();
    assert!(
        (got[1][0] * omega - std::f64::consts::FRAC_PI_2).abs() < 1e-9,
        "example 1 at phase {}",
        got[1][0] * omega
    );
    assert!(r.final_grad_norm[1] < 1e-9, "{r:?}");
    assert!(r.line_search_failures >= 1, "{r:?}");
}

/// The unrolled backward of SGD on f_b(λ) = −½ h_b ‖λ_b‖² with a stand-in decoder term
/// Σ_b w_b ⊙ λ_k,b, exact and capped, against the same recursion written out in f64.
#[test]
fn the_reverse_clip_caps_each_examples_adjoint_where_the_exact_one_explodes() {
    use savae_inference::{unrolled_backward, ReverseClip};
    let h = [0.5f64, 40.0];
    let (lr, momentum, prox, steps, cap) = (0.5, 0.5, 0.5, 6, 1.0);
    let dev = &Device::Cpu;
    let curv = Tensor::new(&[[h[0]], [h[1]]], dev).unwrap();
    let grad_fn = |l: &Tensor| -> Result<(Tensor, Tensor)> {
        let g = l.broadcast_mul(&curv)?.neg()?;
        let v = ((l * &g)?.sum(1)? * 0.5)?;
        Ok((v, g))
    };
    let l0 = Tensor::new(&[[0.1f64, 0.1], [0.1, 0.1]], dev).unwrap();
    let svi = SviConfig {
        batch_size: 2,
        ..cfg(
            SviOptimizer::Sgd {
                lr,
                momentum,
                clip: f64::INFINITY,
            },
            steps,
            prox,
            0.0,
        )
    };
    let r = refine(&grad_fn, &l0, &svi, true).unwrap();
    let path: Vec<Vec<Vec<f64>>> = r
        .path
        .as_ref()
        .unwrap()
        .iter()
        .map(|(l, _)| l.to_vec2::<f64>().unwrap())
        .collect();
    let second_order = |l: &Tensor, w: &Tensor| -> Result<(Tensor, Vec<Tensor>)> {
        let hw = w.broadcast_mul(&curv)?.neg()?;
        Ok((hw, vec![(w * l)?.sum(0)?]))
    };
    let gbar = [[0.3f64, -0.2], [0.1, 0.4]];
    let lbar = Tensor::new(&gbar, dev).unwrap();
    let zeros = || vec![Tensor::zeros(2, candle_core::DType::F64, dev).unwrap()];
    // The recursion of unrolled.rs's doc comment, row by row.
    let reference = |cap: Option<f64>| -> ([[f64; 2]; 2], [f64; 2]) {
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let (mut lb, mut mb, mut l0b, mut th) = (gbar, [[0.0; 2]; 2], [[0.0; 2]; 2], [0.0; 2]);
        for lam in path.iter().rev() {
            let mut tg = [0.0; 2];
            for b in 0..2 {
                for j in 0..2 {
                    mb[b][j] += lr * lb[b][j];
                    let w = mb[b][j] / 2.0;
                    lb[b][j] += -h[b] * w - prox * w;
                    l0b[b][j] += prox * w;
                    tg[j] += w * lam[b][j];
                }
                if let Some(c) = cap {
                    let n = norm(&lb[b]);
                    if n > c {
                        lb[b] = lb[b].map(|x| x * c / n);
                    }
                }
            }
            if let Some(c) = cap {
                let n = norm(&tg);
                if n > c {
                    tg = tg.map(|x| x * c / n);
                }
            }
            for j in 0..2 {
                th[j] += tg[j];
                mb[0][j] *= momentum;
                mb[1][j] *= momentum;
            }
        }
        let l0g = [0, 1].map(|b| [0, 1].map(|j| lb[b][j] + l0b[b][j]));
        (l0g, th)
    };
    let mut got = Vec::new();
    for cap in [None, Some(cap)] {
        let clip = cap.map(|norm| ReverseClip { norm });
        let u = unrolled_backward(&second_order, &r, &lbar, &svi, clip, zeros()).unwrap();
        let (l0g, th) = (
            u.lambda0_grad.to_vec2::<f64>().unwrap(),
            u.theta_grads[0].to_vec1::<f64>().unwrap(),
        );
        let (want_l0, want_th) = reference(cap);
        for b in 0..2 {
            for j in 0..2 {
                let rel = (l0g[b][j] - want_l0[b][j]).abs() / want_l0[b][j].abs().max(1.0);
                assert!(
                    rel < 1e-12,
                    "cap {cap:?}: λ̄0[{b}][{j}] {l0g:?} vs {want_l0:?}"
                );
            }
        }
        for j in 0..2 {
            let rel = (th[j] - want_th[j]).abs() / want_th[j].abs().max(1.0);
            assert!(rel < 1e-12, "cap {cap:?}: θ̄ {th:?} vs {want_th:?}");
        }
        got.push((l0g, th));
    }
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (exact, capped) = (&got[0], &got[1]);
    // α s h = 10 for the second example: its exact adjoint explodes over 6 steps; capped,
    // it stays within the cap plus the proximal terms.
    assert!(norm(&exact.0[1]) > 1e4, "{:?}", exact.0);
    assert!(norm(&capped.0[1]) < 10.0, "{:?}", capped.0);
    // (Here 1.7e5 against 0.94, and the decoder term 3.0e3 against 4.2.)
    assert!(norm(&exact.1) > 1e3, "{exact:?}");
    assert!(norm(&capped.1) <= steps as f64 * cap + 1e-12, "{capped:?}");
    // The first example's adjoint stays under the cap: its gradient is the exact one,
    // whatever the other example of its batch does.
    assert_eq!(exact.0[0], capped.0[0]);
}

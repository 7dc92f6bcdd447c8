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

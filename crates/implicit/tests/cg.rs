//! Batched CG on systems with known answers.

use anyhow::Result;
use candle_core::{Device, Tensor};
use savae_implicit::{
    batched_cg, solve_adjoint, BatchedOperator, CgConfig, CgStatus, ShiftedSolve,
};

/// One dense n×n matrix per example.
struct Blocks(Vec<Vec<f64>>, usize);

impl BatchedOperator for Blocks {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        let n = self.1;
        let rows = v.to_vec2::<f64>()?;
        let mut out = Vec::new();
        for (a, x) in self.0.iter().zip(&rows) {
            for i in 0..n {
                out.push((0..n).map(|j| a[i * n + j] * x[j]).sum::<f64>());
            }
        }
        Ok(Tensor::from_vec(out, (rows.len(), n), v.device())?)
    }
}

fn rows(v: &[&[f64]]) -> Tensor {
    let n = v[0].len();
    Tensor::from_vec(v.concat(), (v.len(), n), &Device::Cpu).unwrap()
}

#[test]
fn solves_spd_blocks_exactly() {
    // A1 = [[4,1],[1,3]], b1 = [1,2] → x1 = [1/11, 7/11]; A2 = 2I, b2 = [2,-4] → [1,-2].
    let op = Blocks(vec![vec![4.0, 1.0, 1.0, 3.0], vec![2.0, 0.0, 0.0, 2.0]], 2);
    let b = rows(&[&[1.0, 2.0], &[2.0, -4.0]]);
    let (x, rep) = batched_cg(
        &op,
        &b,
        &CgConfig {
            max_iters: 10,
            tol: 1e-12,
            ..Default::default()
        },
    )
    .unwrap();
    let x = x.to_vec2::<f64>().unwrap();
    assert!(
        (x[0][0] - 1.0 / 11.0).abs() < 1e-12 && (x[0][1] - 7.0 / 11.0).abs() < 1e-12,
        "{x:?}"
    );
    assert!((x[1][0] - 1.0).abs() < 1e-12 && (x[1][1] + 2.0).abs() < 1e-12);
    assert_eq!(rep.status, vec![CgStatus::Converged; 2]);
    assert_eq!(rep.iterations, vec![2, 1]);
}

#[test]
fn reports_negative_curvature_on_an_indefinite_block_and_leaves_others_alone() {
    let op = Blocks(vec![vec![1.0, 0.0, 0.0, -2.0], vec![4.0, 1.0, 1.0, 3.0]], 2);
    let b = rows(&[&[1.0, 1.0], &[1.0, 2.0]]);
    let (x, rep) = batched_cg(
        &op,
        &b,
        &CgConfig {
            max_iters: 10,
            tol: 1e-12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.status[0], CgStatus::NegativeCurvature);
    assert_eq!(rep.status[1], CgStatus::Converged);
    let x = x.to_vec2::<f64>().unwrap();
    assert_eq!(
        x[0],
        vec![0.0, 0.0],
        "a failed row is zero, flagged, never NaN"
    );
    assert!((x[1][0] - 1.0 / 11.0).abs() < 1e-12);
}

#[test]
fn a_diverging_example_does_not_affect_the_others() {
    let op = Blocks(
        vec![
            vec![f64::NAN, 0.0, 0.0, 1.0],
            vec![4.0, 1.0, 1.0, 3.0],
            vec![2.0, 0.0, 0.0, 2.0],
        ],
        2,
    );
    let b = rows(&[&[1.0, 1.0], &[1.0, 2.0], &[2.0, -4.0]]);
    let (x, rep) = batched_cg(
        &op,
        &b,
        &CgConfig {
            max_iters: 10,
            tol: 1e-12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        rep.status,
        vec![
            CgStatus::NonFinite,
            CgStatus::Converged,
            CgStatus::Converged
        ]
    );
    let x = x.to_vec2::<f64>().unwrap();
    assert!(x[0].iter().all(|v| *v == 0.0));
    assert!((x[1][1] - 7.0 / 11.0).abs() < 1e-12 && (x[2][1] + 2.0).abs() < 1e-12);
}

#[test]
fn max_iterations_is_reported_with_its_residual() {
    let op = Blocks(
        vec![vec![1.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 100.0]],
        3,
    );
    let b = rows(&[&[1.0, 1.0, 1.0]]);
    let (_, rep) = batched_cg(
        &op,
        &b,
        &CgConfig {
            max_iters: 1,
            tol: 1e-12,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(rep.status, vec![CgStatus::MaxIterations]);
    assert!(
        rep.residual[0] > 1e-3 && rep.residual[0].is_finite(),
        "{:?}",
        rep.residual
    );
    assert_eq!(rep.iterations, vec![1]);
}

/// H with a large positive eigenvalue: (γ I − H) is indefinite, so the first solve hits
/// negative curvature, and the damped retry must succeed.
struct Hess(Vec<Vec<f64>>);
impl BatchedOperator for Hess {
    fn apply(&self, v: &Tensor) -> Result<Tensor> {
        Blocks(self.0.clone(), 2).apply(v)
    }
}

#[test]
fn adjoint_fallback_damps_failed_examples_and_counts_them() {
    let h = Hess(vec![vec![-1.0, 0.0, 0.0, 3.0], vec![-2.0, 0.0, 0.0, -1.0]]);
    let g = rows(&[&[1.0, 1.0], &[1.0, 1.0]]);
    let sol = solve_adjoint(
        &h,
        &g,
        1.0,
        &ShiftedSolve {
            cg: CgConfig {
                max_iters: 10,
                tol: 1e-12,
                ..Default::default()
            },
            damping: 0.0,
            retries: 3,
        },
        &[],
    )
    .unwrap();
    assert_eq!(sol.report.status[0], CgStatus::NegativeCurvature);
    assert_eq!(sol.retried, 1);
    assert_eq!(sol.fallbacks, 0);
    let u = sol.u.to_vec2::<f64>().unwrap();
    // Example 1 solved exactly: (I − H) u = g → u = [1/3, 1/2].
    assert!(
        (u[1][0] - 1.0 / 3.0).abs() < 1e-12 && (u[1][1] - 0.5).abs() < 1e-12,
        "{u:?}"
    );
    // Example 0 with shift 10: (10 I − H) u = g → u = [1/11, 1/7], finite and non-zero.
    assert!(
        (u[0][0] - 1.0 / 11.0).abs() < 1e-12 && (u[0][1] - 1.0 / 7.0).abs() < 1e-12,
        "{u:?}"
    );
    let l0 = sol.lambda0_grad.to_vec2::<f64>().unwrap();
    assert!((l0[1][1] - 0.5).abs() < 1e-12);
}

#[test]
fn adjoint_falls_back_to_steepest_descent_when_damping_does_not_help() {
    let h = Hess(vec![vec![f64::NAN, 0.0, 0.0, 1.0]]);
    let g = rows(&[&[1.0, 2.0]]);
    let sol = solve_adjoint(
        &h,
        &g,
        2.0,
        &ShiftedSolve {
            cg: CgConfig {
                max_iters: 10,
                tol: 1e-12,
                ..Default::default()
            },
            damping: 0.0,
            retries: 2,
        },
        &[],
    )
    .unwrap();
    assert_eq!(sol.fallbacks, 1);
    let u = sol.u.to_vec2::<f64>().unwrap();
    assert!(
        (u[0][0] - 1.0 / 200.0).abs() < 1e-15 && (u[0][1] - 2.0 / 200.0).abs() < 1e-15,
        "{u:?}"
    );
}

#[test]
fn untrusted_examples_skip_the_solve_and_take_the_identity_fallback() {
    let h = Hess(vec![vec![-1.0, 0.0, 0.0, 3.0], vec![-2.0, 0.0, 0.0, -1.0]]);
    let g = rows(&[&[1.0, 1.0], &[1.0, 1.0]]);
    let sol = solve_adjoint(
        &h,
        &g,
        2.0,
        &ShiftedSolve {
            cg: CgConfig {
                max_iters: 10,
                tol: 1e-12,
                ..Default::default()
            },
            damping: 0.0,
            retries: 0,
        },
        &[true, false],
    )
    .unwrap();
    assert_eq!((sol.untrusted, sol.fallbacks, sol.retried), (1, 0, 0));
    let l0 = sol.lambda0_grad.to_vec2::<f64>().unwrap();
    assert_eq!(l0[0], vec![1.0, 1.0], "γ u = g for an untrusted example");
    // Example 1 solved exactly: (2I − H) u = g → u = [1/4, 1/3], γu = [1/2, 2/3].
    assert!(
        (l0[1][0] - 0.5).abs() < 1e-12 && (l0[1][1] - 2.0 / 3.0).abs() < 1e-12,
        "{l0:?}"
    );
}

#[test]
fn the_newton_forcing_rule_loosens_large_right_hand_sides_and_tightens_small_ones() {
    use savae_implicit::StopRule;
    // A = diag(1, …, 8) for both examples: exact CG needs all 8 iterations. Example 0 has
    // ‖b‖ = 20√8 ≈ 56.6, so η = min(0.5, √56.6) = 0.5; example 1 has ‖b‖ = 1e-4·√8, so
    // η = √(2.83e-4) ≈ 0.0168, tighter than the plain relative tolerance 0.5.
    let n = 8;
    let a: Vec<f64> = (0..n * n)
        .map(|i| {
            if i / n == i % n {
                (i / n + 1) as f64
            } else {
                0.0
            }
        })
        .collect();
    let op = Blocks(vec![a.clone(), a], n);
    let b = rows(&[&[20.0; 8], &[1e-4; 8]]);
    let bnorm = [20.0 * (n as f64).sqrt(), 1e-4 * (n as f64).sqrt()];
    let eta = [0.5, bnorm[1].sqrt()];
    let forcing = CgConfig {
        max_iters: 50,
        tol: 0.5,
        rule: StopRule::NewtonForcing,
    };
    let (_, rep) = batched_cg(&op, &b, &forcing).unwrap();
    assert_eq!(rep.status, vec![CgStatus::Converged; 2]);
    for (e, (r, eta)) in rep.residual.iter().zip(eta).enumerate() {
        assert!(
            *r <= eta,
            "example {e}: relative residual {r} above η = {eta}"
        );
    }
    assert!(
        rep.iterations[0] < rep.iterations[1],
        "the large right-hand side should stop first: {:?}",
        rep.iterations
    );
    // One product per iteration of the slowest example, every example's block in each.
    assert_eq!(rep.products, *rep.iterations.iter().max().unwrap());
    // The plain rule at the same tol stops both examples alike (the same direction, the
    // same relative residual path), so the small one stops loose.
    let relative = CgConfig {
        rule: StopRule::Relative,
        ..forcing
    };
    let (_, rep_rel) = batched_cg(&op, &b, &relative).unwrap();
    assert_eq!(rep_rel.iterations[0], rep_rel.iterations[1]);
    assert!(rep_rel.residual[1] > eta[1], "{:?}", rep_rel.residual);
}

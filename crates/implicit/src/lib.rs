//! Implicit differentiation through an optimum, independent of any model.
//!
//! The crate sees a batch of B independent problems, each with its own parameter row
//! `λ_b ∈ R^n` (a tensor `[B, n]`), a per-example objective whose Hessian is therefore
//! block diagonal, and right-hand sides. It provides
//! - [`autodiff`]: value-and-gradient with the graph kept, and a check that candle's
//!   second-order mode (`CANDLE_GRAD_DO_NOT_DETACH`) is in effect;
//! - [`operator`]: batched linear operators — exact (double backward) and central
//!   finite-difference Hessian-vector products, and the shifted operator `cI − H`;
//! - [`cg`]: batched conjugate gradient with per-example step sizes, residuals and
//!   status, and a fallback for failed examples;
//! - [`mixed`]: the mixed product ∇_θ(uᵀ ∇_λ f) by double backward or differences;
//! - [`adjoint`]: the implicit-function-theorem adjoint of a proximal inner problem;
//! - [`rows`]: some of a batch's examples, and an operator assembled from evaluations
//!   that covered different rows (so a solver can stop working on the examples done).
//!
//! Math (see `shared/design/implicit-gradient.md`): at λ* = argmax_λ f(λ; θ) − γ/2‖λ − λ0‖²
//! with H = ∇²_λ f(λ*), solve (γI − H) u = g for g = ∇_λ L(λ*); then ∂L/∂λ0 = γu and
//! ∂L/∂θ = ∂_θ L + ∇_θ(uᵀ ∇_λ f(λ*; θ)).

pub mod adjoint;
pub mod autodiff;
pub mod cg;
pub mod mixed;
pub mod operator;
pub mod rows;

pub use adjoint::{solve_adjoint, AdjointSolution, ShiftedSolve};
pub use autodiff::{enable_second_order, ensure_second_order, value_and_grad, ValueGrad};
pub use cg::{batched_cg, CgConfig, CgReport, CgStatus, StopRule};
pub use mixed::{mixed_product_exact, mixed_product_fd};
pub use operator::{BatchedOperator, ExactHvp, FdHvp, HvpKind, ShiftedNegHessian};
pub use rows::{RowBlocks, RowBlocksOn, Rows, RowsOf};

use candle_core::{DType, Tensor};

/// Row-wise dot products `Σ_j a_bj b_bj` of two `[B, n]` tensors, on the host in f64.
pub fn row_dot(a: &Tensor, b: &Tensor) -> candle_core::Result<Vec<f64>> {
    (a * b)?.sum(1)?.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// Row norms of a `[B, n]` tensor, on the host in f64.
pub fn row_norms(a: &Tensor) -> candle_core::Result<Vec<f64>> {
    Ok(row_dot(a, a)?.into_iter().map(f64::sqrt).collect())
}

/// A `[B, 1]` column holding `values` (for per-example scaling), in `like`'s dtype/device.
pub fn column(values: &[f64], like: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values.to_vec(), (values.len(), 1), like.device())?.to_dtype(like.dtype())
}

//! SVI refinement of per-example variational parameters λ = (μ, log σ²).
//!
//! Given a per-example objective f(λ) = ELBO_S(λ) with the noise ε held fixed (so f is
//! deterministic), refine a batch `λ: [B, n]` by K steps of gradient ascent on
//!   F(λ) = f(λ) − (γ/2) ‖λ − λ0‖²
//! with SGD with momentum (the SA-VAE scheme), Adam, or damped Newton steps on
//! Hessian-vector products (each direction solved exactly or inexactly, [`NewtonSolve`]),
//! optionally with a per-example backtracking line search ([`svi`]; Newton's steps, each
//! example stopping on its own and only the examples still moving evaluated, in
//! [`newton`]), and differentiate the unrolled SGD recursion in reverse mode
//! ([`unrolled`], Algorithm 1 of Kim et al. 2018).

pub mod newton;
pub mod svi;
pub mod unrolled;

pub use newton::{RowsGradFn, RowsHvpOracle};
pub use svi::{
    refine, refine_rows, refine_with_hvp, Backtracking, HvpOracle, NewtonSolve, Refinement,
    SviConfig, SviMethod, SviOptimizer, SviStep,
};
pub use unrolled::{unrolled_backward, ReverseClip, UnrolledGrad};

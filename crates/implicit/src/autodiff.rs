//! Gradients that keep their graph, for second derivatives.
//!
//! candle 0.11 detaches every intermediate gradient unless `CANDLE_GRAD_DO_NOT_DETACH`
//! is set; the variable is read once per thread, at that thread's first backward. With
//! it unset, a second backward silently returns a wrong tensor (relative error ≈ 0.9 was
//! measured), so every second-order entry point calls [`ensure_second_order`].

use anyhow::{bail, Result};
use candle_core::{backprop::GradStore, DType, Device, Tensor, Var};

/// Sets `CANDLE_GRAD_DO_NOT_DETACH=1` for this process. Call at the start of `main`,
/// before any thread is spawned and before any backward pass.
pub fn enable_second_order() {
    // SAFETY: called at program start, before other threads read the environment.
    unsafe { std::env::set_var("CANDLE_GRAD_DO_NOT_DETACH", "1") };
}

/// Checks on this thread that a second backward is exact: d²/dx² sin²(x) = 2 cos(2x) at
/// x = 0.7 (a composition, so the detached intermediate gradient would change the result).
/// Fails with an explanation when candle's second-order mode is not in effect.
pub fn ensure_second_order() -> Result<()> {
    let x = Var::new(&[0.7f64], &Device::Cpu)?;
    let y = x.as_tensor().sin()?.sqr()?.sum_all()?;
    let g = y.backward()?.get(x.as_tensor()).cloned();
    let want = 2.0 * (1.4f64).cos();
    let second = match g {
        Some(g) => g
            .sum_all()?
            .backward()?
            .get(x.as_tensor())
            .map(|t| t.to_vec1::<f64>()),
        None => None,
    };
    match second {
        Some(Ok(v)) if (v[0] - want).abs() < 1e-9 => Ok(()),
        other => bail!(
            "second-order autodiff is not in effect on this thread (d²sin²x/dx² at 0.7 gave {:?}, \
             expected {want}): set CANDLE_GRAD_DO_NOT_DETACH=1 before the thread's first backward \
             pass (the savae binary does this itself; library users must do it in main)",
            other.map(|r| r.ok())
        ),
    }
}

/// The values of a per-example objective and its gradient with the graph kept.
pub struct ValueGrad {
    /// λ as the variable the gradient was taken with respect to: `[B, n]`.
    pub lambda: Var,
    /// Per-example objective values `f_b(λ_b)`: `[B]`.
    pub values: Tensor,
    /// `∇_λ Σ_b f_b`: `[B, n]` (row b is ∇f_b(λ_b)); differentiable again.
    pub grad: Tensor,
    /// All gradients of that backward pass (e.g. the model's parameters).
    pub store: GradStore,
}

/// Evaluates `f(λ) → [B]` at `lambda` (detached and made a variable) and its gradient.
pub fn value_and_grad(
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
    lambda: &Tensor,
) -> Result<ValueGrad> {
    let var = Var::from_tensor(&lambda.detach())?;
    let values = f(var.as_tensor())?;
    let store = values.sum_all()?.backward()?;
    let grad = match store.get(var.as_tensor()) {
        Some(g) => g.clone(),
        None => var.as_tensor().zeros_like()?,
    };
    Ok(ValueGrad {
        lambda: var,
        values,
        grad,
        store,
    })
}

/// Gradient of `Σ (a ⊙ b)` for the given variables, zeros where a variable is unreached.
pub fn grads_of_dot(a: &Tensor, b: &Tensor, vars: &[&Tensor]) -> Result<Vec<Tensor>> {
    let store = (a * b)?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match store.get(v) {
            Some(g) => Ok(g.detach()),
            None => Ok(v.zeros_like()?),
        })
        .collect()
}

/// Converts `t` to `dtype` only if needed.
pub fn as_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype {
        t.clone()
    } else {
        t.to_dtype(dtype)?
    })
}

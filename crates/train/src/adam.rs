//! Adam for the model's parameters, with its state exposed so that checkpoints can save
//! and restore it exactly (candle-nn's AdamW keeps its moments private).
//!
//! θ ← θ − lr · m̂ / (√v̂ + ε), m̂ = m / (1 − β1ᵗ), v̂ = v / (1 − β2ᵗ).

use anyhow::Result;
use candle_core::{Tensor, Var};

#[derive(Debug, Clone)]
pub struct Adam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Steps taken.
    pub t: u64,
    /// First moments, one per parameter (same order as the parameters).
    pub m: Vec<Tensor>,
    /// Second moments.
    pub v: Vec<Tensor>,
}

impl Adam {
    pub fn new(vars: &[Var], lr: f64) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 0,
            v: m.clone(),
            m,
        })
    }

    /// One update of `vars` with `grads` (same order).
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor]) -> Result<()> {
        self.t += 1;
        let t = self.t as i32;
        let c1 = 1.0 / (1.0 - self.beta1.powi(t));
        let c2 = 1.0 / (1.0 - self.beta2.powi(t));
        let scalars = savae_model::kernels::AdamScalars {
            beta1: self.beta1,
            beta2: self.beta2,
            lr_c1: self.lr * c1,
            c2,
            eps: self.eps,
        };
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let (theta, m, v) = savae_model::kernels::adam_update(
                var.as_tensor(),
                &self.m[i],
                &self.v[i],
                g,
                scalars,
            )?;
            var.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scales `grads` so that their global L2 norm is at most `max_norm` (0 = no clip);
/// returns the norm before clipping.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0.0;
    for g in grads.iter() {
        sq += savae_model::kernels::sum_sq_f64(g)?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm && norm.is_finite() {
        let s = max_norm / norm;
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

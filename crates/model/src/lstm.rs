//! A single-layer LSTM (PyTorch gate order i, f, g, o) written with differentiable candle
//! ops, so that second derivatives (Hessian-vector products through the decoder) work.

use crate::{Linear, ParamSet};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

/// Draws parameters uniformly in ±`bound` from one RNG and registers them by name.
pub struct ParamInit<'a, R: Rng> {
    pub params: &'a mut ParamSet,
    pub rng: &'a mut R,
    pub bound: f64,
    pub dtype: DType,
    pub device: &'a Device,
}

impl<R: Rng> ParamInit<'_, R> {
    /// A tensor of `shape`, registered as `name`.
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let b = self.bound;
        let v: Vec<f64> = (0..n).map(|_| self.rng.random_range(-b..b)).collect();
        let t = Tensor::from_vec(v, shape, self.device)?.to_dtype(self.dtype)?;
        let var = Var::from_tensor(&t)?;
        self.params.push(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    /// A linear layer `{prefix}.weight: [out, in]`, `{prefix}.bias: [out]`.
    pub fn linear(&mut self, prefix: &str, fan_in: usize, fan_out: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"), &[fan_out, fan_in])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[fan_out])?,
        })
    }
}

/// LSTM weights: `weight_ih: [4H, I]`, `weight_hh: [4H, H]`, `bias: [4H]` (one bias; the
/// sum of PyTorch's two).
#[derive(Debug, Clone)]
pub struct Lstm {
    pub weight_ih: Tensor,
    pub weight_hh: Tensor,
    pub bias: Tensor,
}

impl Lstm {
    /// Creates `{prefix}.weight_ih`, `{prefix}.weight_hh`, `{prefix}.bias`.
    pub fn init(
        init: &mut ParamInit<'_, impl Rng>,
        prefix: &str,
        input: usize,
        hidden: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight_ih: init.tensor(&format!("{prefix}.weight_ih"), &[4 * hidden, input])?,
            weight_hh: init.tensor(&format!("{prefix}.weight_hh"), &[4 * hidden, hidden])?,
            bias: init.tensor(&format!("{prefix}.bias"), &[4 * hidden])?,
        })
    }

    pub fn hidden_size(&self) -> usize {
        self.weight_hh.dim(1).unwrap_or(0)
    }

    /// Input projections `x W_ihᵀ + b` of `x: [N, T, I]` → `[N, T, 4H]` (one matmul for all
    /// steps). `columns` restricts `W_ih` to its first columns (the word-embedding part of
    /// a decoder whose remaining inputs are added separately).
    pub fn project_inputs(&self, x: &Tensor, columns: usize) -> candle_core::Result<Tensor> {
        let (n, t, i) = x.dims3()?;
        let w = self.weight_ih.narrow(1, 0, columns)?;
        let g = x
            .reshape((n * t, i))?
            .matmul(&w.t()?)?
            .broadcast_add(&self.bias)?;
        g.reshape((n, t, self.weight_ih.dim(0)?))
    }

    /// Runs the recurrence over precomputed input projections `gx: [N, T, 4H]` from
    /// `(h0, c0): [N, H]`; returns every hidden state `[N, T, H]`.
    pub fn run(&self, gx: &Tensor, h0: &Tensor, c0: &Tensor) -> candle_core::Result<Tensor> {
        let (_, t, _) = gx.dims3()?;
        let h_size = self.hidden_size();
        let w_hh_t = self.weight_hh.t()?;
        let (mut h, mut c) = (h0.clone(), c0.clone());
        let mut hs = Vec::with_capacity(t);
        for step in 0..t {
            let g = gx
                .narrow(1, step, 1)?
                .squeeze(1)?
                .add(&h.matmul(&w_hh_t)?)?;
            let s = candle_nn::ops::sigmoid(&g)?;
            let (i, f, o) = (
                s.narrow(1, 0, h_size)?,
                s.narrow(1, h_size, h_size)?,
                s.narrow(1, 3 * h_size, h_size)?,
            );
            let gg = g.narrow(1, 2 * h_size, h_size)?.tanh()?;
            c = ((f * &c)? + (i * gg)?)?;
            h = (o * c.tanh()?)?;
            hs.push(h.clone());
        }
        Tensor::stack(&hs, 1)
    }

    pub fn detached(&self) -> Lstm {
        Lstm {
            weight_ih: self.weight_ih.detach(),
            weight_hh: self.weight_hh.detach(),
            bias: self.bias.detach(),
        }
    }
}

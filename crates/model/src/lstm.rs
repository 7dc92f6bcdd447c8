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

/// One step of a taped recurrence (at constant weights): `[N, H]` each.
#[derive(Debug, Clone)]
pub struct LstmGates {
    pub i: Tensor,
    pub f: Tensor,
    pub g: Tensor,
    pub o: Tensor,
    /// c_{t−1}.
    pub c_prev: Tensor,
    /// tanh(c_t).
    pub tc: Tensor,
}

/// What [`Lstm::run_taped`] keeps for [`Lstm::backward_taped`].
#[derive(Debug, Clone)]
pub struct LstmTape {
    /// h_0: `[N, H]`.
    pub h0: Tensor,
    /// Steps 1 … T.
    pub gates: Vec<LstmGates>,
}

/// The state each step reads, h_{t−1} for t = 1 … T: `[N·T, H]` from `h0: [N, H]` and the
/// steps' outputs `hs: [N, T, H]` (the same for their tangents).
pub(crate) fn inputs_of_steps(h0: &Tensor, hs: &Tensor) -> Result<Tensor> {
    let (n, t, h) = hs.dims3()?;
    Ok(Tensor::cat(&[&h0.unsqueeze(1)?, &hs.narrow(1, 0, t - 1)?], 1)?.reshape((n * t, h))?)
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
        // A column slice of W_ih is not a layout CUDA's matmul takes (its transpose has a
        // row stride of I + d, not `columns`): copy it when it is one.
        let w = if columns == self.weight_ih.dim(1)? {
            self.weight_ih.clone()
        } else {
            self.weight_ih.narrow(1, 0, columns)?.contiguous()?
        };
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

    /// [`Lstm::run`] with its weights as constants, keeping what the hand backward needs:
    /// every hidden state `[N, T, H]` and each step's [`LstmGates`]. The gates go through
    /// the fused sigmoid kernel (no autograd graph is built).
    pub fn run_taped(&self, gx: &Tensor, h0: &Tensor, c0: &Tensor) -> Result<(Tensor, LstmTape)> {
        let (_, t, _) = gx.dims3()?;
        let h = self.hidden_size();
        let w_hh_t = self.weight_hh.t()?.contiguous()?;
        let mut hc = (h0.clone(), c0.clone());
        let mut gates = Vec::with_capacity(t);
        let mut hs = Vec::with_capacity(t);
        for step in 0..t {
            let (hp, cp) = hc;
            let gamma = (gx.narrow(1, step, 1)?.squeeze(1)? + hp.matmul(&w_hh_t)?)?;
            let sg = crate::activation::sigmoid(&gamma)?;
            let i = sg.narrow(1, 0, h)?;
            let f = sg.narrow(1, h, h)?;
            let o = sg.narrow(1, 3 * h, h)?;
            let g = gamma.narrow(1, 2 * h, h)?.tanh()?;
            let c = ((&f * &cp)? + (&i * &g)?)?;
            let tc = c.tanh()?;
            let hn = (&o * &tc)?;
            hs.push(hn.clone());
            gates.push(LstmGates {
                i,
                f,
                g,
                o,
                c_prev: cp,
                tc,
            });
            hc = (hn, c);
        }
        let hs = Tensor::stack(&hs, 1)?;
        Ok((
            hs,
            LstmTape {
                h0: h0.clone(),
                gates,
            },
        ))
    }

    /// Backpropagation through time of a taped run with constant weights: from the
    /// gradients `gh_out: [N, T, H]` of a loss in the hidden states h_1 … h_T (what
    /// reaches each h_t from outside the recurrence), ∂γ_t for every step `[N, T, 4H]`
    /// and ∂h_0 `[N, H]`:
    ///   ∂h_t = gh_out_t + ∂γ_{t+1} W_hh,   ∂c_t = ∂c_{t+1} ⊙ f_{t+1} + ∂h_t ⊙ o (1 − tanh² c_t),
    ///   ∂γ_t = (∂c g ⊙ σ'_i, ∂c c_{t−1} ⊙ σ'_f, ∂c i ⊙ tanh'_g, ∂h tanh c_t ⊙ σ'_o).
    pub fn backward_taped(&self, tape: &LstmTape, gh_out: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut gh_next = tape.h0.zeros_like()?;
        let mut gc_next = tape.h0.zeros_like()?;
        let t = tape.gates.len();
        let mut dgammas = Vec::with_capacity(t);
        for step in (0..t).rev() {
            let cell = &tape.gates[step];
            let gh = (gh_out.narrow(1, step, 1)?.squeeze(1)? + &gh_next)?;
            let dtc = (1.0 - cell.tc.sqr()?)?;
            let gc = (&gc_next + (&gh * (&cell.o * &dtc)?)?)?;
            let sig = |x: &Tensor| -> candle_core::Result<Tensor> { x * (1.0 - x)? };
            let dgamma = Tensor::cat(
                &[
                    ((&gc * &cell.g)? * sig(&cell.i)?)?,
                    ((&gc * &cell.c_prev)? * sig(&cell.f)?)?,
                    ((&gc * &cell.i)? * (1.0 - cell.g.sqr()?)?)?,
                    ((&gh * &cell.tc)? * sig(&cell.o)?)?,
                ],
                1,
            )?;
            gc_next = (&gc * &cell.f)?;
            gh_next = dgamma.matmul(&self.weight_hh)?;
            dgammas.push(dgamma);
        }
        dgammas.reverse();
        Ok((Tensor::stack(&dgammas, 1)?, gh_next))
    }

    pub fn detached(&self) -> Lstm {
        Lstm {
            weight_ih: self.weight_ih.detach(),
            weight_hh: self.weight_hh.detach(),
            bias: self.bias.detach(),
        }
    }
}

//! Fully connected layers and MLPs.

use crate::{Activation, ParamSet};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

/// `y = x Wᵀ + b` with `W: [out, in]`, `b: [out]` (PyTorch layout).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Linear {
    /// `x: [N, in]` → `[N, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }

    /// The same layer with its weights detached from autodiff.
    pub fn detached(&self) -> Linear {
        Linear {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
        }
    }
}

/// What a taped forward keeps: the input of every layer (x, h_1, …), and the
/// pre-activation a_i and derivative φ'(a_i) of every hidden layer.
#[derive(Debug, Clone)]
pub struct MlpTape {
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) pre: Vec<Tensor>,
    pub(crate) dphi: Vec<Tensor>,
}

/// An MLP: linear layers with `activation` between them and none after the last.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Linear>,
    pub activation: Activation,
}

impl Mlp {
    /// Creates the parameters `{prefix}.layers.{i}.weight|bias` for layer sizes
    /// `sizes[0] → sizes[1] → …`, initialised like PyTorch's `nn.Linear`
    /// (uniform in ±1/√fan_in), drawn from `rng`.
    pub fn init(
        params: &mut ParamSet,
        prefix: &str,
        sizes: &[usize],
        activation: Activation,
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
    ) -> Result<Mlp> {
        let mut layers = Vec::new();
        for (i, w) in sizes.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut draw = |n: usize| -> Vec<f64> {
                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
            };
            let weight = Tensor::from_vec(draw(fan_in * fan_out), (fan_out, fan_in), device)?
                .to_dtype(dtype)?;
            let bias = Tensor::from_vec(draw(fan_out), fan_out, device)?.to_dtype(dtype)?;
            let (wv, bv) = (Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
            params.push(format!("{prefix}.layers.{i}.weight"), wv.clone());
            params.push(format!("{prefix}.layers.{i}.bias"), bv.clone());
            layers.push(Linear {
                weight: wv.as_tensor().clone(),
                bias: bv.as_tensor().clone(),
            });
        }
        Ok(Mlp { layers, activation })
    }

    /// `x: [N, sizes[0]]` → `[N, sizes[last]]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        let n = self.layers.len();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < n {
                h = self.activation.apply(&h)?;
            }
        }
        Ok(h)
    }

    /// [`Mlp::forward`] for the analytic passes (no autograd graph is needed: the
    /// activation comes with its derivative, [`Activation::apply_with_derivative`]),
    /// keeping what [`Mlp::backward`] and the Hessian passes need.
    pub fn forward_taped(&self, x: &Tensor) -> Result<(Tensor, MlpTape)> {
        let n = self.layers.len();
        let mut inputs = Vec::with_capacity(n);
        let mut pre = Vec::with_capacity(n.saturating_sub(1));
        let mut dphi = Vec::with_capacity(n.saturating_sub(1));
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            inputs.push(h.clone());
            h = layer.forward(&h)?;
            if i + 1 < n {
                let (act, d1) = self.activation.apply_with_derivative(&h)?;
                pre.push(h);
                dphi.push(d1);
                h = act;
            }
        }
        Ok((h, MlpTape { inputs, pre, dphi }))
    }

    /// The parameter gradients of Σ (upstream ⊙ output) for a forward taped in `tape`,
    /// `upstream: [N, out]`: weight then bias of each layer, in order. Backpropagation
    /// by hand: δ_L = upstream, ∂/∂W_i = δ_iᵀ h_{i−1}, ∂/∂b_i = Σ_n δ_i,
    /// δ_{i−1} = (δ_i W_i) ⊙ φ'(a_{i−1}); no gradient for the input is formed.
    pub fn backward(&self, tape: &MlpTape, upstream: &Tensor) -> Result<Vec<Tensor>> {
        let n = self.layers.len();
        let mut grads = Vec::with_capacity(2 * n);
        let mut delta = upstream.clone();
        for i in (0..n).rev() {
            grads.push(delta.sum(0)?);
            grads.push(delta.t()?.matmul(&tape.inputs[i])?);
            if i > 0 {
                let gh = delta.matmul(&self.layers[i].weight)?;
                delta = (gh * &tape.dphi[i - 1])?;
            }
        }
        grads.reverse();
        Ok(grads)
    }

    /// The same network with its weights detached from autodiff: gradients flow to the
    /// input only, which saves the weight-gradient work in SVI refinement.
    pub fn detached(&self) -> Mlp {
        Mlp {
            layers: self.layers.iter().map(Linear::detached).collect(),
            activation: self.activation,
        }
    }
}

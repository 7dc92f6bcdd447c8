//! Hidden-layer activations. All are built from candle ops whose backward is itself
//! differentiable, so second derivatives (Hessian-vector products) work through them.

use anyhow::{bail, Result};
use candle_core::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Softplus,
    Tanh,
    Relu,
    Elu,
}

impl Activation {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "softplus" => Self::Softplus,
            "tanh" => Self::Tanh,
            "relu" => Self::Relu,
            "elu" => Self::Elu,
            other => bail!("unknown activation {other:?}: expected softplus, tanh, relu or elu"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Softplus => "softplus",
            Self::Tanh => "tanh",
            Self::Relu => "relu",
            Self::Elu => "elu",
        }
    }
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Softplus => softplus(x),
            Self::Tanh => x.tanh(),
            Self::Relu => x.relu(),
            Self::Elu => x.elu(1.0),
        }
    }
}

/// softplus(x) = log(1 + eˣ), computed stably as relu(x) + log(1 + e^{−|x|}).
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    x.relu()? + tail
}

//! Hidden-layer activations. All are built from candle ops whose backward is itself
//! differentiable, so second derivatives (Hessian-vector products) work through them.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

/// A hidden-layer activation of the MLP; serialized (checkpoint metadata, TOML) and
/// named on the command line by its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
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
            other => bail!("activation {other:?} is unknown: expected softplus, tanh, relu or elu"),
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
    /// φ(a) and φ'(a), forward only, for the analytic passes: softplus in one fused pass
    /// with its derivative σ(a) ([`crate::kernels::softplus_and_sigmoid`]; on the CPU its
    /// f32 rounding differs from [`Activation::apply`]'s by about 1e-7 relative), the
    /// others from the same candle ops as `apply`.
    pub fn apply_with_derivative(self, a: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Self::Softplus => crate::kernels::softplus_and_sigmoid(a)?,
            Self::Tanh => {
                let h = a.tanh()?;
                let d1 = (1.0 - h.sqr()?)?;
                (h, d1)
            }
            Self::Relu => (a.relu()?, a.gt(0.0)?.to_dtype(a.dtype())?),
            Self::Elu => {
                // a > 0: φ' = 1; a ≤ 0: φ' = eᵃ = φ + 1.
                let h = a.elu(1.0)?;
                let e = (&h + 1.0)?;
                let d1 = a.gt(0.0)?.where_cond(&e.ones_like()?, &e)?;
                (h, d1)
            }
        })
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

/// softplus(x) = log(1 + eˣ), computed stably as max(x, 0) + log1p(e^{−|x|}).
///
/// On the CPU one fused pass ([`Softplus`]); elsewhere a composition of candle ops. Both
/// differentiate to sigmoid(x), itself twice differentiable, so HVPs work through it.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        x.contiguous()?.apply_op1(Softplus)
    } else {
        let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
        x.relu()? + tail
    }
}

/// The fused softplus op: forward in one pass over the data, backward grad · sigmoid(x).
/// (Eight separate elementwise ops took 5 ms on a [100, 784] batch on 2 CPU cores.)
pub struct Softplus;

fn sp32(x: f32) -> f32 {
    // ln(1 + e) instead of ln_1p(e): the error is below e·1e-7, i.e. negligible.
    x.max(0.0) + (1.0 + (-x.abs()).exp()).ln()
}
fn sp64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Applies `f` elementwise, in parallel chunks (rayon) for large inputs.
fn map_par<T: Copy + Send + Sync>(v: &[T], f: fn(T) -> T) -> Vec<T> {
    use rayon::prelude::*;
    if v.len() < 16_384 {
        return v.iter().map(|&x| f(x)).collect();
    }
    let mut out = v.to_vec();
    out.par_chunks_mut(4096)
        .for_each(|c| c.iter_mut().for_each(|x| *x = f(*x)));
    out
}

/// A contiguous f32 or f64 CPU storage mapped elementwise by `f32`/`f64` ([`map_par`]).
fn map_storage(
    name: &str,
    storage: &CpuStorage,
    layout: &Layout,
    f32: fn(f32) -> f32,
    f64: fn(f64) -> f64,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: input must be contiguous")))?;
    let out = match storage {
        CpuStorage::F32(v) => CpuStorage::F32(map_par(&v[start..end], f32)),
        CpuStorage::F64(v) => CpuStorage::F64(map_par(&v[start..end], f64)),
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "{name}: only f32 and f64 are supported"
            )))
        }
    };
    Ok((out, layout.shape().clone()))
}

impl CustomOp1 for Softplus {
    fn name(&self) -> &'static str {
        "softplus"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        map_storage("softplus", storage, layout, sp32, sp64)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.mul(&candle_nn::ops::sigmoid(arg)?)?))
    }
}

/// sigmoid(x) = 1 / (1 + e^{−x}), forward only: on the CPU one parallel, vectorized pass
/// ([`crate::kernels::sigmoid`]; candle's is single-threaded and scalar); elsewhere
/// candle's op.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    crate::kernels::sigmoid(x)
}

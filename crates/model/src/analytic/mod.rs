//! Hand-derived derivatives in λ of the ELBO of a decoder with constant weights: the
//! value and gradient, Hessian-vector products at a fixed λ by a forward tangent pass
//! (the R-operator) and a reverse pass with second derivatives, and the mixed product
//! ∇_θ(vᵀ∇_λ f). What depends only on λ is computed once per point and reused by every
//! product (`../shared/design/second-order-passes.md`).
//!
//! [`latent`] is the part every decoder shares (z = μ + σ ⊙ ε and the KL term); [`mlp`]
//! is the Bernoulli MLP decoder, [`lstm`] the LSTM text decoder. [`DecoderElbo`] and
//! [`ElboPoint`] choose between them.

mod latent;
pub mod lstm;
pub mod mlp;

pub use lstm::{LstmElbo, LstmElboPoint};
pub use mlp::{MlpElbo, MlpElboPoint};

use anyhow::Result;
use candle_core::Tensor;

/// How the derivatives of the inner ELBO in λ are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Passes {
    /// Hand-derived passes (the MLP and LSTM models, the language model included).
    Analytic,
    /// candle's autograd (double backward for Hessian-vector products): the reference.
    Autograd,
}

impl Passes {
    pub fn name(self) -> &'static str {
        match self {
            Self::Analytic => "analytic",
            Self::Autograd => "autograd",
        }
    }
}

/// The inner ELBO of a decoder that has analytic passes.
pub enum DecoderElbo<'a> {
    Mlp(MlpElbo<'a>),
    Lstm(LstmElbo<'a>),
}

/// The ELBO at one λ, with (when asked for) what its products reuse.
///
/// Every quantity here is per example (the weights are constants), so on the CPU a batch
/// is evaluated in [`ROW_CHUNKS`] row blocks side by side, each on one thread from its
/// forward to its last product: two cores then work on whole passes instead of splitting
/// every small op between them (the README's Speed section). Values, gradients and
/// products are put back in row order; the blocks' mixed products and weight gradients
/// are summed in block order.
pub struct ElboPoint {
    values: Tensor,
    grad: Tensor,
    /// Each block's first row, row count and point.
    parts: Vec<(usize, usize, PartPoint)>,
}

enum PartPoint {
    Mlp(MlpElboPoint),
    Lstm(LstmElboPoint),
}

/// Row blocks of a batch on the CPU. Fixed (not the machine's thread count), so that
/// results do not depend on the machine; inside a block candle's matmuls still use every
/// thread that is free.
pub const ROW_CHUNKS: usize = 2;

/// Fewest examples in a block: smaller batches are not split.
const MIN_CHUNK_ROWS: usize = 16;

/// The row blocks `(first, count)` of a batch of `b` examples on `device`.
pub fn row_blocks(b: usize, device: &candle_core::Device) -> Vec<(usize, usize)> {
    let n = if device.is_cpu() {
        (b / MIN_CHUNK_ROWS).clamp(1, ROW_CHUNKS)
    } else {
        1
    };
    let base = b / n;
    (0..n)
        .map(|i| (i * base, if i + 1 == n { b - i * base } else { base }))
        .collect()
}

/// Runs `f` on every block, in parallel when there is more than one; the results in
/// block order.
pub fn per_block<T: Send>(
    blocks: &[(usize, usize)],
    f: impl Fn(usize, usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    use rayon::prelude::*;
    if blocks.len() == 1 {
        return Ok(vec![f(blocks[0].0, blocks[0].1)?]);
    }
    blocks
        .par_iter()
        .map(|&(start, len)| f(start, len))
        .collect()
}

impl DecoderElbo<'_> {
    /// The value and gradient at `lambda: [B, 2d]`, and with `for_hessian` what the
    /// products need.
    pub fn at(&self, lambda: &Tensor, for_hessian: bool) -> Result<ElboPoint> {
        let b = lambda.dim(0)?;
        let blocks = row_blocks(b, lambda.device());
        let parts = per_block(&blocks, |start, len| {
            self.part_at(start, len, &lambda.narrow(0, start, len)?, for_hessian)
        })?;
        let values = cat_rows(parts.iter().map(|p| p.values()))?;
        let grad = cat_rows(parts.iter().map(|p| p.grad()))?;
        Ok(ElboPoint {
            values,
            grad,
            parts: blocks
                .into_iter()
                .zip(parts)
                .map(|((start, len), p)| (start, len, p))
                .collect(),
        })
    }
}

impl DecoderElbo<'_> {
    fn part_at(
        &self,
        start: usize,
        len: usize,
        lambda: &Tensor,
        for_hessian: bool,
    ) -> Result<PartPoint> {
        Ok(match self {
            Self::Mlp(m) => PartPoint::Mlp(m.rows_at(start, len, lambda, for_hessian)?),
            Self::Lstm(l) => PartPoint::Lstm(l.rows_at(start, len, lambda, for_hessian)?),
        })
    }

    /// [`DecoderElbo::at`] for the examples `start .. start + len` alone, as one block
    /// (`lambda` holds their rows): for callers that run their own row blocks.
    pub fn rows_at(
        &self,
        start: usize,
        len: usize,
        lambda: &Tensor,
        for_hessian: bool,
    ) -> Result<ElboPoint> {
        let part = self.part_at(start, len, lambda, for_hessian)?;
        Ok(ElboPoint {
            values: part.values().clone(),
            grad: part.grad().clone(),
            parts: vec![(0, len, part)],
        })
    }
}

/// The blocks' tensors stacked in row order (the one tensor itself when there is one).
fn cat_rows<'t>(ts: impl Iterator<Item = &'t Tensor>) -> Result<Tensor> {
    let ts: Vec<&Tensor> = ts.collect();
    Ok(match ts.as_slice() {
        [one] => (*one).clone(),
        many => Tensor::cat(many, 0)?,
    })
}

impl PartPoint {
    fn values(&self) -> &Tensor {
        match self {
            Self::Mlp(p) => &p.values,
            Self::Lstm(p) => &p.values,
        }
    }
    fn grad(&self) -> &Tensor {
        match self {
            Self::Mlp(p) => &p.grad,
            Self::Lstm(p) => &p.grad,
        }
    }
    fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        match self {
            Self::Mlp(p) => p.hvp(v),
            Self::Lstm(p) => p.hvp(v),
        }
    }
    fn hvp_and_mixed(&self, v: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        match self {
            Self::Mlp(p) => p.hvp_and_mixed(v),
            Self::Lstm(p) => p.hvp_and_mixed(v),
        }
    }
}

impl ElboPoint {
    /// f_b(λ_b): `[B]`.
    pub fn values(&self) -> &Tensor {
        &self.values
    }

    /// ∇_λ Σ_b f_b: `[B, 2d]`.
    pub fn grad(&self) -> &Tensor {
        &self.grad
    }

    /// The number of row blocks the batch was evaluated in.
    pub fn blocks(&self) -> usize {
        self.parts.len()
    }

    /// Runs `f` on each block with its rows of `v`.
    fn per_part<T: Send>(
        &self,
        v: &Tensor,
        f: impl Fn(&PartPoint, &Tensor) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        use rayon::prelude::*;
        if let [(_, _, p)] = self.parts.as_slice() {
            return Ok(vec![f(p, v)?]);
        }
        self.parts
            .par_iter()
            .map(|(start, len, p)| f(p, &v.narrow(0, *start, *len)?))
            .collect()
    }

    /// H v for `v: [B, 2d]` (row b: the Hessian of f_b at λ_b times v_b).
    pub fn hvp(&self, v: &Tensor) -> Result<Tensor> {
        let hv = self.per_part(v, |p, v| p.hvp(v))?;
        cat_rows(hv.iter())
    }

    /// H v and the mixed product ∇_θ(vᵀ∇_λ f) for the decoder's parameters, in the
    /// order of its `decoder.*` parameters.
    pub fn hvp_and_mixed(&self, v: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let (hv, mixed): (Vec<Tensor>, Vec<Vec<Tensor>>) = self
            .per_part(v, |p, v| p.hvp_and_mixed(v))?
            .into_iter()
            .unzip();
        Ok((cat_rows(hv.iter())?, sum_in_order(mixed)?))
    }

    /// ∇_θ Σ_b f_b for the decoder's parameters, in the order of its `decoder.*`
    /// parameters. Needs a point made with `for_hessian`.
    pub fn weight_grads(&self) -> Result<Vec<Tensor>> {
        use rayon::prelude::*;
        let per_block = self
            .parts
            .par_iter()
            .map(|(_, _, p)| match p {
                PartPoint::Mlp(p) => p.weight_grads(),
                PartPoint::Lstm(p) => p.weight_grads(),
            })
            .collect::<Result<Vec<_>>>()?;
        sum_in_order(per_block)
    }
}

/// The blocks' parameter tensors summed, block by block in order.
pub fn sum_in_order(per_block: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let mut blocks = per_block.into_iter();
    let mut acc = blocks.next().unwrap_or_default();
    for block in blocks {
        for (a, t) in acc.iter_mut().zip(block) {
            *a = (&*a + t)?;
        }
    }
    Ok(acc)
}

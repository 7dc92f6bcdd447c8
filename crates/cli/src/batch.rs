//! Building device tensors for a batch: pixels and noise, drawn from seeded host RNGs so
//! that every device sees the same numbers.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;
use savae_data::{ImageSplit, PIXELS};
use savae_model::Noise;

/// `x: [B, 784]` for the examples `indices` of `split` (dynamic splits binarized by `rng`).
pub fn images(
    split: &ImageSplit,
    indices: &[usize],
    rng: &mut impl Rng,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let px = split.batch(indices, rng);
    Ok(Tensor::from_vec(px, (indices.len(), PIXELS), device)?.to_dtype(dtype)?)
}

/// Standard normal `ε: [S, B, d]`.
pub fn noise(
    rng: &mut impl Rng,
    s: usize,
    b: usize,
    d: usize,
    dtype: DType,
    device: &Device,
) -> Result<Noise> {
    let v: Vec<f32> = (0..s * b * d)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Ok(Noise(
        Tensor::from_vec(v, (s, b, d), device)?.to_dtype(dtype)?,
    ))
}

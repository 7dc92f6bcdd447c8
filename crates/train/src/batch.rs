//! The data of a run and the device tensors of its batches. Every random number (noise,
//! dynamic binarization, dropout masks) is drawn from seeded host RNGs, so that every
//! device sees the same numbers.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_distr::StandardNormal;
use savae_data::{
    epoch_order, DataSpec, ImageData, ImageSplit, LoadStats, Split, TextData, TextSplit, Vocab,
    PIXELS,
};
use savae_model::{Batch, DropoutMasks, Noise, TokenBatch};
use std::path::Path;

/// One split of images or sentences.
#[derive(Debug, Clone)]
pub enum SplitData {
    Images(ImageSplit),
    Text(TextSplit),
}

/// Decoder dropout of a training step: probability and the embedding and hidden sizes.
#[derive(Debug, Clone, Copy)]
pub struct Dropout {
    pub p: f64,
    pub embed: usize,
    pub hidden: usize,
}

impl SplitData {
    pub fn len(&self) -> usize {
        match self {
            Self::Images(s) => s.len,
            Self::Text(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Words plus one end symbol per sentence (None for images).
    pub fn tokens(&self) -> Option<usize> {
        match self {
            Self::Images(_) => None,
            Self::Text(s) => Some(s.tokens()),
        }
    }
    pub fn truncate(&self, n: usize) -> Self {
        match self {
            Self::Images(s) => Self::Images(s.truncate(n)),
            Self::Text(s) => Self::Text(s.truncate(n)),
        }
    }
    pub fn select(&self, idx: &[usize]) -> Self {
        match self {
            Self::Images(s) => Self::Images(s.select(idx)),
            Self::Text(s) => Self::Text(s.select(idx)),
        }
    }
    /// The batches of training epoch `epoch`: a seeded shuffle cut into `batch_size`
    /// (images), or shuffled batches of equal-length sentences (text).
    pub fn epoch_batches(&self, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
        match self {
            Self::Images(s) => epoch_order(seed, epoch, s.len)
                .chunks(batch_size.max(1))
                .map(|c| c.to_vec())
                .collect(),
            Self::Text(s) => s.epoch_batches(batch_size, seed, epoch),
        }
    }
    /// The batches of an evaluation (file order; text grouped by length).
    pub fn eval_batches(&self, batch_size: usize) -> Vec<Vec<usize>> {
        match self {
            Self::Images(s) => (0..s.len)
                .collect::<Vec<_>>()
                .chunks(batch_size.max(1))
                .map(|c| c.to_vec())
                .collect(),
            Self::Text(s) => s.eval_batches(batch_size),
        }
    }
    /// The examples `indices` on `device` (dynamic images binarized and dropout masks
    /// drawn with `rng`; `dropout` applies to text only).
    pub fn batch(
        &self,
        indices: &[usize],
        rng: &mut impl Rng,
        dtype: DType,
        device: &Device,
        dropout: Option<Dropout>,
    ) -> Result<Batch> {
        Ok(match self {
            Self::Images(s) => Batch::Images(images(s, indices, rng, dtype, device)?),
            Self::Text(s) => Batch::Text(tokens(s, indices, rng, dtype, device, dropout)?),
        })
    }
}

/// All three splits of a run's data, and the vocabulary of a text corpus.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub train: SplitData,
    pub valid: SplitData,
    pub test: SplitData,
    pub vocab: Option<Vocab>,
    /// What loading a text corpus left out (zero for images).
    pub skipped: LoadStats,
}

impl Corpus {
    /// Loads `--dataset` from `data_dir`. Text: the vocabulary is `vocab` when given (a
    /// checkpoint's), else built from the train split (`max_vocab`); train sentences over
    /// `max_len` words are dropped; `skipped` counts them and the empty lines.
    pub fn load(
        dataset: &str,
        data_dir: &Path,
        vocab: Option<Vocab>,
        max_vocab: Option<usize>,
        max_len: usize,
    ) -> Result<Self> {
        Ok(match DataSpec::parse(dataset)? {
            DataSpec::Images(kind) => {
                let d = ImageData::load(kind, data_dir)?;
                Self {
                    train: SplitData::Images(d.train),
                    valid: SplitData::Images(d.valid),
                    test: SplitData::Images(d.test),
                    vocab: None,
                    skipped: LoadStats::default(),
                }
            }
            DataSpec::Text(src) => {
                let d = TextData::load(&src, data_dir, vocab, max_vocab, max_len.max(1))?;
                Self {
                    train: SplitData::Text(d.train),
                    valid: SplitData::Text(d.valid),
                    test: SplitData::Text(d.test),
                    vocab: Some(d.vocab),
                    skipped: d.stats,
                }
            }
        })
    }
    pub fn split(&self, split: Split) -> &SplitData {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
    /// The vocabulary size (0 for images).
    pub fn vocab_size(&self) -> usize {
        self.vocab.as_ref().map_or(0, |v| v.len())
    }
}

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

/// The sentences `indices` (all of one length n) as `<s> w1 … wn` / `w1 … wn </s>`.
pub fn tokens(
    split: &TextSplit,
    indices: &[usize],
    rng: &mut impl Rng,
    dtype: DType,
    device: &Device,
    dropout: Option<Dropout>,
) -> Result<TokenBatch> {
    let sents: Vec<&Vec<u32>> = indices.iter().map(|&i| &split.sentences[i]).collect();
    token_batch(&sents, rng, dtype, device, dropout)
}

/// A [`TokenBatch`] of sentences of equal length.
pub fn token_batch(
    sents: &[&Vec<u32>],
    rng: &mut impl Rng,
    dtype: DType,
    device: &Device,
    dropout: Option<Dropout>,
) -> Result<TokenBatch> {
    let b = sents.len();
    let n = sents.first().map_or(0, |s| s.len());
    anyhow::ensure!(
        sents.iter().all(|s| s.len() == n),
        "a text batch needs sentences of one length"
    );
    let t = n + 1;
    let mut inputs = Vec::with_capacity(b * t);
    let mut targets = Vec::with_capacity(b * t);
    for s in sents {
        inputs.push(savae_data::text::BOS);
        inputs.extend_from_slice(s);
        targets.extend_from_slice(s);
        targets.push(savae_data::text::EOS);
    }
    let masks = match dropout {
        Some(d) if d.p > 0.0 => {
            let keep = 1.0 / (1.0 - d.p) as f32;
            let mut draw = |len: usize, width: usize| -> Result<Tensor> {
                let v: Vec<f32> = (0..b * len * width)
                    .map(|_| if rng.random::<f64>() < d.p { 0.0 } else { keep })
                    .collect();
                Ok(Tensor::from_vec(v, (b, len, width), device)?.to_dtype(dtype)?)
            };
            Some(DropoutMasks {
                embed: draw(t, d.embed)?,
                output: draw(t, d.hidden)?,
            })
        }
        _ => None,
    };
    Ok(TokenBatch {
        inputs: Tensor::from_vec(inputs, (b, t), device)?,
        targets: Tensor::from_vec(targets, (b, t), device)?,
        dropout: masks,
    })
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

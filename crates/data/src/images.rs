//! The MNIST data sets savae trains on.
//!
//! - `mnist`: the static binarization of Salakhutdinov & Murray (Larochelle's files),
//!   50 000 train / 10 000 valid / 10 000 test. The files are sorted by class: always
//!   shuffle (see [`crate::order`]).
//! - `mnist-dynamic`: LeCun's grey-scale MNIST, pixels in [0, 1], binarized by Bernoulli
//!   sampling every time a training batch is drawn (seeded); the first 55 000 training
//!   images train, the last 5 000 validate, and valid/test are binarized once with a fixed
//!   seed so that evaluation is reproducible.

use crate::{amat, checksum, idx, order::batch_rng};
use anyhow::{bail, Context, Result};
use rand::Rng;
use std::path::Path;

/// Pixels per image (28 × 28).
pub const PIXELS: usize = 784;

/// Which image data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// Static binarized MNIST (Larochelle).
    Mnist,
    /// Raw MNIST, dynamically binarized.
    MnistDynamic,
}

impl DatasetKind {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "mnist" => Ok(Self::Mnist),
            "mnist-dynamic" => Ok(Self::MnistDynamic),
            other => bail!("unknown dataset {other:?}: expected \"mnist\" or \"mnist-dynamic\""),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Mnist => "mnist",
            Self::MnistDynamic => "mnist-dynamic",
        }
    }
}

/// A data split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
    Test,
}

impl Split {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "train" => Ok(Self::Train),
            "valid" => Ok(Self::Valid),
            "test" => Ok(Self::Test),
            other => bail!("unknown split {other:?}: expected train, valid or test"),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Valid => "valid",
            Self::Test => "test",
        }
    }
}

/// One split: `len` images of [`PIXELS`] values each, row-major.
///
/// If `dynamic`, the values are grey levels in [0, 1] and [`ImageSplit::batch`] draws a
/// fresh binarization; otherwise they are already 0/1.
#[derive(Debug, Clone)]
pub struct ImageSplit {
    pub pixels: Vec<f32>,
    pub len: usize,
    pub dynamic: bool,
}

impl ImageSplit {
    /// Keeps the examples at `indices` only (in that order).
    pub fn select(&self, indices: &[usize]) -> ImageSplit {
        let mut pixels = Vec::with_capacity(indices.len() * PIXELS);
        for &i in indices {
            pixels.extend_from_slice(&self.pixels[i * PIXELS..(i + 1) * PIXELS]);
        }
        ImageSplit {
            pixels,
            len: indices.len(),
            dynamic: self.dynamic,
        }
    }

    /// The first `n` examples (file order).
    pub fn truncate(&self, n: usize) -> ImageSplit {
        let n = n.min(self.len);
        ImageSplit {
            pixels: self.pixels[..n * PIXELS].to_vec(),
            len: n,
            dynamic: self.dynamic,
        }
    }

    /// The binary pixels of the examples `indices`, flattened `[indices.len() * PIXELS]`.
    /// A dynamic split is binarized with `rng`.
    pub fn batch(&self, indices: &[usize], rng: &mut impl Rng) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * PIXELS);
        for &i in indices {
            let row = &self.pixels[i * PIXELS..(i + 1) * PIXELS];
            if self.dynamic {
                out.extend(
                    row.iter()
                        .map(|&p| if rng.random::<f32>() < p { 1.0 } else { 0.0 }),
                );
            } else {
                out.extend_from_slice(row);
            }
        }
        out
    }
}

/// All three splits of a data set.
#[derive(Debug, Clone)]
pub struct ImageData {
    pub kind: DatasetKind,
    pub train: ImageSplit,
    pub valid: ImageSplit,
    pub test: ImageSplit,
}

impl ImageData {
    /// Loads `kind` from `data_dir` (the repository's `data/` by default), verifying it.
    pub fn load(kind: DatasetKind, data_dir: &Path) -> Result<Self> {
        match kind {
            DatasetKind::Mnist => load_static(data_dir),
            DatasetKind::MnistDynamic => load_dynamic(data_dir),
        }
    }

    pub fn split(&self, split: Split) -> &ImageSplit {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
}

fn load_amat(dir: &Path, rel: &str, rows: usize) -> Result<ImageSplit> {
    let what = dir.join(rel).display().to_string();
    let gz = checksum::read_verified(dir, rel)?;
    let text = checksum::gunzip(&gz, &what)?;
    let pixels = amat::parse(&text, rows, &what)?;
    Ok(ImageSplit {
        pixels,
        len: rows,
        dynamic: false,
    })
}

fn load_static(dir: &Path) -> Result<ImageData> {
    Ok(ImageData {
        kind: DatasetKind::Mnist,
        train: load_amat(dir, "binarized_mnist/binarized_mnist_train.amat.gz", 50_000)?,
        valid: load_amat(dir, "binarized_mnist/binarized_mnist_valid.amat.gz", 10_000)?,
        test: load_amat(dir, "binarized_mnist/binarized_mnist_test.amat.gz", 10_000)?,
    })
}

fn load_idx(dir: &Path, rel: &str, count: usize) -> Result<ImageSplit> {
    let what = dir.join(rel).display().to_string();
    let gz = checksum::read_verified(dir, rel)?;
    let raw = checksum::gunzip(&gz, &what)?;
    let images = idx::parse_images(&raw, &what)?;
    if images.count != count || images.rows != 28 || images.cols != 28 {
        bail!(
            "{what}: holds {}×{}×{} images, expected {count}×28×28",
            images.count,
            images.rows,
            images.cols
        );
    }
    let pixels = images.pixels.iter().map(|&p| p as f32 / 255.0).collect();
    Ok(ImageSplit {
        pixels,
        len: count,
        dynamic: true,
    })
}

/// Binarizes a grey split once with a fixed seed (for reproducible evaluation).
fn binarize_fixed(split: &ImageSplit, stream: u64) -> ImageSplit {
    let mut rng = batch_rng(0x5eed, stream, 0, 0);
    let all: Vec<usize> = (0..split.len).collect();
    ImageSplit {
        pixels: split.batch(&all, &mut rng),
        len: split.len,
        dynamic: false,
    }
}

fn load_dynamic(dir: &Path) -> Result<ImageData> {
    let train_all = load_idx(dir, "mnist/train-images-idx3-ubyte.gz", 60_000)?;
    let test = load_idx(dir, "mnist/t10k-images-idx3-ubyte.gz", 10_000)
        .context("loading the MNIST test images")?;
    let train = train_all.select(&(0..55_000).collect::<Vec<_>>());
    let valid = train_all.select(&(55_000..60_000).collect::<Vec<_>>());
    Ok(ImageData {
        kind: DatasetKind::MnistDynamic,
        train,
        valid: binarize_fixed(&valid, 100),
        test: binarize_fixed(&test, 101),
    })
}

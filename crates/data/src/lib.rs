//! Data loading for savae: the shipped MNIST files (raw idx and the Larochelle static
//! binarization) and text corpora (Penn Treebank, one-sentence-per-line folders), verified
//! on load, and seeded shuffling into mini-batches.
//!
//! Every image is a row of 784 values in `{0, 1}` (row-major 28×28 pixels), stored as
//! `f32`. Loaders check checksums of the shipped files, magic numbers, shapes and value
//! ranges, and name the file in every error.

pub mod amat;
pub mod checksum;
pub mod idx;
pub mod images;
pub mod order;
pub mod spec;
pub mod text;

pub use images::{DatasetKind, ImageData, ImageSplit, Split, PIXELS};
pub use order::{batch_rng, epoch_order, sample_indices, SplitMix, Stream};
pub use spec::DataSpec;
pub use text::{LoadStats, TextData, TextSource, TextSplit, Vocab};

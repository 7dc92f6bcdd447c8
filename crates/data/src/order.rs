//! Seeded randomness for data order and noise.
//!
//! Every random draw of a run is a pure function of `(seed, epoch, batch)`: the order of
//! an epoch comes from [`epoch_order`], and all noise of one batch (ε for the ELBO, the
//! dynamic binarization) from [`batch_rng`]. A checkpoint therefore only needs the seed
//! and the position `(epoch, batch)` to resume bit-identically.

use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// SplitMix64, used to derive independent stream seeds from `(seed, a, b)`.
#[derive(Debug, Clone, Copy)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A seed for stream `(tag, a, b)` of `seed`.
    pub fn derive(seed: u64, tag: u64, a: u64, b: u64) -> u64 {
        let mut s = SplitMix(seed ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        s.next_u64();
        s.0 ^= a.wrapping_mul(0xA076_1D64_78BD_642F);
        s.next_u64();
        s.0 ^= b.wrapping_mul(0xE703_7ED1_A0B4_28DB);
        s.next_u64()
    }
}

/// The permutation of `0..n` used in epoch `epoch` (0-based) of a run with `seed`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(SplitMix::derive(seed, 1, epoch, 0));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    idx
}

/// A seeded random subset of `n` of the indices `0..total` (all of them when n ≥ total),
/// in ascending order: a representative sample of a file whatever its order (the static
/// binarized MNIST test file is sorted by class).
pub fn sample_indices(seed: u64, total: usize, n: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(SplitMix::derive(seed, 8, total as u64, n as u64));
    let mut idx: Vec<usize> = (0..total).collect();
    idx.shuffle(&mut rng);
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

/// The RNG for all noise of batch `batch` in epoch `epoch`. `stream` separates uses
/// (training noise, evaluation noise, binarization).
pub fn batch_rng(seed: u64, stream: u64, epoch: u64, batch: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(SplitMix::derive(seed, 2 + stream, epoch, batch))
}

/// The named random streams of savae: each use of randomness draws from its own stream,
/// so that adding draws to one never shifts another's numbers. The numbers are part of
/// the checkpoint contract (changing one changes what a resumed run computes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A training batch: dropout masks, dynamic binarization, ε (and the outer draws).
    Train,
    /// An evaluation batch: refinement draws, ELBO draws, importance samples.
    Eval,
    /// The draws of the mutual-information estimate.
    MutualInfo,
    /// The report's reconstruction inputs (dynamic binarization).
    ReportReconstructions,
    /// The report's prior samples and traversals.
    ReportPrior,
    /// The report's sentences (text).
    ReportSentences,
}

impl Stream {
    /// The stream's number in [`batch_rng`].
    pub fn id(self) -> u64 {
        match self {
            Self::Train => 0,
            Self::Eval => 1,
            Self::MutualInfo => 7,
            Self::ReportReconstructions => 9,
            Self::ReportPrior => 10,
            Self::ReportSentences => 11,
        }
    }

    /// The RNG of this stream for `(epoch, batch)` of a run with `seed`.
    pub fn rng(self, seed: u64, epoch: u64, batch: u64) -> ChaCha8Rng {
        batch_rng(seed, self.id(), epoch, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(7, 0, 1000);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(7, 0, 1000));
        assert_ne!(a, epoch_order(7, 1, 1000));
        assert_ne!(a, epoch_order(8, 0, 1000));
        assert_ne!(a, (0..1000).collect::<Vec<_>>());
    }
}

//! Text corpora: one sentence per line, whitespace-separated tokens.
//!
//! - `ptb`: Mikolov's Penn Treebank (10k vocabulary, `<unk>` already in the text),
//!   shipped under `data/ptb/` and verified against its checksums.
//! - `text:DIR`: `DIR/train.txt`, `DIR/valid.txt`, `DIR/test.txt` (or the same names with
//!   `.gz`), the format of the Yahoo and Yelp corpora of SA-VAE and He et al. (2019).
//!
//! A sentence is stored as the ids of its words, without start or end symbols. The model
//! reads `<s> w1 … wn` and predicts `w1 … wn </s>`, so a sentence of n words holds n + 1
//! tokens for perplexity. Empty lines are skipped (and counted); train sentences longer
//! than the maximum length are dropped (and counted); valid and test keep every sentence
//! so that perplexities are over the whole split.

use crate::order::{epoch_order, SplitMix};
use crate::{checksum, Split};
use anyhow::{bail, Context, Result};
use rand::{seq::SliceRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Id of the unknown-word symbol.
pub const UNK: u32 = 0;
/// Id of the start symbol `<s>` (decoder input only).
pub const BOS: u32 = 1;
/// Id of the end symbol `</s>` (predicted after the last word).
pub const EOS: u32 = 2;
/// The special symbols, in id order.
pub const SPECIALS: [&str; 3] = ["<unk>", "<s>", "</s>"];

/// A line with more words than this is refused: it is not a sentence (a file without line
/// breaks would otherwise become one LSTM sequence of the whole corpus).
pub const MAX_LINE_WORDS: usize = 10_000;

/// Where a text corpus comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextSource {
    /// The shipped Penn Treebank.
    Ptb,
    /// `DIR/{train,valid,test}.txt`.
    Dir(PathBuf),
}

/// A word ↔ id table: the special symbols first, then the train words by decreasing
/// frequency (ties in byte order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    words: Vec<String>,
    index: HashMap<String, u32>,
}

impl Vocab {
    /// Builds the vocabulary of `sentences` (whitespace tokens), keeping at most
    /// `max_size` entries in all (special symbols included); rarer words become `<unk>`.
    pub fn build<'a>(
        sentences: impl IntoIterator<Item = &'a str>,
        max_size: Option<usize>,
    ) -> Self {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for s in sentences {
            for w in s.split_whitespace() {
                *counts.entry(w).or_default() += 1;
            }
        }
        let mut by_freq: Vec<(&str, usize)> = counts
            .into_iter()
            .filter(|(w, _)| !SPECIALS.contains(w))
            .collect();
        by_freq.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let keep = max_size.map_or(usize::MAX, |m| m.saturating_sub(SPECIALS.len()));
        let words = SPECIALS
            .iter()
            .map(|s| s.to_string())
            .chain(by_freq.into_iter().take(keep).map(|(w, _)| w.to_string()))
            .collect();
        Self::from_words(words).expect("built vocabularies are well formed")
    }

    /// A vocabulary from its word list (as stored in a checkpoint).
    pub fn from_words(words: Vec<String>) -> Result<Self> {
        if words.len() < SPECIALS.len() || words[..SPECIALS.len()] != SPECIALS {
            bail!("a vocabulary must start with {SPECIALS:?}");
        }
        let mut index = HashMap::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            if index.insert(w.clone(), i as u32).is_some() {
                bail!("the vocabulary holds {w:?} twice");
            }
        }
        Ok(Self { words, index })
    }

    pub fn len(&self) -> usize {
        self.words.len()
    }
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
    pub fn words(&self) -> &[String] {
        &self.words
    }
    /// The id of `word` (`<unk>` when unknown).
    pub fn id(&self, word: &str) -> u32 {
        self.index.get(word).copied().unwrap_or(UNK)
    }
    pub fn word(&self, id: u32) -> &str {
        self.words.get(id as usize).map_or("<unk>", |s| s.as_str())
    }
    /// The ids of the whitespace tokens of `sentence`.
    pub fn encode(&self, sentence: &str) -> Vec<u32> {
        sentence.split_whitespace().map(|w| self.id(w)).collect()
    }
    /// The words of `ids`, space separated, stopping at `</s>`.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .take_while(|&&i| i != EOS)
            .map(|&i| self.word(i))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One split: sentences as word ids (no start/end symbols).
#[derive(Debug, Clone, Default)]
pub struct TextSplit {
    pub sentences: Vec<Vec<u32>>,
}

impl TextSplit {
    pub fn len(&self) -> usize {
        self.sentences.len()
    }
    pub fn is_empty(&self) -> bool {
        self.sentences.is_empty()
    }
    /// Tokens for perplexity: words plus one end symbol per sentence.
    pub fn tokens(&self) -> usize {
        self.sentences.iter().map(|s| s.len() + 1).sum()
    }
    /// The sentences at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> TextSplit {
        TextSplit {
            sentences: indices.iter().map(|&i| self.sentences[i].clone()).collect(),
        }
    }
    /// The first `n` sentences (file order).
    pub fn truncate(&self, n: usize) -> TextSplit {
        TextSplit {
            sentences: self.sentences[..n.min(self.len())].to_vec(),
        }
    }

    /// The batches of one training epoch: sentences of *equal* length (so no padding or
    /// masking is needed), at most `batch_size` each. Sentences are shuffled with
    /// `(seed, epoch)`, grouped by length, cut into batches, and the batches shuffled.
    /// The number of batches is the same in every epoch.
    pub fn epoch_batches(&self, batch_size: usize, seed: u64, epoch: u64) -> Vec<Vec<usize>> {
        let order = epoch_order(seed, epoch, self.len());
        let mut batches = self.length_batches(order, batch_size);
        let mut rng = ChaCha8Rng::seed_from_u64(SplitMix::derive(seed, 9, epoch, 0));
        batches.shuffle(&mut rng);
        batches
    }

    /// The batches of an evaluation: file order within each length, shortest first.
    pub fn eval_batches(&self, batch_size: usize) -> Vec<Vec<usize>> {
        self.length_batches((0..self.len()).collect(), batch_size)
    }

    fn length_batches(&self, mut order: Vec<usize>, batch_size: usize) -> Vec<Vec<usize>> {
        order.sort_by_key(|&i| self.sentences[i].len()); // stable: keeps `order` within a length
        let mut batches = Vec::new();
        let mut start = 0;
        while start < order.len() {
            let len = self.sentences[order[start]].len();
            let mut end = start;
            while end < order.len()
                && end - start < batch_size.max(1)
                && self.sentences[order[end]].len() == len
            {
                end += 1;
            }
            batches.push(order[start..end].to_vec());
            start = end;
        }
        batches
    }
}

/// What loading a corpus skipped, for the user to see.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadStats {
    pub empty_lines: usize,
    /// Train sentences longer than the maximum length.
    pub too_long: usize,
}

/// A text corpus: vocabulary and three splits.
#[derive(Debug, Clone)]
pub struct TextData {
    pub vocab: Vocab,
    pub train: TextSplit,
    pub valid: TextSplit,
    pub test: TextSplit,
    pub stats: LoadStats,
}

impl TextData {
    /// Loads `source` from `data_dir` (for `ptb`). The vocabulary is `vocab` when given
    /// (a checkpoint's), else built from the train split with at most `max_vocab`
    /// entries. Train sentences with more than `max_len` words are dropped.
    pub fn load(
        source: &TextSource,
        data_dir: &Path,
        vocab: Option<Vocab>,
        max_vocab: Option<usize>,
        max_len: usize,
    ) -> Result<Self> {
        let lines = |split: Split| -> Result<(Vec<String>, usize)> {
            let (text, what) = read_split(source, data_dir, split)?;
            let mut out = Vec::new();
            let mut empty = 0;
            for (i, l) in text.lines().enumerate() {
                let words = l.split_whitespace().count();
                if words == 0 {
                    empty += 1;
                } else if words > MAX_LINE_WORDS {
                    bail!(
                        "text file {what}: line {} has {words} words; savae reads one sentence \
                         per line (is the file missing its line breaks?)",
                        i + 1
                    );
                } else {
                    out.push(l.to_string());
                }
            }
            if out.is_empty() {
                bail!("text file {what} holds no sentences");
            }
            Ok((out, empty))
        };
        let (train_lines, e1) = lines(Split::Train)?;
        let (valid_lines, e2) = lines(Split::Valid)?;
        let (test_lines, e3) = lines(Split::Test)?;
        let (kept, too_long): (Vec<&String>, Vec<&String>) = train_lines
            .iter()
            .partition(|l| l.split_whitespace().count() <= max_len);
        // The vocabulary comes from the sentences that train (a word seen only in a
        // dropped sentence would keep an untrained embedding).
        let vocab =
            vocab.unwrap_or_else(|| Vocab::build(kept.iter().map(|s| s.as_str()), max_vocab));
        let stats = LoadStats {
            empty_lines: e1 + e2 + e3,
            too_long: too_long.len(),
        };
        let train = TextSplit {
            sentences: kept.iter().map(|l| vocab.encode(l)).collect(),
        };
        if train.is_empty() {
            bail!("no train sentence has at most {max_len} words: raise --max-len");
        }
        let encode = |ls: &[String]| TextSplit {
            sentences: ls.iter().map(|l| vocab.encode(l)).collect(),
        };
        Ok(Self {
            valid: encode(&valid_lines),
            test: encode(&test_lines),
            train,
            vocab,
            stats,
        })
    }

    pub fn split(&self, split: Split) -> &TextSplit {
        match split {
            Split::Train => &self.train,
            Split::Valid => &self.valid,
            Split::Test => &self.test,
        }
    }
}

/// The text of one split and the path it came from.
fn read_split(source: &TextSource, data_dir: &Path, split: Split) -> Result<(String, String)> {
    match source {
        TextSource::Ptb => {
            let rel = format!("ptb/ptb.{}.txt.gz", split.name());
            let what = data_dir.join(&rel).display().to_string();
            let gz = checksum::read_verified(data_dir, &rel)?;
            let raw = checksum::gunzip(&gz, &what)?;
            Ok((utf8(raw, &what)?, what))
        }
        TextSource::Dir(dir) => {
            let plain = dir.join(format!("{}.txt", split.name()));
            let gz = dir.join(format!("{}.txt.gz", split.name()));
            if plain.exists() {
                let what = plain.display().to_string();
                let raw = std::fs::read(&plain)
                    .with_context(|| format!("cannot read text file {what}"))?;
                Ok((utf8(raw, &what)?, what))
            } else if gz.exists() {
                let what = gz.display().to_string();
                let bytes =
                    std::fs::read(&gz).with_context(|| format!("cannot read text file {what}"))?;
                Ok((utf8(checksum::gunzip(&bytes, &what)?, &what)?, what))
            } else {
                bail!(
                    "--dataset text:{}: {} is missing (a text corpus needs train.txt, valid.txt \
                     and test.txt, one sentence per line)",
                    dir.display(),
                    plain.display()
                )
            }
        }
    }
}

fn utf8(raw: Vec<u8>, what: &str) -> Result<String> {
    String::from_utf8(raw).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        anyhow::anyhow!("text file {what}: line {line} is not valid UTF-8")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabulary_orders_by_frequency_and_maps_rare_words_to_unk() {
        let v = Vocab::build(["a b b c", "b c"], Some(5));
        assert_eq!(v.words(), ["<unk>", "<s>", "</s>", "b", "c"]);
        assert_eq!(v.encode("b a zz c"), vec![3, UNK, UNK, 4]);
        assert_eq!(v.decode(&[3, 4, EOS, 3]), "b c");
        assert!(Vocab::from_words(vec!["x".into()]).is_err());
    }

    #[test]
    fn batches_hold_equal_lengths_cover_every_sentence_once_and_are_seeded() {
        let s = TextSplit {
            sentences: (0..50).map(|i| vec![3; 1 + i % 4]).collect(),
        };
        let b = s.epoch_batches(4, 1, 0);
        let mut seen: Vec<usize> = b.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        for batch in &b {
            assert!(batch.len() <= 4);
            assert!(batch
                .iter()
                .all(|&i| s.sentences[i].len() == s.sentences[batch[0]].len()));
        }
        assert_eq!(b, s.epoch_batches(4, 1, 0));
        assert_ne!(b, s.epoch_batches(4, 1, 1));
        assert_eq!(b.len(), s.epoch_batches(4, 1, 1).len());
        assert_eq!(s.tokens(), s.sentences.iter().map(|x| x.len() + 1).sum());
    }
}

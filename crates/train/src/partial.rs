//! An evaluation's running totals on disk, so that a killed evaluation continues where it
//! stopped instead of starting over (a PTB test evaluation with 500 importance samples
//! takes hours on a core).
//!
//! The file is safetensors: every f64 sum and per-example value as an f64 tensor (bits
//! as computed, NaN included), the counts, the batches done and the key of the request in
//! the metadata; written atomically. Every draw of an evaluation is a function of (seed,
//! batch) and the totals are summed in batch order, so a continued evaluation reports the
//! same numbers, bit for bit, as one that ran straight through.

use crate::checkpoint::write_atomic;
use crate::eval::EvalTotals;
use anyhow::{bail, ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Where an evaluation keeps its running totals, and how often it writes them.
#[derive(Debug, Clone)]
pub struct EvalProgressFile {
    pub path: PathBuf,
    /// Write after a batch once this much time has passed since the last write.
    pub save_every: Duration,
}

/// Totals read back: the batches they cover (the first `batches` of the evaluation).
pub(crate) struct Saved {
    pub batches: usize,
    pub totals: EvalTotals,
}

const FORMAT: &str = "savae-eval-progress-1";

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn flat(rows: &[Vec<f64>]) -> Vec<f64> {
    rows.iter().flatten().copied().collect()
}

impl EvalProgressFile {
    /// Writes the totals of the first `batches` batches of the evaluation `key`.
    pub(crate) fn save(&self, key: &str, batches: usize, t: &EvalTotals) -> Result<()> {
        let d = t.means_amortized.first().map_or(0, Vec::len);
        let sums = [
            t.elbo_amortized,
            t.elbo_refined,
            t.kl_amortized,
            t.kl_refined,
            t.nll,
            t.svi_grad_norm,
        ];
        let vectors: Vec<(&str, Vec<f64>)> = vec![
            ("sums", sums.to_vec()),
            ("per_example_amortized", t.per_example_amortized.clone()),
            ("per_example_refined", t.per_example_refined.clone()),
            ("means_amortized", flat(&t.means_amortized)),
            ("means_refined", flat(&t.means_refined)),
            ("logvars_amortized", flat(&t.logvars_amortized)),
            ("logvars_refined", flat(&t.logvars_refined)),
        ];
        let bytes: Vec<(&str, Vec<u8>, usize)> = vectors
            .iter()
            .map(|(n, v)| (*n, f64_bytes(v), v.len()))
            .collect();
        let views = bytes
            .iter()
            .map(|(n, b, len)| Ok((*n, TensorView::new(Dtype::F64, vec![*len], b)?)))
            .collect::<Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("key", key.to_string()),
            ("batches", batches.to_string()),
            ("examples", t.examples.to_string()),
            ("latent_dim", d.to_string()),
            ("svi_resets", t.svi_resets.to_string()),
            (
                "svi_line_search_failures",
                t.svi_line_search_failures.to_string(),
            ),
            ("svi_steps", t.svi_steps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let out = safetensors::serialize(views, Some(meta))
            .with_context(|| format!("cannot serialize {}", self.path.display()))?;
        write_atomic(&self.path, &out)
    }

    /// The totals saved for the evaluation `key`; None where the file does not exist.
    /// Refuses a file that holds another evaluation's totals, or is not such a file.
    pub(crate) fn load(&self, key: &str) -> Result<Option<Saved>> {
        let p = &self.path;
        let bytes = match std::fs::read(p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", p.display())),
        };
        let not_safetensors = || {
            format!(
                "{} is not an evaluation's progress file (not safetensors)",
                p.display()
            )
        };
        let (_, header) = SafeTensors::read_metadata(&bytes).with_context(not_safetensors)?;
        let st = SafeTensors::deserialize(&bytes).with_context(not_safetensors)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String> {
            meta.get(k).with_context(|| {
                format!(
                    "{}: not an evaluation's progress file (no {k:?})",
                    p.display()
                )
            })
        };
        ensure!(
            get("format")? == FORMAT,
            "{}: an evaluation progress file of another format ({:?}, expected {FORMAT:?})",
            p.display(),
            get("format")?
        );
        if get("key")? != key {
            bail!(
                "{} holds the progress of another evaluation (another checkpoint, split or \
                 settings): remove it, or name another file, to start this one",
                p.display()
            );
        }
        let count = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .with_context(|| format!("{}: {k} is not a count", p.display()))
        };
        let vector = |name: &str| -> Result<Vec<f64>> {
            let t = st
                .tensor(name)
                .with_context(|| format!("{}: no tensor {name:?}", p.display()))?;
            ensure!(
                t.dtype() == Dtype::F64 && t.shape().len() == 1,
                "{}: tensor {name:?} is not a vector of f64",
                p.display()
            );
            Ok(t.data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect())
        };
        let d = count("latent_dim")?;
        let rows = |name: &str| -> Result<Vec<Vec<f64>>> {
            let v = vector(name)?;
            if d == 0 {
                ensure!(
                    v.is_empty(),
                    "{}: {name:?} without a latent size",
                    p.display()
                );
                return Ok(Vec::new());
            }
            ensure!(
                v.len() % d == 0,
                "{}: {name:?} is not rows of {d}",
                p.display()
            );
            Ok(v.chunks(d).map(<[f64]>::to_vec).collect())
        };
        let sums = vector("sums")?;
        ensure!(sums.len() == 6, "{}: \"sums\" needs 6 values", p.display());
        let totals = EvalTotals {
            examples: count("examples")?,
            elbo_amortized: sums[0],
            elbo_refined: sums[1],
            kl_amortized: sums[2],
            kl_refined: sums[3],
            nll: sums[4],
            svi_grad_norm: sums[5],
            svi_resets: count("svi_resets")?,
            svi_line_search_failures: count("svi_line_search_failures")?,
            svi_steps: count("svi_steps")?,
            means_amortized: rows("means_amortized")?,
            means_refined: rows("means_refined")?,
            logvars_amortized: rows("logvars_amortized")?,
            logvars_refined: rows("logvars_refined")?,
            per_example_amortized: vector("per_example_amortized")?,
            per_example_refined: vector("per_example_refined")?,
        };
        ensure!(
            totals.per_example_refined.len() == totals.examples,
            "{}: {} per-example values for {} examples",
            p.display(),
            totals.per_example_refined.len(),
            totals.examples
        );
        Ok(Some(Saved {
            batches: count("batches")?,
            totals,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> EvalProgressFile {
        let dir = std::env::temp_dir().join(format!("savae-partial-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        EvalProgressFile {
            path: dir.join("progress"),
            save_every: Duration::ZERO,
        }
    }

    #[test]
    fn totals_come_back_bit_for_bit_and_another_evaluations_are_refused() {
        let f = file("roundtrip");
        assert!(f.load("a").unwrap().is_none(), "no file: start over");
        let t = EvalTotals {
            examples: 2,
            elbo_amortized: -1.0 / 3.0,
            elbo_refined: f64::NAN,
            nll: f64::NEG_INFINITY,
            svi_resets: 4,
            svi_line_search_failures: 5,
            svi_steps: 6,
            means_amortized: vec![vec![0.1, -0.2], vec![1e-300, 7.0]],
            means_refined: vec![vec![0.3, 0.4], vec![0.5, 0.6]],
            logvars_amortized: vec![vec![-1.0, -2.0], vec![-3.0, -4.0]],
            logvars_refined: vec![vec![-5.0, -6.0], vec![-7.0, -8.0]],
            per_example_amortized: vec![-90.0, -91.5],
            per_example_refined: vec![-89.0, f64::NAN],
            ..EvalTotals::default()
        };
        f.save("a", 3, &t).unwrap();
        let back = f.load("a").unwrap().unwrap();
        assert_eq!(back.batches, 3);
        // Debug prints every f64 exactly (NaN as NaN): equal text, equal bits here.
        assert_eq!(format!("{:?}", back.totals), format!("{t:?}"));
        let err = f.load("b").err().unwrap().to_string();
        assert!(err.contains("another evaluation"), "{err}");
        // The language model's totals have no posteriors.
        let lm = EvalTotals {
            examples: 1,
            per_example_amortized: vec![-3.0],
            per_example_refined: vec![-3.0],
            ..EvalTotals::default()
        };
        f.save("lm", 1, &lm).unwrap();
        let back = f.load("lm").unwrap().unwrap();
        assert_eq!(format!("{:?}", back.totals), format!("{lm:?}"));
        std::fs::write(&f.path, b"not safetensors").unwrap();
        let err = f.load("lm").err().unwrap().to_string();
        assert!(err.contains("not an evaluation's progress file"), "{err}");
        let _ = std::fs::remove_dir_all(f.path.parent().unwrap());
    }
}

//! Checkpoints: safetensors files holding the model, the optimizer state and, in the
//! metadata key `savae`, a JSON [`CheckpointMeta`] (architecture, position, config).
//!
//! Tensor names (MLP): `encoder.layers.{i}.weight` `[out, in]`, `encoder.layers.{i}.bias`,
//! the same under `decoder.`; (LSTM) `encoder.embed.weight` `[V, E]`,
//! `encoder.lstm.{weight_ih,weight_hh,bias}`, `encoder.out.*`, `decoder.embed.weight`,
//! `decoder.lstm.*`, `decoder.init.*` (z → h0), `decoder.out.*` (H → V); Adam's moments under `optim.m.<name>` and `optim.v.<name>`.
//! Writes are atomic: a temporary file in the same folder, fsync, rename, fsync of the
//! folder — a crash at any moment leaves the previous checkpoint intact.

use crate::adam::Adam;
use crate::config::TrainConfig;
use crate::options::StoredPrecision;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use savae_model::{ModelConfig, Vae};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// The checkpoint format version this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// Position of the run in its data stream: all randomness is a function of
/// `(seed, epoch, batch)` (see `savae_data::order`), so this is the RNG state too.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    pub seed: u64,
    /// Epochs completed.
    pub epoch: usize,
    /// Batches completed in the current epoch (0 at an epoch boundary).
    pub batch: usize,
    pub scheme: String,
}

/// Metadata stored under the safetensors metadata key `savae`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub dataset: String,
    pub model: ModelConfig,
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub rng: RngState,
    pub adam_t: u64,
    pub config: TrainConfig,
    pub valid_elbo: Option<f64>,
    pub best_valid_elbo: Option<f64>,
    /// The epoch (1-based count) at which `best_valid_elbo` was reached; absent in
    /// checkpoints written before early stopping (then taken as the saved epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_epoch: Option<usize>,
    /// Σ loss·examples and examples of the batches done in an interrupted epoch.
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub epoch_examples: usize,
    /// The interrupted epoch's statistics whole (loss sum, examples, fault and
    /// stationarity counters, seconds so far); absent at an epoch boundary and in
    /// checkpoints written before they were carried. `epoch_loss_sum` and
    /// `epoch_examples` repeat two of them for older readers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_stats: Option<crate::trainer::EpochStats>,
    #[serde(default)]
    pub skipped_batches: usize,
    pub savae_version: String,
    /// The vocabulary of a text model, in id order (`<unk>`, `<s>`, `</s>`, words…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<Vec<String>>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub tensors: HashMap<String, Tensor>,
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename + fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .context("checkpoint path has no file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        let hint = if e.raw_os_error() == Some(28) {
            " (the disk is full)"
        } else {
            ""
        };
        bail!(
            "cannot write checkpoint {}{hint}: {e}; the previous checkpoint is intact",
            path.display()
        );
    }
    Ok(())
}

/// Saves the model, optimizer and metadata to `path` atomically.
pub fn save(path: &Path, model: &Vae, adam: Option<&Adam>, meta: &CheckpointMeta) -> Result<()> {
    let mut tensors = weights(model, None)?;
    if let Some(adam) = adam {
        for (i, (name, _)) in model.params.iter().enumerate() {
            tensors.push((
                format!("optim.m.{name}"),
                adam.m[i].to_device(&Device::Cpu)?,
            ));
            tensors.push((
                format!("optim.v.{name}"),
                adam.v[i].to_device(&Device::Cpu)?,
            ));
        }
    }
    write_tensors(path, &tensors, meta)
}

/// Saves the model's weights and the metadata only (no optimizer state: for evaluation,
/// sampling and `init_from`, not for resuming), stored at `precision`, atomically.
pub fn save_weights(
    path: &Path,
    model: &Vae,
    meta: &CheckpointMeta,
    precision: StoredPrecision,
) -> Result<()> {
    let dtype = match precision {
        StoredPrecision::AsTrained => None,
        StoredPrecision::F16 => Some(DType::F16),
    };
    write_tensors(path, &weights(model, dtype)?, meta)
}

/// The model's weights by name on the CPU, converted to `dtype` if given.
fn weights(model: &Vae, dtype: Option<DType>) -> Result<Vec<(String, Tensor)>> {
    model
        .params
        .iter()
        .map(|(name, var)| {
            let t = var.as_tensor().to_device(&Device::Cpu)?;
            let t = match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            };
            Ok((name.to_string(), t))
        })
        .collect()
}

/// Serializes `tensors` with `meta` under the key `savae` and writes them atomically.
fn write_tensors(path: &Path, tensors: &[(String, Tensor)], meta: &CheckpointMeta) -> Result<()> {
    let json = serde_json::to_string(meta)?;
    let md: HashMap<String, String> = [("savae".to_string(), json)].into();
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(md))
        .with_context(|| format!("cannot serialize checkpoint {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads and validates a checkpoint file: header, metadata, format version, and that
/// every tensor is finite. Errors are one line naming the file and the problem.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {p}"))?;
    let (_, st_meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "checkpoint {p} is not a valid safetensors file (truncated or corrupt header): {e}"
        )
    })?;
    let json = st_meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("savae"))
        .with_context(|| format!("checkpoint {p} has no `savae` metadata: not written by savae"))?;
    let meta: CheckpointMeta = serde_json::from_str(json)
        .with_context(|| format!("checkpoint {p}: its `savae` metadata is malformed"))?;
    if meta.format_version != FORMAT_VERSION {
        bail!(
            "checkpoint {p} has format version {} but this savae reads version {FORMAT_VERSION}",
            meta.format_version
        );
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        anyhow::anyhow!("checkpoint {p}: cannot read its tensors (truncated or corrupt): {e}")
    })?;
    for (name, t) in &tensors {
        if !matches!(t.dtype(), DType::F32 | DType::F64 | DType::F16) {
            bail!(
                "checkpoint {p}: tensor {name} has dtype {:?}, expected f32, f64 or f16 (an \
                 export)",
                t.dtype()
            );
        }
        let sum = t
            .to_dtype(DType::F64)?
            .abs()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if !sum.is_finite() {
            bail!("checkpoint {p}: tensor {name} holds non-finite values");
        }
    }
    Ok(Checkpoint { meta, tensors })
}

impl Checkpoint {
    /// The stored vocabulary of a text model (None for images); checked against the model.
    pub fn vocab(&self, path: &Path) -> Result<Option<savae_data::Vocab>> {
        let want = self.meta.model.vocab_size;
        match &self.meta.vocab {
            None if want == 0 => Ok(None),
            None => bail!(
                "checkpoint {}: a text model without its vocabulary in the metadata",
                path.display()
            ),
            Some(words) => {
                if words.len() != want {
                    bail!(
                        "checkpoint {}: its vocabulary has {} words but the model {want}",
                        path.display(),
                        words.len()
                    );
                }
                Ok(Some(
                    savae_data::Vocab::from_words(words.clone())
                        .with_context(|| format!("checkpoint {}", path.display()))?,
                ))
            }
        }
    }

    /// Builds the model the checkpoint describes and loads its weights. Refuses extra
    /// model tensors and names the first missing or mismatched one.
    pub fn model(&self, path: &Path, dtype: DType, device: &Device) -> Result<Vae> {
        let model = Vae::new(&self.meta.model, 0, dtype, device)?;
        self.load_into(&model, path)?;
        Ok(model)
    }

    /// Loads the weights into `model`, whose architecture must match.
    pub fn load_into(&self, model: &Vae, path: &Path) -> Result<()> {
        let src = path.display().to_string();
        for name in self.tensors.keys() {
            if !name.starts_with("optim.") && model.params.get(name).is_none() {
                bail!("{src}: tensor {name} does not belong to the configured architecture");
            }
        }
        model.params.load_from(&self.tensors, &src)
    }

    /// Restores Adam's moments (absent moments are an error when `t > 0`).
    pub fn load_adam(&self, adam: &mut Adam, model: &Vae, path: &Path) -> Result<()> {
        adam.t = self.meta.adam_t;
        for (i, (name, var)) in model.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut adam.m[i]), ("v", &mut adam.v[i])] {
                let key = format!("optim.{kind}.{name}");
                let t = self.tensors.get(&key).with_context(|| {
                    format!(
                        "{}: optimizer tensor {key} is missing: cannot resume exactly",
                        path.display()
                    )
                })?;
                if t.dims() != var.dims() {
                    bail!(
                        "{}: optimizer tensor {key} has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        var.dims()
                    );
                }
                *slot = t.to_dtype(var.dtype())?.to_device(var.device())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::write_atomic;

    #[test]
    fn a_failed_write_reports_the_file_and_keeps_the_old_checkpoint() {
        let dir = std::env::temp_dir().join(format!("savae-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("last.safetensors");
        write_atomic(&path, b"old checkpoint").unwrap();
        // Make the temporary file impossible to create (a folder already has its name),
        // as a full or read-only disk would.
        std::fs::create_dir_all(dir.join(format!(".last.safetensors.tmp.{}", std::process::id())))
            .unwrap();
        let err = write_atomic(&path, b"new checkpoint")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("last.safetensors") && err.contains("previous checkpoint is intact"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"old checkpoint");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! An ordered, named set of trainable parameters (candle `Var`s).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

/// Named parameters in a fixed order (the order of creation). Names follow the
/// checkpoint format, e.g. `decoder.layers.0.weight`.
#[derive(Debug, Clone, Default)]
pub struct ParamSet {
    entries: Vec<(String, Var)>,
}

impl ParamSet {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, name: String, var: Var) {
        self.entries.push((name, var));
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }
    pub fn vars(&self) -> Vec<Var> {
        self.entries.iter().map(|(_, v)| v.clone()).collect()
    }
    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.entries.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
    /// Total number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }
    /// The parameters whose names start with `prefix`.
    pub fn with_prefix(&self, prefix: &str) -> ParamSet {
        ParamSet {
            entries: self
                .entries
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .cloned()
                .collect(),
        }
    }
    /// A name → tensor map of the current values (for saving).
    pub fn to_map(&self) -> HashMap<String, Tensor> {
        self.entries
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }
    /// Overwrites every parameter from `tensors`, which must hold exactly these names
    /// with these shapes. Errors name the first mismatched tensor.
    pub fn load_from(&self, tensors: &HashMap<String, Tensor>, source: &str) -> Result<()> {
        for (name, var) in &self.entries {
            let t = tensors.get(name).with_context(|| {
                format!("{source}: tensor {name} is missing (the configured architecture needs it)")
            })?;
            if t.dims() != var.dims() {
                bail!(
                    "{source}: tensor {name} has shape {:?} but the configured architecture \
                     needs {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&t)
                .with_context(|| format!("{source}: cannot load tensor {name}"))?;
        }
        Ok(())
    }
    /// Converts every parameter to `dtype` on `device` (fresh `Var`s).
    pub fn to(&self, dtype: DType, device: &Device) -> Result<ParamSet> {
        let mut out = ParamSet::new();
        for (n, v) in &self.entries {
            out.push(
                n.clone(),
                Var::from_tensor(&v.as_tensor().to_dtype(dtype)?.to_device(device)?)?,
            );
        }
        Ok(out)
    }
}

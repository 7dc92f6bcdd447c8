//! The `--dataset` names: an image set or a text corpus.

use crate::{DatasetKind, TextSource};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// What `--dataset` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSpec {
    Images(DatasetKind),
    Text(TextSource),
}

impl DataSpec {
    /// `mnist`, `mnist-dynamic`, `ptb` or `text:DIR`.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "mnist" | "mnist-dynamic" => Self::Images(DatasetKind::parse(name)?),
            "ptb" => Self::Text(TextSource::Ptb),
            other => match other.strip_prefix("text:") {
                Some("") => bail!("--dataset text:DIR needs a folder after `text:`"),
                Some(dir) => Self::Text(TextSource::Dir(PathBuf::from(dir))),
                None => bail!(
                    "unknown dataset {other:?}: expected mnist, mnist-dynamic, ptb or text:DIR"
                ),
            },
        })
    }
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text(_))
    }
}

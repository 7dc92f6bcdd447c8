//! The idx format of LeCun's MNIST files: big-endian magic `0x00000803` (u8 images,
//! 3 dimensions) or `0x00000801` (u8 labels, 1 dimension), then the dimensions as u32.

use anyhow::{bail, Result};

/// Images decoded from an idx3 file: `count` rows of `rows * cols` bytes.
#[derive(Debug, Clone)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Parses an idx3 image file (already decompressed). `what` names it in errors.
pub fn parse_images(bytes: &[u8], what: &str) -> Result<IdxImages> {
    if bytes.len() < 16 {
        bail!(
            "{what}: too short for an idx3 header ({} bytes)",
            bytes.len()
        );
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x0803 {
        bail!("{what}: bad magic number {magic:#010x}, expected 0x00000803 (idx3 u8 images)");
    }
    let (count, rows, cols) = (
        be_u32(bytes, 4) as usize,
        be_u32(bytes, 8) as usize,
        be_u32(bytes, 12) as usize,
    );
    let want = count * rows * cols;
    if bytes.len() - 16 != want {
        bail!(
            "{what}: header says {count}×{rows}×{cols} = {want} pixels but the file holds {} \
             (truncated or corrupt)",
            bytes.len() - 16
        );
    }
    Ok(IdxImages {
        count,
        rows,
        cols,
        pixels: bytes[16..].to_vec(),
    })
}

/// Parses an idx1 label file (already decompressed).
pub fn parse_labels(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    if bytes.len() < 8 {
        bail!(
            "{what}: too short for an idx1 header ({} bytes)",
            bytes.len()
        );
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x0801 {
        bail!("{what}: bad magic number {magic:#010x}, expected 0x00000801 (idx1 u8 labels)");
    }
    let count = be_u32(bytes, 4) as usize;
    if bytes.len() - 8 != count {
        bail!(
            "{what}: header says {count} labels but the file holds {}",
            bytes.len() - 8
        );
    }
    let labels = bytes[8..].to_vec();
    if let Some(bad) = labels.iter().find(|&&l| l > 9) {
        bail!("{what}: label {bad} is not a digit 0-9");
    }
    Ok(labels)
}

//! Larochelle's `.amat` text format for the static binarized MNIST: one image per line,
//! 784 values `0`/`1` separated by spaces.

use anyhow::{bail, Result};

/// Parses an `.amat` file (already decompressed) into `rows × 784` values in {0, 1}.
/// Checks every line's length and every value, and the expected number of rows.
pub fn parse(bytes: &[u8], expected_rows: usize, what: &str) -> Result<Vec<f32>> {
    const PIXELS: usize = crate::PIXELS;
    let mut out = Vec::with_capacity(expected_rows * PIXELS);
    let mut rows = 0usize;
    for (lineno, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let mut n = 0usize;
        for tok in line.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
            let v = match tok {
                b"0" => 0.0,
                b"1" => 1.0,
                _ => bail!(
                    "{what}: line {}: value {:?} is not 0 or 1",
                    lineno + 1,
                    String::from_utf8_lossy(tok)
                ),
            };
            out.push(v);
            n += 1;
        }
        if n != PIXELS {
            bail!(
                "{what}: line {} has {n} values, expected {PIXELS} (truncated or corrupt)",
                lineno + 1
            );
        }
        rows += 1;
    }
    if rows != expected_rows {
        bail!("{what}: {rows} images, expected {expected_rows} (truncated or corrupt)");
    }
    Ok(out)
}

//! SHA-256 checks of the shipped data files against `data/SHA256SUMS`.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The sha256 (of the `.gz` file as stored) of every shipped data file, keyed by the
/// path relative to the data directory. Same content as `data/SHA256SUMS`.
pub const KNOWN: &[(&str, &str)] = &[
    (
        "mnist/train-images-idx3-ubyte.gz",
        "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    ),
    (
        "mnist/train-labels-idx1-ubyte.gz",
        "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    ),
    (
        "mnist/t10k-images-idx3-ubyte.gz",
        "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    ),
    (
        "mnist/t10k-labels-idx1-ubyte.gz",
        "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
    ),
    (
        "binarized_mnist/binarized_mnist_train.amat.gz",
        "af247bd6075cf9adc4715459dcd5f13eaa99a2c92d8d81379a05da94770b6c0e",
    ),
    (
        "binarized_mnist/binarized_mnist_valid.amat.gz",
        "533b71bc0198f4d73c54ae5fe6c96fc08dc3cf1b3fae24c5521dbc0452507e38",
    ),
    (
        "binarized_mnist/binarized_mnist_test.amat.gz",
        "32a3c54d03504632bf9f131b4a148c7567aa6fc87da017049b044bdc14c2a0f2",
    ),
    (
        "ptb/ptb.train.txt.gz",
        "270e0c1de69c076ee9be3fb389e0a6a3c849a03664d9a05550c6a98afd63bf4e",
    ),
    (
        "ptb/ptb.valid.txt.gz",
        "2c532ce295a2a82b986b0ab85f39422d4c1a6211cc78d9d4c3b647eb827d56a5",
    ),
    (
        "ptb/ptb.test.txt.gz",
        "c186c58140c532dcf89939356c67f0ceaad98baac97c3eab733c14c9ce427ffa",
    ),
];

/// Hex sha256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads `dir/rel` and checks it against the known checksum of `rel`.
///
/// A missing file gives an error naming the path and where the file comes from.
pub fn read_verified(dir: &Path, rel: &str) -> Result<Vec<u8>> {
    let path = dir.join(rel);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read data file {}: savae ships it in the repository's data/ folder \
             (see data/README.md for its provenance); pass --data-dir to point elsewhere",
            path.display()
        )
    })?;
    if let Some((_, want)) = KNOWN.iter().find(|(name, _)| *name == rel) {
        let got = sha256_hex(&bytes);
        if got != *want {
            bail!(
                "data file {} is corrupt: sha256 {got} differs from the published {want} \
                 (see data/SHA256SUMS); restore it from the repository",
                path.display()
            );
        }
    }
    Ok(bytes)
}

/// Decompresses gzip bytes, naming `what` (a path) on failure.
pub fn gunzip(bytes: &[u8], what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .with_context(|| {
            format!("data file {what} is not a valid gzip stream (truncated or corrupt)")
        })?;
    Ok(out)
}

//! Loaders on the shipped files and on corrupted copies.

use savae_data::{amat, checksum, idx, DatasetKind, ImageData};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data"))
}

#[test]
fn static_mnist_loads_with_published_shapes_and_statistics() {
    let d = ImageData::load(DatasetKind::Mnist, &data_dir()).unwrap();
    assert_eq!(
        (d.train.len, d.valid.len, d.test.len),
        (50_000, 10_000, 10_000)
    );
    assert_eq!(d.train.pixels.len(), 50_000 * 784);
    let mean = d.test.pixels.iter().map(|&p| p as f64).sum::<f64>() / d.test.pixels.len() as f64;
    assert!((mean - 0.1325).abs() < 5e-4, "test mean of ones {mean}");
    assert!(d.train.pixels.iter().all(|&p| p == 0.0 || p == 1.0));
}

#[test]
fn dynamic_mnist_loads_grey_levels_and_binarizes_with_the_seed() {
    let d = ImageData::load(DatasetKind::MnistDynamic, &data_dir()).unwrap();
    assert_eq!(
        (d.train.len, d.valid.len, d.test.len),
        (55_000, 5_000, 10_000)
    );
    assert!(d.train.dynamic && !d.valid.dynamic && !d.test.dynamic);
    assert!(d.train.pixels.iter().any(|&p| p > 0.0 && p < 1.0));
    let idx: Vec<usize> = (0..10).collect();
    let a = d.train.batch(&idx, &mut savae_data::batch_rng(1, 0, 0, 0));
    let b = d.train.batch(&idx, &mut savae_data::batch_rng(1, 0, 0, 0));
    let c = d.train.batch(&idx, &mut savae_data::batch_rng(1, 0, 1, 0));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.iter().all(|&p| p == 0.0 || p == 1.0));
}

#[test]
fn missing_file_names_the_path() {
    let err = ImageData::load(DatasetKind::Mnist, &PathBuf::from("/nonexistent/dir")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("/nonexistent/dir/binarized_mnist/binarized_mnist_train.amat.gz"),
        "{msg}"
    );
    assert!(msg.contains("data/README.md"), "{msg}");
}

#[test]
fn corrupted_shipped_file_fails_its_checksum() {
    let tmp = std::env::temp_dir().join(format!("savae-data-{}", std::process::id()));
    std::fs::create_dir_all(tmp.join("binarized_mnist")).unwrap();
    for s in ["train", "valid", "test"] {
        let rel = format!("binarized_mnist/binarized_mnist_{s}.amat.gz");
        std::fs::copy(data_dir().join(&rel), tmp.join(&rel)).unwrap();
    }
    let rel = "binarized_mnist/binarized_mnist_valid.amat.gz";
    let mut bytes = std::fs::read(tmp.join(rel)).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(tmp.join(rel), &bytes).unwrap();
    let msg = format!(
        "{:#}",
        ImageData::load(DatasetKind::Mnist, &tmp).unwrap_err()
    );
    assert!(
        msg.contains("binarized_mnist_valid.amat.gz") && msg.contains("corrupt"),
        "{msg}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn idx_parser_refuses_bad_magic_and_truncation() {
    let gz = std::fs::read(data_dir().join("mnist/t10k-images-idx3-ubyte.gz")).unwrap();
    let raw = checksum::gunzip(&gz, "t10k").unwrap();
    let ok = idx::parse_images(&raw, "t10k").unwrap();
    assert_eq!((ok.count, ok.rows, ok.cols), (10_000, 28, 28));
    let mut bad = raw.clone();
    bad[3] = 0x01;
    let e = idx::parse_images(&bad, "t10k").unwrap_err().to_string();
    assert!(e.contains("bad magic"), "{e}");
    let e = idx::parse_images(&raw[..raw.len() - 5], "t10k")
        .unwrap_err()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
    let lab = checksum::gunzip(
        &std::fs::read(data_dir().join("mnist/t10k-labels-idx1-ubyte.gz")).unwrap(),
        "l",
    )
    .unwrap();
    let labels = idx::parse_labels(&lab, "labels").unwrap();
    let mut counts = [0usize; 10];
    labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(
        counts,
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    );
    assert!(idx::parse_labels(&raw, "images-as-labels").is_err());
}

#[test]
fn amat_parser_refuses_bad_values_and_short_lines() {
    let line = vec!["0"; 784].join(" ");
    let good = format!("{line}\n{line}\n");
    assert_eq!(amat::parse(good.as_bytes(), 2, "x").unwrap().len(), 1568);
    let e = amat::parse(good.as_bytes(), 3, "x")
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected 3"), "{e}");
    let bad = good.replacen("0", "7", 1);
    assert!(amat::parse(bad.as_bytes(), 2, "x")
        .unwrap_err()
        .to_string()
        .contains("not 0 or 1"));
    let short = format!("{}\n", vec!["1"; 700].join(" "));
    assert!(amat::parse(short.as_bytes(), 1, "x")
        .unwrap_err()
        .to_string()
        .contains("700 values"));
}

#[test]
fn gzip_garbage_is_refused() {
    let e = checksum::gunzip(b"not a gzip stream at all", "f.gz").unwrap_err();
    assert!(format!("{e:#}").contains("f.gz"));
}

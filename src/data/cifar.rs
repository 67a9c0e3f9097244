//! The official CIFAR-10 / CIFAR-100 binary release.
//!
//! CIFAR-10: `data_batch_{1..5}.bin` and `test_batch.bin`, records of 1 label byte + 3072 pixel
//! bytes (1024 R, then G, then B, row-major 32×32). CIFAR-100: `train.bin` and `test.bin`,
//! records of a coarse and a fine label byte + 3072 pixel bytes; we label by the fine class.

use std::path::Path;

use anyhow::{bail, Result};
use image::RgbImage;

use super::files::Entry;
use super::{Dataset, Split};

pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

const PIXELS: usize = 32 * 32 * 3;

/// Whether the entries hold a CIFAR binary release: `Some(label_bytes)`.
pub(crate) fn detect(entries: &[Entry]) -> Option<usize> {
    let has = |name: &str| entries.iter().any(|e| e.path == name);
    if has("data_batch_1.bin") {
        Some(1)
    } else if has("train.bin") && has("test.bin") {
        Some(2)
    } else {
        None
    }
}

pub(crate) fn read(origin: &Path, entries: &[Entry], label_bytes: usize) -> Result<Dataset> {
    let find = |name: &str| -> Result<&Entry> {
        match entries.iter().find(|e| e.path == name) {
            Some(e) => Ok(e),
            None => bail!("{}: CIFAR release without {name}", origin.display()),
        }
    };
    let split = |name: &str, files: &[&str]| -> Result<Split> {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for file in files {
            let bytes = find(file)?.bytes(origin)?;
            let (i, l) = parse_records(&origin.join(file), &bytes, label_bytes)?;
            images.extend(i);
            labels.extend(l);
        }
        Ok(Split::new(name, images, Some(labels)))
    };
    let (splits, names_file) = if label_bytes == 1 {
        let train: Vec<String> = (1..=5).map(|i| format!("data_batch_{i}.bin")).collect();
        let train: Vec<&str> = train.iter().map(String::as_str).collect();
        (
            vec![split("train", &train)?, split("test", &["test_batch.bin"])?],
            "batches.meta.txt",
        )
    } else {
        (
            vec![
                split("train", &["train.bin"])?,
                split("test", &["test.bin"])?,
            ],
            "fine_label_names.txt",
        )
    };
    let classes = match entries.iter().find(|e| e.path == names_file) {
        Some(e) => String::from_utf8_lossy(&e.bytes(origin)?)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        None if label_bytes == 1 => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        None => (0..100).map(|i| format!("class_{i}")).collect(),
    };
    Dataset::labelled(origin, classes, splits)
}

/// Parses the records of one batch file; a size that is not a whole number of records is an error.
pub fn parse_records(
    file: &Path,
    bytes: &[u8],
    label_bytes: usize,
) -> Result<(Vec<RgbImage>, Vec<u32>)> {
    let record = label_bytes + PIXELS;
    if bytes.is_empty() || bytes.len() % record != 0 {
        bail!(
            "{}: truncated or not a CIFAR batch: {} bytes is not a whole number of {record}-byte records",
            file.display(),
            bytes.len()
        );
    }
    let mut images = Vec::with_capacity(bytes.len() / record);
    let mut labels = Vec::with_capacity(bytes.len() / record);
    for rec in bytes.chunks_exact(record) {
        labels.push(rec[label_bytes - 1] as u32);
        let planes = &rec[label_bytes..];
        let mut rgb = Vec::with_capacity(PIXELS);
        for p in 0..1024 {
            rgb.extend([planes[p], planes[1024 + p], planes[2048 + p]]);
        }
        images.push(RgbImage::from_raw(32, 32, rgb).expect("32x32x3 buffer"));
    }
    Ok((images, labels))
}

/// Encodes images and labels as CIFAR-10 records (tests and tools that write a small release).
pub fn encode_records(images: &[RgbImage], labels: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(images.len() * (PIXELS + 1));
    for (img, &label) in images.iter().zip(labels) {
        out.push(label as u8);
        for c in 0..3 {
            out.extend(img.pixels().map(|p| p.0[c]));
        }
    }
    out
}

//! MNIST / Fashion-MNIST idx files, raw or gzipped:
//! `{train,t10k}-images-idx3-ubyte[.gz]` and `{train,t10k}-labels-idx1-ubyte[.gz]`, or with a
//! dot for the last dash (`t10k-images.idx3-ubyte`), as 7-zip unpacks them.
//! Grayscale digits become RGB with three equal channels.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{GrayImage, RgbImage};

use super::files::Entry;
use super::{Dataset, Split};

const FASHION: [&str; 10] = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
];

pub(crate) fn detect(entries: &[Entry]) -> bool {
    entries
        .iter()
        .any(|e| canonical(e.name()) == "train-images-idx3-ubyte")
}

/// A file's name as the official release spells it: no `.gz`, a dash before `idx`.
fn canonical(name: &str) -> String {
    let raw = name.strip_suffix(".gz").unwrap_or(name);
    raw.replacen(".idx", "-idx", 1)
}

pub(crate) fn read(origin: &Path, entries: &[Entry]) -> Result<Dataset> {
    let load = |stem: &str| -> Result<Vec<u8>> {
        let Some(e) = entries.iter().find(|e| canonical(e.name()) == stem) else {
            bail!("{}: idx release without {stem}[.gz]", origin.display());
        };
        let raw = e.bytes(origin)?;
        if raw.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_end(&mut out)
                .with_context(|| format!("{}: broken gzip data", origin.join(&e.path).display()))?;
            Ok(out)
        } else {
            Ok(raw.into_owned())
        }
    };
    let split = |name: &str, prefix: &str| -> Result<Split> {
        let images_file = format!("{prefix}-images-idx3-ubyte");
        let labels_file = format!("{prefix}-labels-idx1-ubyte");
        let images = parse_images(&images_file, &load(&images_file)?)?;
        let labels = parse_labels(&labels_file, &load(&labels_file)?)?;
        if images.len() != labels.len() {
            bail!(
                "{}: {} images but {} labels",
                origin.join(&images_file).display(),
                images.len(),
                labels.len()
            );
        }
        Ok(Split::new(name, images, Some(labels)))
    };
    let fashion = origin.to_string_lossy().to_lowercase().contains("fashion");
    let classes = (0..10)
        .map(|i| {
            if fashion {
                FASHION[i].to_string()
            } else {
                i.to_string()
            }
        })
        .collect();
    let splits = vec![split("train", "train")?, split("test", "t10k")?];
    Dataset::labelled(origin, classes, splits)
}

fn header(file: &str, bytes: &[u8], magic: u32, dims: usize) -> Result<Vec<usize>> {
    let word = |i: usize| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap()) as usize;
    if bytes.len() < 4 * (dims + 1) || word(0) as u32 != magic {
        bail!("{file}: not an idx file (magic number {magic:#010x} expected)");
    }
    let shape: Vec<usize> = (1..=dims).map(word).collect();
    let expected = 4 * (dims + 1) + shape.iter().product::<usize>();
    if bytes.len() != expected {
        bail!(
            "{file}: truncated: {} bytes where the header promises {expected}",
            bytes.len()
        );
    }
    Ok(shape)
}

fn parse_images(file: &str, bytes: &[u8]) -> Result<Vec<RgbImage>> {
    let shape = header(file, bytes, 0x803, 3)?;
    let (h, w) = (shape[1], shape[2]);
    if h == 0 || w == 0 {
        bail!("{file}: images of {w}x{h}, with no pixels");
    }
    Ok(bytes[16..]
        .chunks_exact(h * w)
        .map(|px| {
            let gray = GrayImage::from_raw(w as u32, h as u32, px.to_vec()).expect("sized buffer");
            image::DynamicImage::ImageLuma8(gray).to_rgb8()
        })
        .collect())
}

fn parse_labels(file: &str, bytes: &[u8]) -> Result<Vec<u32>> {
    header(file, bytes, 0x801, 1)?;
    Ok(bytes[8..].iter().map(|&b| b as u32).collect())
}

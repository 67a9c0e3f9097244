//! Data sources, decoded once into memory as 8-bit RGB, and the batch loader.
//!
//! [`Dataset::open`] takes a path and recognises what it holds:
//! - the official CIFAR-10 / CIFAR-100 binary release (folder or its `.tar.gz`),
//! - MNIST / Fashion-MNIST idx files (raw or gzipped),
//! - an image folder (`<split>/<class>/img`, `<class>/img` or flat), as a folder or a `.tar(.gz)`,
//! - a dataset by name: `cifar10`, `cifar100`, `fashion-mnist` (a local copy or a download).

mod cifar;
mod download;
mod files;
mod idx;
mod image_folder;
mod loader;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use image::RgbImage;

pub use cifar::{
    encode_records as encode_cifar_records, parse_records as parse_cifar_records, CIFAR10_CLASSES,
};
pub use download::{data_dir, download, download_named, resolve};
pub use image_folder::decode;
pub use loader::{Batch, Loader};

/// How to load a source.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Resize images whose shorter side is longer than this, once, at load.
    pub load_size: Option<u32>,
    /// Skip unreadable files (and count them) instead of failing.
    pub skip_bad: bool,
}

/// One split of a dataset (`train`, `test`, ...): images and, for labelled data, one label each.
/// Cheap to clone: the pixels are shared.
#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    pub images: Arc<Vec<RgbImage>>,
    pub labels: Option<Arc<Vec<u32>>>,
    /// Each image's path inside an image folder or archive; `None` for CIFAR and idx releases.
    pub files: Option<Arc<Vec<String>>>,
}

impl Split {
    pub fn new(name: &str, images: Vec<RgbImage>, labels: Option<Vec<u32>>) -> Self {
        Split {
            name: name.to_string(),
            images: Arc::new(images),
            labels: labels.map(Arc::new),
            files: None,
        }
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// The first `n` images in an order that mixes the classes (every `len/n`-th image).
    pub fn subset(&self, n: usize) -> Split {
        if n >= self.len() {
            return self.clone();
        }
        let stride = self.len() as f64 / n as f64;
        let pick: Vec<usize> = (0..n).map(|i| (i as f64 * stride) as usize).collect();
        let mut subset = Split::new(
            &self.name,
            pick.iter().map(|&i| self.images[i].clone()).collect(),
            self.labels
                .as_ref()
                .map(|l| pick.iter().map(|&i| l[i]).collect()),
        );
        subset.files =
            (self.files.as_ref()).map(|f| Arc::new(pick.iter().map(|&i| f[i].clone()).collect()));
        subset
    }

    /// Each image's name: its path inside the source, or `<split>/<index>` in a CIFAR or idx
    /// release (the index torchvision's datasets use).
    pub fn file_names(&self) -> Vec<String> {
        match &self.files {
            Some(files) => files.to_vec(),
            None => (0..self.len())
                .map(|i| format!("{}/{i}", self.name))
                .collect(),
        }
    }

    /// At most `n` images, as `subset` picks them; 0 keeps them all (a recipe's "no limit").
    pub fn limit(&self, n: usize) -> Split {
        if n == 0 {
            self.clone()
        } else {
            self.subset(n)
        }
    }

    fn images_mut(&mut self) -> &mut Vec<RgbImage> {
        Arc::get_mut(&mut self.images).expect("split being built")
    }

    fn files_mut(&mut self) -> &mut Vec<String> {
        Arc::get_mut(self.files.get_or_insert_with(Default::default)).expect("split being built")
    }

    fn labels_mut(&mut self) -> &mut Vec<u32> {
        Arc::get_mut(self.labels.as_mut().expect("labelled split")).expect("split being built")
    }
}

/// A decoded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Where it was read from.
    pub origin: String,
    /// Class names, indexed by label; empty for unlabelled data.
    pub classes: Vec<String>,
    pub splits: Vec<Split>,
    /// Files that could not be read, with why (only with `skip_bad`).
    pub skipped: Vec<String>,
    /// Files of an image folder that are not images by their extension (`readme.txt`), ignored.
    pub ignored: Vec<String>,
}

impl Dataset {
    /// Reads and decodes the source at `path` (see the module docs for what it recognises), or
    /// the dataset `path` names (`cifar10`, `cifar100`, `fashion-mnist`; see [`resolve`]).
    pub fn open(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Dataset> {
        let named = match path.as_ref() {
            p if p.exists() => None,
            p => p.to_str().map(resolve).transpose()?.flatten(),
        };
        let path = named.as_deref().unwrap_or(path.as_ref());
        let entries = files::list(path)?;
        if let Some(label_bytes) = cifar::detect(&entries) {
            cifar::read(path, &entries, label_bytes)
        } else if idx::detect(&entries) {
            idx::read(path, &entries)
        } else {
            image_folder::read(path, &entries, opts)
        }
    }

    /// The split called `name`, or an error that lists the splits there are.
    pub fn split(&self, name: &str) -> Result<&Split> {
        match self.splits.iter().find(|s| s.name == name) {
            Some(s) => Ok(s),
            None => {
                let names: Vec<&str> = self.splits.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "{}: no split '{name}' (it has: {})",
                    self.origin,
                    names.join(", ")
                )
            }
        }
    }

    /// A labelled dataset, checked: every label names a class.
    fn labelled(origin: &Path, classes: Vec<String>, splits: Vec<Split>) -> Result<Dataset> {
        let dataset = Dataset {
            origin: origin.display().to_string(),
            classes,
            splits,
            skipped: vec![],
            ignored: vec![],
        };
        for split in &dataset.splits {
            if let Some(bad) = split
                .labels
                .iter()
                .flat_map(|l| l.iter())
                .find(|&&l| l as usize >= dataset.classes.len())
            {
                bail!(
                    "{}: split '{}' has label {bad} but only {} classes",
                    dataset.origin,
                    split.name,
                    dataset.classes.len()
                );
            }
        }
        Ok(dataset)
    }

    /// A readable summary: counts per split and class, image sizes, channels.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "source: {}", self.origin);
        let _ = writeln!(
            out,
            "classes: {}",
            if self.classes.is_empty() {
                "none (unlabelled)".into()
            } else {
                self.classes.len().to_string()
            }
        );
        for split in &self.splits {
            let sizes: std::collections::BTreeSet<(u32, u32)> =
                split.images.iter().map(|i| i.dimensions()).collect();
            let size = match (sizes.first(), sizes.last()) {
                (Some(a), Some(b)) if a == b => format!("{}x{}x3", a.0, a.1),
                (Some(_), Some(_)) => {
                    let (w, h): (Vec<u32>, Vec<u32>) = sizes.iter().copied().unzip();
                    format!(
                        "{}-{} x {}-{} x3 (varied)",
                        w.iter().min().unwrap(),
                        w.iter().max().unwrap(),
                        h.iter().min().unwrap(),
                        h.iter().max().unwrap()
                    )
                }
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "split {}: {} images, {}",
                split.name,
                split.len(),
                size
            );
            if let Some(labels) = &split.labels {
                let mut counts = vec![0usize; self.classes.len()];
                labels.iter().for_each(|&l| counts[l as usize] += 1);
                for (name, n) in self.classes.iter().zip(counts) {
                    let _ = writeln!(out, "  {name:<16} {n}");
                }
            }
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out, "skipped {} unreadable files", self.skipped.len());
        }
        if let Some(first) = self.ignored.first() {
            let _ = writeln!(
                out,
                "ignored {} files that are not images by their extension (like {first})",
                self.ignored.len()
            );
        }
        out
    }
}

/// A progress bar on stderr, hidden when stderr is not a terminal.
pub(crate) fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {pos}/{len} [{elapsed}<{eta}, {per_sec}]",
        )
        .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

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
use rand::SeedableRng;

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

    /// `n` of the images (all if `n` is not below the split's size), in dataset order. A
    /// labelled split is drawn per class, seeded: each class gets its share of `n` in proportion
    /// to its images and, when `n` allows, at least one. An unlabelled split is spread evenly
    /// (every `len/n`-th image).
    pub fn subset(&self, n: usize, seed: u64) -> Split {
        if n >= self.len() {
            return self.clone();
        }
        let pick = match &self.labels {
            Some(labels) => stratified(labels, n, seed),
            None => {
                let stride = self.len() as f64 / n as f64;
                (0..n).map(|i| (i as f64 * stride) as usize).collect()
            }
        };
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

    /// At most `n` images to work on, as [`Split::subset`] draws them; 0 keeps them all (a
    /// recipe's "no limit"). `key` names the limit in messages (`finetune.train_limit`), and
    /// `classes` the labels. A labelled split is refused a limit below its number of classes:
    /// a class left out would make every accuracy measured on it wrong. The per-class counts
    /// taken are logged.
    pub fn limit(&self, key: &str, n: usize, seed: u64, classes: &[String]) -> Result<Split> {
        if n == 0 || n >= self.len() {
            return Ok(self.clone());
        }
        let present = self.class_counts().len();
        if self.labels.is_some() && n < present {
            bail!(
                "{key} = {n}: split '{}' has {present} classes, so {n} images cannot hold one of each (use at least {present}, or 0 for all)",
                self.name
            );
        }
        let subset = self.subset(n, seed);
        tracing::info!(
            "{key} = {n}: {n} of the {} images of split '{}'{}",
            self.len(),
            self.name,
            match subset.labels.is_some() {
                true => format!(" ({})", subset.describe_counts(classes)),
                false => String::new(),
            }
        );
        Ok(subset)
    }

    /// Images per label, for the labels present (empty for an unlabelled split).
    pub fn class_counts(&self) -> std::collections::BTreeMap<u32, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for &label in self.labels.iter().flat_map(|l| l.iter()) {
            *counts.entry(label).or_insert(0) += 1;
        }
        counts
    }

    /// The per-class counts as a user reads them: `cat 7, dog 1` (`classes` names the labels).
    pub fn describe_counts(&self, classes: &[String]) -> String {
        let counts: Vec<String> = self
            .class_counts()
            .iter()
            .map(|(&label, n)| format!("{} {n}", class_name(classes, label)))
            .collect();
        counts.join(", ")
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

/// The name of `label`, or the label itself where `classes` does not name it.
fn class_name(classes: &[String], label: u32) -> String {
    classes
        .get(label as usize)
        .cloned()
        .unwrap_or_else(|| label.to_string())
}

/// The indices of `n` of `labels` (fewer than there are), in order: per class, in proportion
/// to its images (largest remainders), at least one each when `n` allows, drawn by `seed`.
fn stratified(labels: &[u32], n: usize, seed: u64) -> Vec<usize> {
    let mut by_class: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, &label) in labels.iter().enumerate() {
        by_class.entry(label).or_default().push(i);
    }
    let counts: Vec<usize> = by_class.values().map(Vec::len).collect();
    let shares = shares(&counts, n);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut pick: Vec<usize> = by_class
        .values()
        .zip(shares)
        .flat_map(|(members, share)| {
            rand::seq::index::sample(&mut rng, members.len(), share)
                .into_iter()
                .map(|j| members[j])
                .collect::<Vec<_>>()
        })
        .collect();
    pick.sort_unstable();
    pick
}

/// `n` split over classes of `counts` images in proportion (largest remainders, ties to the
/// first class); then, if `n` is at least the number of classes, a class left with none takes
/// one from the largest share.
fn shares(counts: &[usize], n: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    let mut shares: Vec<usize> = counts.iter().map(|&c| n * c / total).collect();
    let mut by_remainder: Vec<usize> = (0..counts.len()).collect();
    by_remainder.sort_by_key(|&i| std::cmp::Reverse(n * counts[i] % total));
    let short = n - shares.iter().sum::<usize>();
    for &i in &by_remainder[..short] {
        shares[i] += 1;
    }
    if n >= counts.len() {
        while let Some(empty) = shares.iter().position(|&s| s == 0) {
            let largest = (0..shares.len())
                .max_by_key(|&i| shares[i])
                .expect("a class");
            shares[largest] -= 1;
            shares[empty] += 1;
        }
    }
    shares
}

/// Checks that `train` holds images of every class of `test`: classes are matched by name, and
/// a test image of a class the training split lacks can never be classified right, so an
/// evaluation of it is refused, naming each such class and its images.
pub fn check_eval_classes(train: &Split, test: &Split, classes: &[String]) -> Result<()> {
    let known = train.class_counts();
    let missing: Vec<String> = test
        .class_counts()
        .into_iter()
        .filter(|(label, _)| !known.contains_key(label))
        .map(|(label, n)| format!("'{}' ({n} images)", class_name(classes, label)))
        .collect();
    if !missing.is_empty() {
        bail!(
            "split '{}' has classes that split '{}' lacks: {}; no classifier or kNN bank trained on '{}' can name them (add their training images, or move them out of '{}')",
            test.name,
            train.name,
            missing.join(", "),
            train.name,
            test.name
        );
    }
    Ok(())
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
        if opts.load_size == Some(0) {
            bail!("load size 0 (--load-size, data.load_size): images would keep no pixels");
        }
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
                for (name, n) in self.classes.iter().zip(&counts) {
                    let _ = writeln!(out, "  {name:<16} {n}");
                }
                let lacking: Vec<&str> = (self.classes.iter().zip(&counts))
                    .filter(|(_, &n)| n == 0)
                    .map(|(name, _)| name.as_str())
                    .collect();
                if !lacking.is_empty() {
                    let _ = writeln!(out, "split {} lacks: {}", split.name, lacking.join(", "));
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

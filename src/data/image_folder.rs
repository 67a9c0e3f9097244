//! Image folders: `root/<split>/<class>/*.jpg`, `root/<class>/*.jpg` or a flat `root/*.jpg`
//! (unlabelled). Any format the `image` crate decodes; grayscale, RGBA and 16-bit become 8-bit RGB.
//! Files without an image extension ([`files::IMAGE_EXTENSIONS`]) are ignored and counted, as
//! torchvision's `ImageFolder` ignores them.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{bail, Result};
use image::RgbImage;
use rayon::prelude::*;

use super::files::{self, Entry};
use super::{Dataset, LoadOptions, Split};

pub(crate) fn read(origin: &Path, entries: &[Entry], opts: &LoadOptions) -> Result<Dataset> {
    let (files, ignored): (Vec<&Entry>, Vec<&Entry>) = entries
        .iter()
        .filter(|e| !e.is_dir())
        .partition(|e| files::is_image_name(e.name()));
    if files.is_empty() {
        let what = match ignored.first() {
            Some(other) => format!(
                "{} files, none with an image extension (like {}); expected one of: {}",
                ignored.len(),
                other.path,
                files::IMAGE_EXTENSIONS.join(", ")
            ),
            None => "an empty folder".into(),
        };
        bail!("{}: no images found ({what})", origin.display());
    }
    let depth = files[0].path.matches('/').count();
    if let Some(odd) = files.iter().find(|e| e.path.matches('/').count() != depth) {
        bail!(
            "{}: mixed layout: {} and {} are at different depths; expected <split>/<class>/image, \
             <class>/image or a flat folder of images",
            origin.display(),
            files[0].path,
            odd.path
        );
    }
    if depth > 2 {
        bail!(
            "{}: images nested {} folders deep (like {}); expected at most <split>/<class>/image",
            origin.display(),
            depth,
            files[0].path
        );
    }

    // Folders at the class level must hold images: an empty class is a mistake worth naming.
    if depth >= 1 {
        for dir in entries
            .iter()
            .filter(|e| e.is_dir() && e.path.matches('/').count() == depth - 1)
        {
            let prefix = format!("{}/", dir.path);
            if !files.iter().any(|f| f.path.starts_with(&prefix)) {
                bail!(
                    "{}: class folder {} has no images",
                    origin.display(),
                    dir.path
                );
            }
        }
    }

    let class_of = |path: &str| -> Option<String> {
        (depth >= 1).then(|| path.split('/').nth(depth - 1).unwrap_or("").to_string())
    };
    let classes: Vec<String> = files
        .iter()
        .filter_map(|f| class_of(&f.path))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let split_of = |path: &str| -> String {
        if depth == 2 {
            path.split('/').next().unwrap_or("").to_string()
        } else {
            "train".to_string()
        }
    };

    let progress = super::progress_bar(files.len() as u64, "decoding images");
    let decoded: Vec<Result<RgbImage, String>> = files
        .par_iter()
        .map(|f| {
            let out = f.bytes(origin).map_err(|e| e.to_string()).and_then(|b| {
                decode(&b, opts.load_size)
                    .map_err(|e| format!("{}: {e}", origin.join(&f.path).display()))
            });
            progress.inc(1);
            out
        })
        .collect();
    progress.finish_and_clear();

    let bad: Vec<String> = decoded
        .iter()
        .filter_map(|d| d.as_ref().err().cloned())
        .collect();
    if !bad.is_empty() && !opts.skip_bad {
        let shown: Vec<&str> = bad.iter().take(10).map(String::as_str).collect();
        bail!(
            "{} of {} files are not readable images (pass --skip-bad to skip them):\n  {}{}",
            bad.len(),
            files.len(),
            shown.join("\n  "),
            if bad.len() > 10 { "\n  ..." } else { "" }
        );
    }

    let mut splits: Vec<Split> = Vec::new();
    for (f, img) in files.iter().zip(decoded) {
        let Ok(img) = img else { continue };
        let name = split_of(&f.path);
        if splits.last().map(|s| s.name != name).unwrap_or(true) {
            splits.push(Split::new(&name, vec![], class_of(&f.path).map(|_| vec![])));
        }
        let split = splits.last_mut().unwrap();
        split.images_mut().push(img);
        split.files_mut().push(f.path.clone());
        if let Some(class) = class_of(&f.path) {
            let label = classes.binary_search(&class).expect("class listed") as u32;
            split.labels_mut().push(label);
        }
    }
    if splits.is_empty() {
        bail!("{}: no readable images", origin.display());
    }
    Ok(Dataset {
        origin: origin.display().to_string(),
        classes,
        splits,
        skipped: bad,
        ignored: ignored.iter().map(|e| e.path.clone()).collect(),
    })
}

/// Decodes one image (format guessed from its bytes) to 8-bit RGB; an image without pixels
/// (0 wide or high) is an error. With `load_size`, an image
/// whose shorter side is longer than that is resized once so its shorter side equals it.
pub fn decode(bytes: &[u8], load_size: Option<u32>) -> Result<RgbImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format()?;
    if reader.format().is_none() {
        bail!("not an image file");
    }
    let img = reader.decode()?.to_rgb8();
    if img.width() == 0 || img.height() == 0 {
        bail!("has no pixels ({}x{})", img.width(), img.height());
    }
    match load_size {
        Some(s) if img.width().min(img.height()) > s => {
            let scale = s as f64 / img.width().min(img.height()) as f64;
            let w = ((img.width() as f64 * scale).round() as u32).max(1);
            let h = ((img.height() as f64 * scale).round() as u32).max(1);
            Ok(crate::augment::ops::resize(&img, w, h))
        }
        _ => Ok(img),
    }
}

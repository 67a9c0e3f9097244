//! Datasets by name, and downloads of their official files, MD5-checked before they are kept.
//!
//! `cifar10`, `cifar100` and `fashion-mnist` name datasets wherever a data source is asked for
//! (`--data cifar10`, `source = "cifar10"` in a recipe). A name resolves to a copy in the data
//! folder ([`data_dir`]: `$SELFSUP_DATA`, else the platform's cache folder) when one is there, in
//! any of the forms it is published or shared in, or where a system package installed it
//! ([`system_datasets`]: Debian's `/usr/share/datasets`); otherwise the official files are
//! downloaded into the data folder once. Archives are kept as they are:
//! [`super::Dataset::open`] reads `.tar.gz` files directly.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

/// A published file: where it lives and the MD5 its publisher gives.
struct Archive {
    url: &'static str,
    file: &'static str,
    md5: &'static str,
}

const CIFAR10_BINARY: Archive = Archive {
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    file: "cifar-10-binary.tar.gz",
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
};

const CIFAR100_BINARY: Archive = Archive {
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    file: "cifar-100-binary.tar.gz",
    md5: "03b5dce01913d631647c71ecec9e9cb8",
};

/// Fashion-MNIST's four idx files (Xiao et al. 2017), with the MD5s torchvision checks.
const FASHION_MNIST: [Archive; 4] = [
    Archive {
        url:
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
        file: "train-images-idx3-ubyte.gz",
        md5: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    },
    Archive {
        url:
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz",
        file: "train-labels-idx1-ubyte.gz",
        md5: "25c81989df183df01b3e8a0aad5dffbe",
    },
    Archive {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
        file: "t10k-images-idx3-ubyte.gz",
        md5: "bef4ecab320f06d8554ea6380940ec79",
    },
    Archive {
        url: "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
        file: "t10k-labels-idx1-ubyte.gz",
        md5: "bb300cfdad3c16e7a12a480ee83cd310",
    },
];

/// A dataset known by name: the forms a local copy may take in the data folder (files or
/// folders, first found wins), the folder a system package installs it in (under
/// [`system_datasets`]), and the official files to download (into `folder` of the data folder
/// when set).
struct Known {
    name: &'static str,
    local: &'static [&'static str],
    system: Option<&'static str>,
    files: &'static [Archive],
    folder: Option<&'static str>,
}

const KNOWN: [Known; 3] = [
    Known {
        name: "cifar10",
        // The JPEG copy first: the one this repository's benchmarks were measured on.
        local: &[
            "cifar10-jpeg.tar.gz",
            "cifar-10-binary.tar.gz",
            "cifar-10-batches-bin",
        ],
        system: None,
        files: &[CIFAR10_BINARY],
        folder: None,
    },
    Known {
        name: "cifar100",
        local: &["cifar-100-binary.tar.gz", "cifar-100-binary"],
        system: None,
        files: &[CIFAR100_BINARY],
        folder: None,
    },
    Known {
        name: "fashion-mnist",
        local: &["fashion-mnist"],
        // Debian's package dataset-fashion-mnist.
        system: Some("fashion-mnist"),
        files: &FASHION_MNIST,
        folder: Some("fashion-mnist"),
    },
];

/// The environment variable naming the data folder.
const DATA_ENV: &str = "SELFSUP_DATA";
/// The environment variable naming a mirror to download from instead of the publishers (its
/// URL with each file's name appended).
const MIRROR_ENV: &str = "SELFSUP_DATA_MIRROR";
/// The environment variable naming the folder system packages install datasets in, in place
/// of [`SYSTEM_DATASETS`] (tests point it at a folder they build in that layout).
const SYSTEM_ENV: &str = "SELFSUP_SYSTEM_DATASETS";
/// Where Debian's dataset packages install their files (`dataset-fashion-mnist`: the four
/// gzipped idx files in `fashion-mnist/`).
const SYSTEM_DATASETS: &str = "/usr/share/datasets";

/// Where datasets named by name are looked for and downloaded: `$SELFSUP_DATA`, else
/// `$XDG_CACHE_HOME/selfsup`, else `~/.cache/selfsup`.
pub fn data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(DATA_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("selfsup")
}

/// Where system packages install datasets: `$SELFSUP_SYSTEM_DATASETS`, else `/usr/share/datasets`.
fn system_datasets() -> PathBuf {
    std::env::var_os(SYSTEM_ENV)
        .filter(|d| !d.is_empty())
        .map_or_else(|| PathBuf::from(SYSTEM_DATASETS), PathBuf::from)
}

/// The local path of the dataset called `name` (`cifar10`, `cifar100`, `fashion-mnist`): a
/// copy in [`data_dir`] or where a system package installed it, or the official files
/// downloaded into [`data_dir`] now. `None` when `name` names no dataset; an error says what
/// was looked for where, and why the download failed.
pub fn resolve(name: &str) -> Result<Option<PathBuf>> {
    let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
        return Ok(None);
    };
    let dir = data_dir();
    // A folder of a multi-file dataset counts only whole: a download broken off after some
    // files leaves one that does not.
    let whole =
        |p: &Path| known.folder.is_none() || known.files.iter().all(|f| p.join(f.file).exists());
    let system = known.system.map(|s| system_datasets().join(s));
    let found = (known.local.iter().map(|l| dir.join(l)))
        .chain(system.clone())
        .find(|p| p.exists() && whole(p));
    if found.is_some() {
        return Ok(found);
    }
    let mut looked: Vec<String> = known.local.iter().map(|l| l.to_string()).collect();
    looked.extend(system.map(|s| s.display().to_string()));
    download_named(name, &dir).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "dataset {name}: no copy in {} (looked for {}; set {DATA_ENV} to a folder that holds one), and the download failed: {e:#}",
            dir.display(),
            looked.join(", ")
        )
    })
}

/// Downloads the official files of the dataset `name` into `dir` (a file already there with
/// the right MD5 is kept), from its publisher or from `$SELFSUP_DATA_MIRROR`; returns the path
/// to open: the archive, or the folder of a multi-file dataset.
pub fn download_named(name: &str, dir: &Path) -> Result<PathBuf> {
    let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
        let names: Vec<&str> = KNOWN.iter().map(|k| k.name).collect();
        bail!("unknown dataset '{name}' (known: {})", names.join(", "));
    };
    let target = known.folder.map_or(dir.to_path_buf(), |f| dir.join(f));
    let mirror = std::env::var(MIRROR_ENV).ok();
    for a in known.files {
        let url = match &mirror {
            Some(m) => format!("{}/{}", m.trim_end_matches('/'), a.file),
            None => a.url.to_string(),
        };
        tracing::info!("downloading {url} into {}", target.display());
        download(&url, a.md5, &target, a.file)?;
    }
    Ok(match known.folder {
        Some(_) => target,
        None => target.join(known.files[0].file),
    })
}

/// Downloads `url` into `out_dir/file` unless a file with the right MD5 is already there.
/// The bytes go to a `.part` file first; it is renamed only once its length and MD5 are right,
/// so an interrupted or corrupted download never looks like a good one.
pub fn download(url: &str, md5: &str, out_dir: &Path, file: &str) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let target = out_dir.join(file);
    if target.exists() && md5_of_file(&target)? == md5 {
        tracing::info!("{} is already there and its MD5 matches", target.display());
        return Ok(target);
    }
    let response = ureq::get(url)
        .call()
        .with_context(|| format!("cannot download {url}"))?;
    let expected_len: Option<u64> = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok());
    let part = out_dir.join(format!("{file}.part"));
    let result = (|| -> Result<()> {
        let mut out = std::fs::File::create(&part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        let mut reader = response.into_reader();
        let mut hasher = Md5::new();
        let bar = super::progress_bar(expected_len.unwrap_or(0), file);
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0u64;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => bail!("download of {url} broke off after {got} bytes: {e}"),
            };
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
            got += n as u64;
            bar.set_position(got);
        }
        bar.finish_and_clear();
        out.sync_all()?;
        if let Some(len) = expected_len {
            if got != len {
                bail!("download of {url} is truncated: {got} of {len} bytes");
            }
        }
        let actual = hex(&hasher.finalize());
        if actual != md5 {
            bail!("checksum mismatch for {url}: MD5 {actual}, expected {md5}");
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    std::fs::rename(&part, &target)?;
    Ok(target)
}

fn md5_of_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Md5::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

//! Downloads an official archive and verifies its MD5 before it is kept.
//! The archive is kept as it is: [`super::Dataset::open`] reads `.tar.gz` files directly.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use md5::{Digest, Md5};

/// A published archive: where it lives and the MD5 its publisher gives.
#[derive(Debug, Clone)]
pub struct Archive {
    pub name: &'static str,
    pub url: &'static str,
    pub file: &'static str,
    pub md5: &'static str,
}

pub const CIFAR10_BINARY: Archive = Archive {
    name: "cifar10",
    url: "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    file: "cifar-10-binary.tar.gz",
    md5: "c32a1d4ab5d03f1284b67883e8d87530",
};

pub const CIFAR100_BINARY: Archive = Archive {
    name: "cifar100",
    url: "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
    file: "cifar-100-binary.tar.gz",
    md5: "03b5dce01913d631647c71ecec9e9cb8",
};

impl Archive {
    pub fn named(name: &str) -> Result<Archive> {
        match name {
            "cifar10" => Ok(CIFAR10_BINARY),
            "cifar100" => Ok(CIFAR100_BINARY),
            other => bail!("unknown dataset '{other}' to download (known: cifar10, cifar100)"),
        }
    }
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

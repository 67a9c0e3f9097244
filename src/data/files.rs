//! The files of a source, read the same way from a folder or from a `.tar` / `.tar.gz` archive.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flate2::read::GzDecoder;

/// One file or folder of a source, with a path relative to the source's root ('/'-separated).
pub(crate) struct Entry {
    pub path: String,
    pub content: Content,
}

pub(crate) enum Content {
    Dir,
    /// Bytes already read (archive members).
    Bytes(Vec<u8>),
    /// A file on disk, read when needed so that decoding can run in parallel.
    File(PathBuf),
}

impl Entry {
    pub fn is_dir(&self) -> bool {
        matches!(self.content, Content::Dir)
    }

    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }

    pub fn bytes(&self, origin: &Path) -> Result<std::borrow::Cow<'_, [u8]>> {
        match &self.content {
            Content::Bytes(b) => Ok(std::borrow::Cow::Borrowed(b)),
            Content::File(p) => Ok(std::borrow::Cow::Owned(
                std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?,
            )),
            Content::Dir => bail!("{} is a folder", origin.join(&self.path).display()),
        }
    }
}

/// The extensions of the image files a source may hold (compared case-insensitively): those of
/// torchvision's `ImageFolder` that this build decodes, plus `.gif`. The one place that decides
/// what an image file is: other files (`readme.txt`, `labels.csv`, `LICENSE`) are ignored and
/// counted. The format itself is sniffed from the bytes, so a PNG named `.jpg` still decodes.
pub(crate) const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "tif", "tiff", "webp", "gif",
];

/// Whether a file name has one of [`IMAGE_EXTENSIONS`].
pub(crate) fn is_image_name(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known))
    })
}

/// Whether `path` names a tar archive (by its extension).
pub(crate) fn is_archive(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    [".tar", ".tar.gz", ".tgz"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Every file and folder under `root`, sorted by path, hidden ones (`.name`) left out; links
/// are followed (see [`walk`]).
/// The single top folder that wraps everything (`cifar10/...`) is stripped.
pub(crate) fn list(root: &Path) -> Result<Vec<Entry>> {
    let mut entries = if root.is_dir() {
        let mut out = Vec::new();
        let real = root
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", root.display()))?;
        walk(root, "", &mut vec![real], &mut out)?;
        out
    } else if root.is_file() && is_archive(root) {
        read_archive(root)?
    } else if root.exists() {
        bail!(
            "{}: not a folder or a .tar/.tar.gz archive of one",
            root.display()
        );
    } else {
        bail!("{}: no such file or folder", root.display());
    };
    entries.retain(|e| !e.path.split('/').any(|part| part.starts_with('.')));
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    strip_common_top(&mut entries);
    Ok(entries)
}

/// Lists `dir` into `out`, following links to files and folders. `ancestors` holds the real
/// paths of the folders above: a link back to one of them (a cycle) is skipped with a warning.
fn walk(
    dir: &Path,
    prefix: &str,
    ancestors: &mut Vec<PathBuf>,
    out: &mut Vec<Entry>,
) -> Result<()> {
    let read = std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for item in read {
        let item = item.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = item.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let full = item.path();
        let meta = match std::fs::metadata(&full) {
            Ok(meta) => meta,
            Err(_) if full.is_symlink() => bail!(
                "{}: a link to {}, which does not exist",
                full.display(),
                std::fs::read_link(&full).unwrap_or_default().display()
            ),
            Err(e) => bail!("cannot read {}: {e}", full.display()),
        };
        if meta.is_dir() {
            let real = full
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", full.display()))?;
            if ancestors.contains(&real) {
                tracing::warn!(
                    "{}: a link back to {} (a cycle), skipped",
                    full.display(),
                    real.display()
                );
                continue;
            }
            out.push(Entry {
                path: path.clone(),
                content: Content::Dir,
            });
            ancestors.push(real);
            walk(&full, &path, ancestors, out)?;
            ancestors.pop();
        } else {
            out.push(Entry {
                path,
                content: Content::File(full),
            });
        }
    }
    Ok(())
}

fn read_archive(path: &Path) -> Result<Vec<Entry>> {
    let mut file = BufReader::new(
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let mut magic = [0u8; 2];
    let gz = file
        .read(&mut magic)
        .map(|n| n == 2 && magic == [0x1f, 0x8b])
        .unwrap_or(false);
    let file = BufReader::new(File::open(path)?);
    let reader: Box<dyn Read> = if gz {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut archive = tar::Archive::new(reader);
    let broken =
        |e: std::io::Error| anyhow::anyhow!("{}: broken or truncated archive: {e}", path.display());
    let mut out = Vec::new();
    for member in archive.entries().map_err(broken)? {
        let mut member = member.map_err(broken)?;
        let name = member
            .path()
            .map_err(broken)?
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let name = name.trim_start_matches("./").to_string();
        if name.is_empty() {
            continue;
        }
        let kind = member.header().entry_type();
        if kind.is_dir() {
            out.push(Entry {
                path: name,
                content: Content::Dir,
            });
        } else if kind.is_file() {
            let mut bytes = Vec::with_capacity(member.size() as usize);
            member.read_to_end(&mut bytes).map_err(|e| {
                anyhow::anyhow!("{}: cannot read member {name}: {e}", path.display())
            })?;
            out.push(Entry {
                path: name,
                content: Content::Bytes(bytes),
            });
        }
    }
    Ok(out)
}

/// Drops a leading folder that every entry shares, repeatedly (`cifar10/train/..` -> `train/..`).
fn strip_common_top(entries: &mut Vec<Entry>) {
    loop {
        let Some(first) = entries.iter().find(|e| e.path.contains('/')) else {
            return;
        };
        let top = first.path.split('/').next().unwrap_or("").to_string();
        let prefix = format!("{top}/");
        let shared = entries
            .iter()
            .all(|e| e.path == top || e.path.starts_with(&prefix));
        if !shared {
            return;
        }
        entries.retain(|e| e.path != top);
        for e in entries.iter_mut() {
            e.path = e.path[prefix.len()..].to_string();
        }
    }
}

//! Frozen features written to a file for the user's own tools (clustering, retrieval, plots),
//! in the format its extension names:
//!
//! - `.safetensors`: `features` f32 `[n, dim]`, `labels` i64 `[n]` (labelled splits), and in the
//!   metadata `files` and `classes` as JSON lists (`safetensors.safe_open(p, "pt").metadata()`);
//! - `.npy`: the features `[n, dim]` f32, with `<stem>.labels.npy` (i64) beside it for labelled
//!   splits and `<stem>.files.txt` (one name a line), as `numpy.load` reads them;
//! - `.csv`: a header `file,label,class,f0,...` and a row per image.
//!
//! A file is named by its path inside the dataset; an image of a CIFAR or idx release by
//! `<split>/<index>`, its position in the split (as torchvision's datasets index it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Features of the images of one split, ready to be written.
pub struct Embedding<'a> {
    /// `[n, dim]` row-major.
    pub features: &'a [f32],
    /// Features per image.
    pub dim: usize,
    /// Each image's class, for a labelled split.
    pub labels: Option<&'a [u32]>,
    /// Class names, indexed by label.
    pub classes: &'a [String],
    /// Each image's name (see [`crate::data::Split::file_names`]).
    pub files: &'a [String],
}

impl Embedding<'_> {
    fn len(&self) -> usize {
        self.files.len()
    }

    /// Writes the file(s) `path`'s extension names; returns every path written.
    pub fn write(&self, path: &Path) -> Result<Vec<PathBuf>> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let written = match ext {
            "safetensors" => self.safetensors(path),
            "npy" => self.npy(path),
            "csv" => self.csv(path),
            _ => bail!("{}: name a .safetensors, .npy or .csv file", path.display()),
        };
        written.with_context(|| format!("cannot write {}", path.display()))
    }

    fn labels_i64(&self) -> Option<Vec<i64>> {
        self.labels.map(|l| l.iter().map(|&x| x as i64).collect())
    }

    fn safetensors(&self, path: &Path) -> Result<Vec<PathBuf>> {
        use safetensors::tensor::{Dtype, TensorView};
        let features: Vec<u8> = self.features.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut tensors = vec![(
            "features".to_string(),
            features,
            Dtype::F32,
            vec![self.len(), self.dim],
        )];
        if let Some(labels) = self.labels_i64() {
            let b: Vec<u8> = labels.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push(("labels".into(), b, Dtype::I64, vec![self.len()]));
        }
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(name, data, dtype, shape)| {
                Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
            })
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        let metadata = HashMap::from([
            ("files".to_string(), serde_json::to_string(self.files)?),
            ("classes".to_string(), serde_json::to_string(self.classes)?),
        ]);
        safetensors::serialize_to_file(views, Some(metadata), path)?;
        Ok(vec![path.to_path_buf()])
    }

    fn npy(&self, path: &Path) -> Result<Vec<PathBuf>> {
        use ndarray_npy::WriteNpyExt;
        let sibling = |suffix: &str| {
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("features");
            path.with_file_name(format!("{stem}{suffix}"))
        };
        let features = ndarray::ArrayView2::from_shape((self.len(), self.dim), self.features)?;
        features.write_npy(std::io::BufWriter::new(std::fs::File::create(path)?))?;
        let mut written = vec![path.to_path_buf()];
        if let Some(labels) = self.labels_i64() {
            let p = sibling(".labels.npy");
            ndarray::Array1::from(labels)
                .write_npy(std::io::BufWriter::new(std::fs::File::create(&p)?))?;
            written.push(p);
        }
        let p = sibling(".files.txt");
        std::fs::write(&p, self.files.join("\n") + "\n")?;
        written.push(p);
        Ok(written)
    }

    fn csv(&self, path: &Path) -> Result<Vec<PathBuf>> {
        let mut w = csv::Writer::from_path(path)?;
        let mut header = vec!["file".to_string(), "label".into(), "class".into()];
        header.extend((0..self.dim).map(|i| format!("f{i}")));
        w.write_record(&header)?;
        for (i, row) in self.features.chunks(self.dim).enumerate() {
            let label = self.labels.map(|l| l[i]);
            let mut record = vec![
                self.files[i].clone(),
                label.map_or(String::new(), |l| l.to_string()),
                label
                    .and_then(|l| self.classes.get(l as usize).cloned())
                    .unwrap_or_default(),
            ];
            record.extend(row.iter().map(|x| x.to_string()));
            w.write_record(&record)?;
        }
        w.flush()?;
        Ok(vec![path.to_path_buf()])
    }
}

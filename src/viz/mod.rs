//! Pictures worth looking at, written as PNG.

mod attention;
mod reconstruction;
mod report;
mod views;

pub use attention::{attention_grid, attention_row, mass_mask};
pub use reconstruction::{denormalize, hide, reconstruction_grid};
pub use report::report;
pub use views::views_grid;

use std::path::Path;

use anyhow::{Context, Result};
use image::RgbImage;

/// Writes `img` as a PNG, creating the folder if needed.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Pastes `tiles` (rows of images) onto a white sheet, each in a `cell`-px square with a
/// `gap`-px margin, centred.
pub(crate) fn grid(rows: &[Vec<RgbImage>], cell: u32, gap: u32) -> RgbImage {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0) as u32;
    let mut sheet = RgbImage::from_pixel(
        cols * (cell + gap) + gap,
        rows.len() as u32 * (cell + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (r, row) in rows.iter().enumerate() {
        for (c, tile) in row.iter().enumerate() {
            let x = gap + c as u32 * (cell + gap) + (cell - tile.width().min(cell)) / 2;
            let y = gap + r as u32 * (cell + gap) + (cell - tile.height().min(cell)) / 2;
            image::imageops::replace(&mut sheet, tile, x as i64, y as i64);
        }
    }
    sheet
}

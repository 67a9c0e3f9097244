//! A run's curves as one picture (`selfsup report RUN`): every number of `metrics.jsonl`, one
//! panel each: per step (loss, lr, `z_std` and each method's own diagnostics: DINO's teacher
//! entropy and KL, MAE's masked loss, pretext accuracy, ...), then what only epochs have
//! (online kNN). Drawn with plotters; text in DejaVu Sans, embedded, so no system font is needed.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use anyhow::{bail, Result};
use plotters::prelude::*;

use crate::train::metrics;

/// One curve: its name, what its x counts, and its points.
struct Series {
    name: String,
    x_label: &'static str,
    points: Vec<(f64, f64)>,
}

/// The curves of a run's `metrics.jsonl` records, in the order their names first appear.
fn series(metrics: &[serde_json::Value]) -> Vec<Series> {
    let mut steps: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut epochs: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut order: Vec<(bool, String)> = vec![];
    for line in metrics {
        let per_step = line["kind"] == "step";
        let at = if per_step {
            &line["step"]
        } else {
            &line["epoch"]
        };
        let Some(at) = at.as_f64() else { continue };
        for (name, value) in line.as_object().into_iter().flatten() {
            let Some(v) = value.as_f64() else { continue };
            if matches!(name.as_str(), "epoch" | "step" | "img_per_s") {
                continue;
            }
            let table = if per_step { &mut steps } else { &mut epochs };
            if !table.contains_key(name) {
                order.push((per_step, name.clone()));
            }
            table.entry(name.clone()).or_default().push((at, v));
        }
    }
    order
        .into_iter()
        // An epoch's mean of a per-step number adds nothing to the step curve.
        .filter(|(per_step, name)| *per_step || !steps.contains_key(name))
        .map(|(per_step, name)| Series {
            points: if per_step { &steps } else { &epochs }[&name].clone(),
            x_label: if per_step { "step" } else { "epoch" },
            name,
        })
        .collect()
}

/// Draws the curves of the run folder `run` into the PNG `out`.
pub fn report(run: &Path, out: &Path) -> Result<()> {
    let path = run.join(metrics::FILE);
    if !path.exists() {
        bail!(
            "{} is not a run folder (no {})",
            run.display(),
            metrics::FILE
        );
    }
    let all = series(&metrics::read(&path)?);
    if all.is_empty() {
        bail!("{} holds no metrics yet", path.display());
    }
    static FONT: Once = Once::new();
    FONT.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("DejaVu Sans is a valid font"));
    });
    let cols = all.len().min(3);
    let rows = all.len().div_ceil(cols);
    let (w, h) = (420u32, 280u32);
    let area = BitMapBackend::new(out, (w * cols as u32, h * rows as u32 + 40)).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", out.display());
    area.fill(&WHITE).map_err(draw)?;
    let (title, panels) = area.split_vertically(40);
    title
        .draw_text(
            &format!("{}", run.display()),
            &("sans-serif", 20).into_font().color(&BLACK),
            (10, 10),
        )
        .map_err(draw)?;
    for (panel, s) in panels.split_evenly((rows, cols)).iter().zip(&all) {
        let (x0, x1) = bounds(s.points.iter().map(|p| p.0));
        let (y0, y1) = bounds(s.points.iter().map(|p| p.1));
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{} (last {:.4})",
                    s.name,
                    s.points.last().map_or(0.0, |p| p.1)
                ),
                ("sans-serif", 18),
            )
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(draw)?;
        chart
            .configure_mesh()
            .x_desc(s.x_label)
            .x_labels(5)
            .y_labels(5)
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(draw)?;
        chart
            .draw_series(LineSeries::new(s.points.iter().copied(), &BLUE))
            .map_err(draw)?;
        if s.points.len() < 20 {
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
                .map_err(draw)?;
        }
    }
    area.present().map_err(draw)
}

/// A range that holds every value, with a margin (a tenth of the value where they are all equal).
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        (hi.abs() * 0.1).max(1e-3)
    };
    (lo - pad, hi + pad)
}

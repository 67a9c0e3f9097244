//! Writes the training views a recipe's pre-training sees, batch by batch, as raw bytes, so that
//! another implementation (benches/reference/time_to_accuracy_torch.py `--views`) can train on
//! exactly the same inputs.
//!
//! Output: `[steps, views, batch, 3, size, size]` u8 (the views before normalisation, as the
//! loader draws them for (seed, epoch, batch)), and on stdout one JSON line with the shape.
//!
//! Run: cargo run --profile dev --example dump_views -- RECIPE EPOCHS OUT.u8
//! (with `SELFSUP_DATA` set as for `selfsup pretrain`).

use std::io::Write;

use anyhow::{bail, Context, Result};
use selfsup::config::Recipe;
use selfsup::data::Loader;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, recipe, epochs, out] = &args[..] else {
        bail!("usage: dump_views RECIPE EPOCHS OUT.u8")
    };
    let recipe = Recipe::load(recipe.as_ref())?;
    let epochs: u64 = epochs.parse().context("EPOCHS")?;
    let dataset = selfsup::pretrain::open_data(&recipe, None)?;
    let split = dataset.split(&recipe.data.train_split)?.clone();
    let pipeline = recipe.augment.build()?;
    let (mean, std, views) = (pipeline.mean, pipeline.std, pipeline.num_views());
    let loader = Loader::new(
        split,
        recipe.method.augment(pipeline),
        recipe.train.batch_size,
        recipe.seed,
    )?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
    let mut steps = 0;
    let mut shape = [0; 4];
    for epoch in 0..epochs {
        for batch in loader.epoch(epoch, 0) {
            for view in &batch.views {
                shape = view.shape;
                let plane = shape[2] * shape[3];
                let bytes: Vec<u8> = view
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let c = (i / plane) % 3;
                        ((x * std[c] + mean[c]) * 255.0).round().clamp(0.0, 255.0) as u8
                    })
                    .collect();
                file.write_all(&bytes)?;
            }
            steps += 1;
        }
        eprintln!("epoch {} written ({steps} steps)", epoch + 1);
    }
    file.flush()?;
    println!(
        "{{\"steps\": {steps}, \"views\": {views}, \"batch\": {}, \"size\": {}}}",
        shape[0], shape[2]
    );
    Ok(())
}

//! The `selfsup` command line: parses arguments and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use selfsup::augment::{Pipeline, Sizes, PRESETS};
use selfsup::config::{AugmentConfig, Recipe};
use selfsup::data::{self, Dataset, LoadOptions};
use selfsup::methods::MethodConfig;
use selfsup::models::{Backbone, Pool};
use selfsup::pretrain;
use selfsup::run;
use selfsup::train::Which;

#[derive(Parser)]
#[command(
    name = "selfsup",
    version,
    about = "Self-supervised visual representation learning"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect and fetch datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Draw the views of an augmentation pipeline for real images into a PNG grid.
    Views {
        /// A CIFAR binary release, an image folder or a .tar(.gz) of one, or idx files.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "train")]
        split: String,
        /// A named pipeline (simclr, moco_v1, moco_v2, byol, dino, mae, eval).
        #[arg(long, default_value = "simclr", conflicts_with = "recipe")]
        pipeline: String,
        /// Take the pipeline from a recipe's [augment] section instead.
        #[arg(long)]
        recipe: Option<PathBuf>,
        /// View side in pixels (with --pipeline).
        #[arg(long, default_value_t = 32)]
        size: u32,
        /// Number of images (rows).
        #[arg(long, default_value_t = 8)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "views.png")]
        out: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Pre-train an encoder as a recipe says; resumes if --out holds a checkpoint of it.
    Pretrain {
        /// A recipe file (TOML): recipes/*.toml, or `selfsup recipe METHOD > my.toml` to start
        /// from; any key it leaves out takes its method's published value.
        #[arg(long)]
        recipe: PathBuf,
        /// Overrides the recipe's data.source: cifar10, cifar100, fashion-mnist, or a path.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Run folder (default: runs/<recipe name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overrides the recipe's train.epochs (above a finished run's: trains it further).
        #[arg(long)]
        epochs: Option<usize>,
        /// Resume a run folder whose recipe or data differ from these: its checkpoint's weights,
        /// optimiser state and step carry on, and every schedule follows the new recipe from
        /// that step (without it, the differences are named and the run refused).
        #[arg(long)]
        change_recipe: bool,
        /// cpu, cuda[:N] (build with --features cuda) or vulkan[:N] (--features wgpu).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Evaluate a frozen backbone: `knn`, or `linear` (the papers' protocol, the recipe's
    /// [linear_eval]; with --quick, AdamW on fixed centre-crop features).
    Eval {
        #[arg(value_parser = ["knn", "linear"])]
        protocol: String,
        #[command(flatten)]
        encoder: EncoderArgs,
        /// linear: the quick probe on fixed features (minutes on a CPU), not the papers' protocol.
        #[arg(long)]
        quick: bool,
        /// linear: overrides linear_eval.epochs (eval.linear_epochs with --quick).
        #[arg(long)]
        epochs: Option<usize>,
    },
    /// Fine-tune the whole encoder with a linear head on labels (the recipe's [finetune]):
    /// a pre-trained run, or with --recipe alone the same network from scratch.
    Finetune {
        #[command(flatten)]
        encoder: EncoderArgs,
        /// Overrides finetune.epochs.
        #[arg(long)]
        epochs: Option<usize>,
        /// Overrides finetune.train_limit: fine-tune on N labelled images spread over the split (0: all).
        #[arg(long)]
        labels: Option<usize>,
    },
    /// Frozen features of a split written to a file (.safetensors, .npy or .csv, by the
    /// extension), with labels and file names.
    Embed {
        #[command(flatten)]
        encoder: EncoderArgs,
        /// The split to embed (labelled or not).
        #[arg(long, default_value = "test")]
        split: String,
        /// FILE.safetensors, FILE.npy (labels and names beside it) or FILE.csv.
        #[arg(long)]
        out: PathBuf,
    },
    /// Write a run folder from PyTorch weights (.safetensors, .pth, .pt): timm ViTs (the
    /// official DINO and MAE releases) and torchvision ResNet-18/34/50 (ImageNet or CIFAR stem),
    /// the architecture inferred from the shapes.
    Import {
        /// A PyTorch file: a state dict or checkpoint as .safetensors, .pth or .pt.
        #[arg(long)]
        weights: PathBuf,
        /// The run folder to write.
        #[arg(long)]
        out: PathBuf,
        /// The dictionary inside a checkpoint that holds the weights (`teacher` in DINO's full
        /// checkpoints); default: state_dict, model, teacher, or the top level.
        #[arg(long)]
        key: Option<String>,
        /// The backbone's key prefix (`module.encoder_q.`); default: the one in front of the
        /// stem's key.
        #[arg(long)]
        prefix: Option<String>,
        /// A ViT's attention heads (not in the weights; default: those of the published ViT of
        /// its width, timm's table: ViT-S 6, ViT-B 12, ViT-H 16, ...).
        #[arg(long)]
        heads: Option<usize>,
        /// Image side for evaluation (default: a ViT's training size, 224 px for an
        /// ImageNet-stem ResNet, 32 px for a CIFAR one).
        #[arg(long)]
        size: Option<u32>,
    },
    /// Write one of a run's encoders as safetensors with torchvision / timm names.
    Export {
        /// A run folder.
        #[arg(long)]
        checkpoint: PathBuf,
        /// student or teacher (DINO's teacher, MoCo's key encoder); default: the one the
        /// method's official code releases (DINO: teacher).
        #[arg(long, value_enum)]
        which: Option<Which>,
        #[arg(long)]
        out: PathBuf,
    },
    /// DINO's attention maps of a ViT run on real images: per head, their mean, and the mask
    /// keeping 60% of the attention mass.
    Attention {
        /// A run folder written by `pretrain` or `import` (any ViT).
        #[arg(long)]
        checkpoint: PathBuf,
        /// student or teacher (default: the one the method releases, DINO's teacher).
        #[arg(long, value_enum)]
        which: Option<Which>,
        /// Images to look at (repeat the flag for several).
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        /// Side the central square of each image is resized to, rounded down to whole patches.
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long, default_value = "attn.png")]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Draw what an inpainting or MAE run paints: rows of original | masked | reconstructed
    /// test images (MAE adds the reconstruction with the visible patches pasted back).
    Reconstruct {
        /// A run folder written by `pretrain`.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Images to draw (default: the run's data).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value = "test")]
        split: String,
        #[arg(long, default_value_t = 8)]
        count: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "recon.png")]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Draw a run's curves (loss, lr, online kNN, each method's diagnostics) into one PNG.
    Report {
        /// A run folder written by `pretrain`.
        run: PathBuf,
        /// Default: RUN/report.png.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a device (a GPU): training losses against the CPU's on the same batches from the
    /// same weights (`parity`), or training throughput (`simclr`: ResNet-18 b256 at 32 px;
    /// `dino`: ViT-S/16 with 2×224 + 8×96 px crops, b64). One JSON line per result; exits
    /// non-zero when parity fails. `scripts/gpu-check.sh` runs them all.
    CheckDevice {
        #[arg(long)]
        device: String,
        #[arg(long, default_value = "parity", value_parser = ["parity", "simclr", "dino"])]
        case: String,
        /// Batches of each parity run, or of the timed epoch.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// `train.precision` of the throughput cases (parity runs in f32).
        #[arg(long, value_enum, default_value = "f32")]
        precision: selfsup::precision::Precision,
    },
    /// Check that this launch trains as one process (run it as `mpirun -np N selfsup
    /// dist-check ...`): a few steps of the recipe on every rank's share of the global batches
    /// and, on each rank, as a lone process; prints the gaps as one JSON line, and exits
    /// non-zero when the ranks disagree or the gaps exceed float rounding.
    DistCheck {
        #[arg(long)]
        recipe: PathBuf,
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Train images the steps draw their batches from (default: steps × batch).
        #[arg(long)]
        images: Option<usize>,
    },
    /// Print a method's complete recipe, every key commented and at its default, to start from.
    Recipe {
        #[arg(help = selfsup::methods::names_listed())]
        method: String,
    },
    /// Print a named pipeline as a recipe's [augment] section, to copy and change.
    Pipeline {
        name: String,
        #[arg(long, default_value_t = 32)]
        size: u32,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Counts per split and class, image size and channels.
    Info {
        source: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Download a dataset's official files (cifar10, cifar100, fashion-mnist), MD5-checked;
    /// `$SELFSUP_DATA_MIRROR` names a mirror to fetch them from instead.
    Download {
        name: String,
        /// Default: the data folder (`$SELFSUP_DATA`, else ~/.cache/selfsup), where `--data NAME`
        /// finds it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// The encoder to evaluate or fine-tune, and the data to do it on.
#[derive(clap::Args)]
struct EncoderArgs {
    /// A run folder written by `pretrain` or `import`.
    #[arg(long, required_unless_present = "recipe")]
    checkpoint: Option<PathBuf>,
    /// student or teacher (DINO's teacher, MoCo's key encoder); default: the one the method's
    /// official code evaluates (DINO: teacher).
    #[arg(long, value_enum, requires = "checkpoint")]
    which: Option<Which>,
    /// Without --checkpoint: this recipe's backbone before training, random or its
    /// `[model] init` (the baseline).
    #[arg(long, conflicts_with = "checkpoint")]
    recipe: Option<PathBuf>,
    /// Images to work on (default: the recipe's data.source): a dataset name or a path.
    #[arg(long)]
    data: Option<PathBuf>,
    /// ViT features: the class token (`cls`) or the mean patch token (`mean`, MAE's choice).
    #[arg(long, value_parser = ["cls", "mean"])]
    pool: Option<String>,
    /// cpu, cuda[:N] or vulkan[:N].
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// What `EncoderArgs` names, loaded: recipe, backbone, a phrase saying which, device, data.
struct Encoder {
    recipe: Recipe,
    backbone: Backbone,
    what: String,
    device: burn::tensor::Device,
    dataset: Dataset,
}

impl EncoderArgs {
    fn load(self) -> Result<Encoder> {
        let device = pretrain::device(&self.device)?;
        let (recipe, backbone, what) = match (self.checkpoint, self.recipe) {
            (Some(run), _) => {
                let (r, b, which) = run::encoder(&run, self.which, &device)?;
                let name = r.method.encoder_name(which);
                (r, b, format!("{name} of {}", run.display()))
            }
            (None, Some(path)) => {
                let r = Recipe::load(&path)?;
                let b = run::initial_backbone(&r, &device)?;
                let what = match r.model.weights() {
                    Some(w) => format!("{} as recipe {} starts", w.display(), path.display()),
                    None => format!("random init of {}", path.display()),
                };
                (r, b, what)
            }
            (None, None) => anyhow::bail!("pass --checkpoint or --recipe"),
        };
        let backbone = match (self.pool.as_deref(), backbone) {
            (None, b) => b,
            (Some(pool), Backbone::Vit(vit)) => Backbone::Vit(vit.with_pool(if pool == "mean" {
                Pool::Mean
            } else {
                Pool::Cls
            })),
            (Some(_), _) => anyhow::bail!("--pool applies to ViT encoders; this one is a ResNet"),
        };
        let dataset = pretrain::open_data(&recipe, self.data.as_deref())?;
        Ok(Encoder {
            recipe,
            backbone,
            what,
            device,
            dataset,
        })
    }
}

#[derive(clap::Args)]
struct LoadArgs {
    /// Resize images whose shorter side is longer than this, once, at load.
    #[arg(long)]
    load_size: Option<u32>,
    /// Skip unreadable files (and count them) instead of failing.
    #[arg(long)]
    skip_bad: bool,
}

impl LoadArgs {
    fn options(&self) -> LoadOptions {
        LoadOptions {
            load_size: self.load_size,
            skip_bad: self.skip_bad,
        }
    }
}

/// Refuses 0 for a count the user passed (`flag` names it).
fn at_least_one(flag: &str, n: usize) -> Result<()> {
    if n == 0 {
        anyhow::bail!("{flag} 0: nothing to do (pass at least 1)");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::DistCheck {
            recipe,
            data,
            steps,
            images,
        } => {
            let recipe = Recipe::load(&recipe)?;
            let dataset = pretrain::open_data(&recipe, data.as_deref())?;
            let images = images.unwrap_or(steps * recipe.train.batch_size);
            let split = dataset.split(&recipe.data.train_split)?;
            let split = split.subset(images, recipe.seed);
            let gaps = selfsup::dist::check::compare(&recipe, &split, steps)?;
            if selfsup::dist::is_main() {
                println!("{}", serde_json::to_string(&gaps)?);
            }
            if !gaps.as_one_process() {
                anyhow::bail!("this launch does not train as one process: {gaps:?}");
            }
        }
        Command::Data(DataCommand::Info { source, load }) => {
            let dataset = Dataset::open(&source, &load.options())?;
            print!("{}", dataset.summary());
        }
        Command::Data(DataCommand::Download { name, out }) => {
            let out = out.unwrap_or_else(data::data_dir);
            println!("{}", data::download_named(&name, &out)?.display());
        }
        Command::Views {
            data,
            split,
            pipeline,
            recipe,
            size,
            count,
            seed,
            out,
            load,
        } => {
            let pipeline = match recipe {
                Some(path) => Recipe::load(&path)?.augment.build()?,
                None => AugmentConfig {
                    pipeline,
                    size,
                    ..AugmentConfig::default()
                }
                .build()?,
            };
            at_least_one("--count", count)?;
            let dataset = Dataset::open(&data, &load.options())?;
            let split = dataset.split(&split)?.subset(count, seed);
            let images: Vec<_> = split.images.iter().collect();
            let grid = selfsup::viz::views_grid(&images, &pipeline, seed);
            selfsup::viz::save_png(&grid, &out)?;
            println!(
                "wrote {} ({} images x {} views)",
                out.display(),
                images.len(),
                pipeline.num_views()
            );
        }
        Command::Pretrain {
            recipe: path,
            data,
            out,
            epochs,
            change_recipe,
            device,
        } => {
            // What needs no data is checked before the data is opened (or downloaded).
            let device = pretrain::device(&device)?;
            let mut recipe = Recipe::load(&path)?;
            if let Some(e) = epochs {
                recipe.train.epochs = e;
            }
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".into());
            let out = out.unwrap_or_else(|| PathBuf::from("runs").join(stem));
            let dataset = pretrain::open_data(&recipe, data.as_deref())?;
            let summary = pretrain::pretrain(&recipe, &dataset, &out, &device, change_recipe)?;
            if !selfsup::dist::is_main() {
                return Ok(());
            }
            if summary.trained == 0 {
                println!(
                    "{} is complete: {}/{} epochs trained (pass --epochs N above {} to train further); its results:",
                    out.display(),
                    summary.epochs,
                    recipe.train.epochs,
                    summary.epochs
                );
            }
            println!("run folder: {}", out.display());
            // Which of two encoders, for the methods that have two.
            let which = if recipe.method.has_teacher() {
                format!("the {}, ", recipe.method.encoder_name(summary.released))
            } else {
                String::new()
            };
            println!(
                "backbone ({which}torchvision/timm names): {}",
                summary.backbone.display()
            );
            if let Some(knn) = summary.knn {
                println!(
                    "kNN (k={}, T={}) on {}: top-1 {:.2}%  top-5 {:.2}%",
                    recipe.eval.knn_k,
                    recipe.eval.knn_t,
                    recipe.data.test_split,
                    100.0 * knn.top1,
                    100.0 * knn.top5
                );
            }
        }
        Command::Eval {
            protocol,
            encoder,
            quick,
            epochs,
        } => {
            let Encoder {
                mut recipe,
                backbone,
                what,
                device,
                dataset,
            } = encoder.load()?;
            if let Some(e) = epochs {
                recipe.linear_eval.epochs = e;
                recipe.eval.linear_epochs = e;
            }
            recipe.check().context("--epochs")?;
            let train = dataset.split(&recipe.data.train_split)?;
            let test = dataset.split(&recipe.data.test_split)?;
            let classes = &dataset.classes;
            // Each number is printed with the protocol that gave it.
            let (acc, protocol) = match (protocol.as_str(), quick) {
                ("knn", _) => (
                    pretrain::knn_accuracy(&recipe, &backbone, train, test, classes, &device).with_context(|| format!("the {what}"))?,
                    format!(
                        "kNN (k={}, T={}, cosine, weighted votes, {} as the bank)",
                        recipe.eval.knn_k, recipe.eval.knn_t, recipe.data.train_split
                    ),
                ),
                (_, true) => (
                    pretrain::linear_accuracy(&recipe, &backbone, train, test, classes, &device).with_context(|| format!("the {what}"))?,
                    format!(
                        "quick linear probe (AdamW, {} epochs on fixed, standardised centre-crop features; \
                         not the papers' protocol)",
                        recipe.eval.linear_epochs
                    ),
                ),
                (_, false) => (
                    pretrain::linear_eval_accuracy(&recipe, &backbone, train, test, classes, &device).with_context(|| format!("the {what}"))?,
                    recipe.linear_eval.describe(&backbone),
                ),
            };
            println!(
                "{protocol} on {} ({what}): top-1 {:.2}%  top-5 {:.2}%",
                recipe.data.test_split,
                100.0 * acc.top1,
                100.0 * acc.top5
            );
        }
        Command::Finetune {
            encoder,
            epochs,
            labels,
        } => {
            let Encoder {
                mut recipe,
                backbone,
                what,
                device,
                dataset,
            } = encoder.load()?;
            if let Some(e) = epochs {
                recipe.finetune.epochs = e;
            }
            if let Some(n) = labels {
                recipe.finetune.train_limit = n;
            }
            recipe.check().context("--epochs, --labels")?;
            let (acc, labelled) = pretrain::finetune_accuracy(&recipe, backbone, &dataset, &device)
                .with_context(|| format!("the {what}"))?;
            println!(
                "fine-tuned {} epochs on {} labelled images, tested on {} ({what}): top-1 {:.2}%  top-5 {:.2}%",
                recipe.finetune.epochs,
                labelled,
                recipe.data.test_split,
                100.0 * acc.top1,
                100.0 * acc.top5
            );
        }
        Command::Embed {
            encoder,
            split,
            out,
        } => {
            let Encoder {
                recipe,
                backbone,
                what,
                device,
                dataset,
            } = encoder.load()?;
            let split = dataset.split(&split)?;
            let pipeline = recipe.augment.eval_pipeline()?;
            let (features, dim) = selfsup::eval::features(
                &backbone,
                split,
                &pipeline,
                recipe.eval.batch_size,
                &device,
            )
            .with_context(|| format!("the {what}"))?;
            let files = split.file_names();
            let written = selfsup::eval::embed::Embedding {
                features: &features,
                dim,
                labels: split.labels.as_ref().map(|l| l.as_slice()),
                classes: &dataset.classes,
                files: &files,
            }
            .write(&out)?;
            for path in written {
                println!("wrote {}", path.display());
            }
            println!(
                "{} images of {}, {dim} features each ({what})",
                split.len(),
                split.name
            );
        }
        Command::Import {
            weights,
            out,
            key,
            prefix,
            heads,
            size,
        } => {
            let opts = run::ImportOptions {
                key,
                prefix,
                heads,
                size,
            };
            let imported = run::import(&weights, &out, &opts)?;
            let model = toml::to_string(&imported.recipe.model)?;
            println!(
                "imported {} tensors from {} into {}:\n{}",
                imported.tensors,
                weights.display(),
                out.display(),
                model.trim_end()
            );
            if !imported.left_out.is_empty() {
                let shown: Vec<&str> = imported
                    .left_out
                    .iter()
                    .take(6)
                    .map(String::as_str)
                    .collect();
                println!(
                    "left out {} tensors that are not the backbone's: {}{}",
                    imported.left_out.len(),
                    shown.join(", "),
                    if imported.left_out.len() > 6 {
                        ", ..."
                    } else {
                        ""
                    }
                );
            }
        }
        Command::Export {
            checkpoint,
            which,
            out,
        } => {
            let (recipe, backbone, which) =
                run::encoder(&checkpoint, which, &burn::tensor::Device::flex())?;
            selfsup::weights::export(&backbone, &out)?;
            println!(
                "wrote {} (the {} of {}, torchvision/timm names)",
                out.display(),
                recipe.method.encoder_name(which),
                checkpoint.display()
            );
        }
        Command::Attention {
            checkpoint,
            which,
            images,
            size,
            out,
            device,
        } => {
            let sheet = pretrain::attention(
                &checkpoint,
                which,
                &images,
                size,
                &pretrain::device(&device)?,
            )?;
            selfsup::viz::save_png(&sheet, &out)?;
            println!(
                "wrote {} (image | one map per head | mean | 60% mass mask, {} rows)",
                out.display(),
                images.len()
            );
        }
        Command::Reconstruct {
            checkpoint,
            data,
            split,
            count,
            seed,
            out,
            device,
        } => {
            let device = pretrain::device(&device)?;
            at_least_one("--count", count)?;
            let recipe = run::recipe(&checkpoint)?;
            let dataset = pretrain::open_data(&recipe, data.as_deref())?;
            let split = dataset.split(&split)?;
            let sheet = pretrain::reconstruct(&checkpoint, split, count, seed, &device)?;
            selfsup::viz::save_png(&sheet, &out)?;
            let pasted = match recipe.method {
                MethodConfig::Mae(_) => " | with the visible patches pasted back",
                _ => "",
            };
            println!(
                "wrote {} (original | masked | reconstruction{pasted})",
                out.display()
            );
        }
        Command::Report { run, out } => {
            let out = out.unwrap_or_else(|| run.join("report.png"));
            selfsup::viz::report(&run, &out)?;
            println!("wrote {}", out.display());
        }
        Command::CheckDevice {
            device,
            case,
            steps,
            precision,
        } => {
            at_least_one("--steps", steps)?;
            let mut failed = vec![];
            selfsup::device_check::run(
                &case,
                &device,
                &pretrain::device(&device)?,
                steps,
                precision,
                |outcome| {
                    println!("{}", serde_json::to_string(&outcome)?);
                    if !outcome.ok {
                        failed.push(outcome.case);
                    }
                    Ok(())
                },
            )?;
            if !failed.is_empty() {
                anyhow::bail!(
                    "{} on {device}: the losses differ from the CPU's by more than rounding explains",
                    failed.join(", ")
                );
            }
        }
        Command::Recipe { method } => {
            print!("{}", selfsup::config::commented_defaults(&method)?);
        }
        Command::Pipeline { name, size } => {
            let pipeline = Pipeline::preset(&name, Sizes::small(size))?;
            let section = toml::to_string_pretty(&pipeline).context("pipeline to TOML")?;
            println!("# `{name}` at {size} px; presets: {}\n[augment]\npipeline = \"{name}\"\nsize = {size}", PRESETS.join(", "));
            println!(
                "{}",
                section
                    .replace("[[views]]", "[[augment.views]]")
                    .replace("[views.", "[augment.views.")
            );
        }
    }
    Ok(())
}

#[global_allocator]
static ALLOCATOR: selfsup::alloc::MiMalloc = selfsup::alloc::MiMalloc;

fn main() -> ExitCode {
    selfsup::alloc::keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| selfsup::DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log redirected to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Started by mpirun or srun: one rank of a data-parallel run (selfsup::dist).
    let _mpi = match start_mpi() {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let world = selfsup::dist::world();
            if world.size() > 1 {
                // The other ranks wait in a collective: end them all, naming this rank.
                eprintln!("error: rank {} of {}: {e:#}", world.rank(), world.size());
                world.abort(1);
            }
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Initialises MPI when an MPI launcher started this process; kept until the end of `main`.
#[cfg(feature = "mpi")]
fn start_mpi() -> Result<Option<selfsup::dist::mpi::MpiGuard>> {
    match selfsup::dist::launcher_world_size() {
        Some(_) => Ok(Some(selfsup::dist::mpi::init()?)),
        None => Ok(None),
    }
}

/// Without the `mpi` feature, refuses to run as one of several ranks: each would train alone
/// into the same run folder.
#[cfg(not(feature = "mpi"))]
fn start_mpi() -> Result<()> {
    match selfsup::dist::launcher_world_size() {
        Some(n) if n > 1 => anyhow::bail!("started as one of {n} MPI ranks, but this selfsup was built without MPI: build it with `cargo build --release --features mpi`"),
        _ => Ok(()),
    }
}

//! Recipes: defaults for every key a file leaves out, and refusals, at load, of what a method
//! cannot learn from (too few views or images per batch, sizes a ViT would crop).

use selfsup::config::{commented_defaults, Recipe};
use selfsup::methods::{MethodConfig, METHODS};
use selfsup::models::BackboneConfig;
use selfsup::train::OptimizerKind;

fn refused(text: &str) -> String {
    format!("{:#}", Recipe::parse(text).unwrap_err())
}

#[test]
fn a_recipe_may_leave_out_any_key() {
    // Issue: a recipe without train.weight_decay did not parse.
    let r = Recipe::parse("[train]\nepochs = 30\n").unwrap();
    assert_eq!(r.train.epochs, 30);
    let mut defaults = Recipe::parse("").unwrap();
    defaults.train.epochs = 30;
    assert_eq!(r, defaults);
    // SimCLR's published settings (the official CIFAR command): LARS, weight decay 1e-4, τ 0.5.
    assert_eq!(r.train.optim.optimizer, OptimizerKind::Lars);
    assert_eq!(r.train.optim.weight_decay, 1e-4);
    let MethodConfig::Simclr(m) = &r.method else {
        panic!("{:?}", r.method)
    };
    assert_eq!(m.temperature, 0.5);

    // The defaults are the method's: MAE's AdamW (0.9, 0.95), weight decay 0.05, mask 0.75.
    let r = Recipe::parse("[method]\nname = \"mae\"\n").unwrap();
    assert_eq!(r.train.optim.optimizer, OptimizerKind::Adamw);
    assert_eq!(r.train.optim.betas, [0.9, 0.95]);
    assert_eq!(r.train.optim.weight_decay, 0.05);
    let MethodConfig::Mae(m) = &r.method else {
        panic!("{:?}", r.method)
    };
    assert_eq!(m.mask_ratio, 0.75);
    assert!(matches!(r.model, BackboneConfig::Vit(_)));

    // A key that picks another kind does not inherit the defaults of the published one's kind:
    // DINO with SGD has no AdamW betas or weight-decay schedule, DINO on a ResNet gets ResNet-18.
    let r = Recipe::parse("[method]\nname = \"dino\"\n[train]\noptimizer = \"sgd\"\n").unwrap();
    assert_eq!(r.train.optim.betas, [0.9, 0.999]);
    assert_eq!(r.train.optim.final_weight_decay, None);
    assert_eq!(r.train.optim.grad_clip, Some(3.0), "not the optimiser's");
    let r = Recipe::parse("[method]\nname = \"dino\"\n[model]\narch = \"resnet\"\n").unwrap();
    assert_eq!(r.model, BackboneConfig::default());
    // Pre-training a pretext task on another pipeline drops the published recipe's own views.
    let r =
        Recipe::parse("[method]\nname = \"rotation\"\n[augment]\npipeline = \"eval\"\n").unwrap();
    assert_eq!(r.augment.views, None);

    // Repeating a published value changes nothing; another size drops what was made for the
    // published one: the spelled-out views, DINO's local-crop side, a ViT's image size.
    let rotation = Recipe::parse("[method]\nname = \"rotation\"\n").unwrap();
    let same =
        Recipe::parse("[method]\nname = \"rotation\"\n[augment]\nsize = 32\npipeline = \"mae\"\n");
    assert_eq!(same.unwrap(), rotation);
    let r = Recipe::parse("[method]\nname = \"dino\"\n[augment]\nsize = 64\n").unwrap();
    assert_eq!(r.augment.local_size, None, "half of 64 by the preset");
    let BackboneConfig::Vit(vit) = &r.model else {
        panic!("{:?}", r.model)
    };
    assert_eq!(vit.image_size, 64);

    // A wrong key or value is still named (a value by its section and itself where serde's
    // flattened and tagged sections hide the key).
    let err = refused("[train]\nweight_decay = \"lots\"\n");
    assert!(err.contains("train") && err.contains("\"lots\""), "{err}");
    let err = refused("[augment]\nviews = [{ count = \"a\" }]\n");
    assert!(err.contains("augment.views.count = \"a\""), "{err}");
    assert!(refused("[train]\nwieght_decay = 0.1\n").contains("wieght_decay"));
    let err = refused("[method]\nname = \"nnclr\"\n");
    assert!(
        err.contains("method.name") && err.contains("nnclr"),
        "{err}"
    );
}

#[test]
fn a_warmup_given_as_a_fraction_keeps_its_share_of_any_run() {
    // SimCLR's published recipe warms up for 10 epochs; a fraction replaces them.
    let r = Recipe::parse("[train]\nepochs = 26\nwarmup_fraction = 0.1\n").unwrap();
    assert_eq!(r.train.warmup_epochs, 0.0);
    assert_eq!(r.train.warmup_steps(195), 507, "0.1 × 26 × 195 = 507");
    // `--epochs 1` sets train.epochs: the warm-up shrinks with the run, where 3 epochs of
    // warm-up would be refused.
    let mut short = r.train.clone();
    short.epochs = 1;
    assert!(short.check().is_ok());
    assert_eq!(short.warmup_steps(195), 20, "0.1 × 195 = 19.5, rounded");
    let mut epochs = short.clone();
    (epochs.warmup_fraction, epochs.warmup_epochs) = (None, 3.0);
    assert!(epochs
        .check()
        .unwrap_err()
        .to_string()
        .contains("train.warmup_epochs = 3"));
    // Without a fraction the warm-up stays in epochs, as before.
    let r = Recipe::parse("[train]\nepochs = 26\nwarmup_epochs = 3\n").unwrap();
    assert_eq!(
        (r.train.warmup_fraction, r.train.warmup_steps(195)),
        (None, 585)
    );
    // Both given: refused, naming both.
    let err = refused("[train]\nwarmup_epochs = 2\nwarmup_fraction = 0.1\n");
    assert!(
        err.contains("train.warmup_fraction = 0.1 and train.warmup_epochs = 2"),
        "{err}"
    );
}

#[test]
fn printed_recipes_are_complete_commented_and_read_back() {
    for &method in METHODS {
        let text = commented_defaults(method).unwrap();
        assert!(!text.contains("(undocumented)"), "{method}:\n{text}");
        // Every setting line has its comment above it.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(lines[i - 1].starts_with("# "), "{method}: {line}");
            }
        }
        let back = Recipe::parse(&text).unwrap();
        assert_eq!(back, Recipe::defaults(method).unwrap(), "{method}");
        assert_eq!(back.method.name(), method);
    }
    // The unset ones are shown, commented out.
    let dino = commented_defaults("dino").unwrap();
    assert!(dino.contains("# source = \"cifar10\""), "{dino}");
    // Each of them is a key the method takes: uncommented, the recipe still reads (rotation was
    // offered SimCLR's and MoCo's head keys).
    for &method in METHODS {
        let text = commented_defaults(method).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate().skip(1) {
            if lines[i - 1].ends_with("(unset by default)") {
                let mut edited = lines.clone();
                edited[i] = &line[2..];
                let uncommented = Recipe::parse(&edited.join("\n"));
                assert!(uncommented.is_ok(), "{method}: {line}: {uncommented:?}");
            }
        }
    }
}

#[test]
fn a_method_refuses_batches_and_views_it_cannot_learn_from() {
    // Issue: SimCLR with one image per batch has no negatives; it trained at loss 0.
    let err = refused("[train]\nbatch_size = 1\n");
    assert!(
        err.contains("train.batch_size = 1") && err.contains("negatives"),
        "{err}"
    );
    assert!(Recipe::parse("[train]\nbatch_size = 2\n").is_ok());
    // MoCo: batch-norm groups of equal size, 2 images at least.
    let err = refused("[method]\nname = \"moco\"\nbn_splits = 8\n[train]\nbatch_size = 8\n");
    assert!(err.contains("method.bn_splits = 8"), "{err}");
    let err = refused("[method]\nname = \"moco\"\nbn_splits = 4\n[train]\nbatch_size = 18\n");
    assert!(err.contains("method.bn_splits = 4"), "{err}");
    // A pair-based method with another number of views.
    let err = refused("[augment]\npipeline = \"dino\"\n");
    assert!(
        err.contains("simclr needs 2 view(s)") && err.contains("makes 8"),
        "{err}"
    );
    let err = refused("[method]\nname = \"moco\"\n[augment]\npipeline = \"mae\"\n");
    assert!(err.contains("moco needs 2 view(s)"), "{err}");
    // Pretext tasks and MAE use one view.
    let err = refused("[method]\nname = \"rotation\"\n[augment]\npipeline = \"simclr\"\n");
    assert!(err.contains("rotation needs 1 view(s)"), "{err}");
    let err = refused("[method]\nname = \"mae\"\n[augment]\npipeline = \"simclr\"\n");
    assert!(err.contains("mae needs 1 view(s)"), "{err}");
    // DINO: at least the two global crops, which must share a size.
    let err = refused("[method]\nname = \"dino\"\n[augment]\npipeline = \"mae\"\n");
    assert!(err.contains("two global crops"), "{err}");
    let err = refused(
        "[method]\nname = \"dino\"\n[augment]\nviews = [{ count = 1, size = 32 }, { count = 1, size = 16 }]\n",
    );
    assert!(
        err.contains("one size") && err.contains("[32, 16]"),
        "{err}"
    );
    // DINO's head with batch norm runs once over all crops (MultiCropWrapper): one image with
    // one local crop still gives it three vectors.
    let one_local = "[augment]\nlocal_crops = 1\n[train]\nbatch_size = 1\n";
    for head in ["head_batch_norm = true\n", ""] {
        assert!(Recipe::parse(&format!("[method]\nname = \"dino\"\n{head}{one_local}")).is_ok());
    }
    let err = refused("[method]\nname = \"dino\"\ndrop_path = 1.0\n");
    assert!(err.contains("method.drop_path = 1"), "{err}");
}

#[test]
fn every_size_that_reaches_a_vit_is_whole_patches() {
    let dino_vit = "[method]\nname = \"dino\"\n[model]\narch = \"vit\"\nimage_size = 32\npatch_size = 8\ndim = 24\ndepth = 1\nheads = 2\n";
    // Issue: 20-px local crops under 8-px patches lost their border silently.
    let err = refused(&format!("{dino_vit}[augment]\nlocal_size = 20\n"));
    assert!(
        err.contains("augment.local_size = 20") && err.contains("model.patch_size"),
        "{err}"
    );
    assert!(Recipe::parse(&format!("{dino_vit}[augment]\nlocal_size = 16\n")).is_ok());
    // The global views and evaluation size.
    let err = refused(&format!("{dino_vit}[augment]\nsize = 36\n"));
    assert!(err.contains("augment.size = 36"), "{err}");
    // Views spelled out.
    let err = refused("[method]\nname = \"mae\"\n[augment]\nviews = [{ count = 1, size = 30 }]\n");
    assert!(err.contains("augment.views[0].size = 30"), "{err}");
    // Jigsaw's tiles are what the backbone sees.
    let err = refused(
        "[method]\nname = \"jigsaw\"\ntile = 18\n[model]\narch = \"vit\"\nimage_size = 64\npatch_size = 4\n",
    );
    assert!(err.contains("method.tile = 18"), "{err}");
    // The model itself.
    let err = refused(
        "[method]\nname = \"mae\"\n[model]\narch = \"vit\"\nimage_size = 40\npatch_size = 16\n",
    );
    assert!(err.contains("model.patch_size = 16"), "{err}");
}

#[test]
fn every_value_that_reaches_a_constructor_is_checked() {
    // Issue 28: each of these passed the checks and then panicked, hung or trained on garbage.
    // (recipe, what the refusal must say)
    let mae = "[method]\nname = \"mae\"\n";
    let dino = "[method]\nname = \"dino\"\n";
    let inpainting = "[method]\nname = \"inpainting\"\n";
    let view = |spec: &str| format!("[augment]\nviews = [{{ count = 2, {spec} }}]\n");
    let rows: Vec<(String, &str)> = vec![
        // Views: rand's ranges panic on a non-finite end; a huge kernel allocates gigabytes.
        (view("jitter = { brightness = nan }"), "augment.views[0].jitter.brightness = NaN"),
        (view("jitter = { contrast = inf }"), "augment.views[0].jitter.contrast = inf"),
        (view("jitter = { saturation = inf }"), "augment.views[0].jitter.saturation = inf"),
        (view("blur = { sigma = [0.1, inf] }"), "augment.views[0].blur.sigma = [0.1, inf]"),
        (view("blur = { sigma = [1e-30, 1.0] }"), "augment.views[0].blur.sigma = [1e-30, 1.0]"),
        (view("ratio = [0.75, inf]"), "augment.views[0].ratio = [0.75, inf]"),
        (view("blur = { kernel_frac = 1e9 }"), "augment.views[0].blur.kernel_frac = 1000000000"),
        (view("blur = { kernel_frac = 0.0 }"), "augment.views[0].blur.kernel_frac = 0"),
        ("[augment]\nmean = [nan, 0.5, 0.5]\n".into(), "augment.mean = [NaN, 0.5, 0.5]"),
        ("[augment]\nstd = [inf, 0.5, 0.5]\n".into(), "augment.std = [inf, 0.5, 0.5]"),
        ("[augment]\nstd = [nan, 0.5, 0.5]\n".into(), "augment.std = [NaN, 0.5, 0.5]"),
        // A pretext task takes the first view, made or not.
        (
            format!("{inpainting}[augment]\nviews = [{{ count = 0, size = 64 }}, {{ count = 1, size = 32 }}]\n"),
            "augment.views[0].count = 0",
        ),
        // The size of evaluation and fine-tuning, which no spelled-out view shows.
        ("[augment]\nsize = 0\nviews = [{ count = 2, size = 32 }]\n".into(), "augment.size = 0"),
        ("[data]\nload_size = 0\n".into(), "data.load_size = 0"),
        // Models and methods.
        (format!("{mae}[model]\nmlp_ratio = 0.001\n"), "model.mlp_ratio = 0.001"),
        (format!("{mae}mask_ratio = 0.999\n"), "method.mask_ratio = 0.999"),
        (format!("{mae}mask_ratio = 0.0\n"), "method.mask_ratio = 0"),
        (
            format!("{mae}[augment]\nviews = [{{ count = 1, size = 64 }}]\n"),
            "model.image_size = 32",
        ),
        (format!("{mae}[model]\nimage_size = 64\n"), "model.image_size = 64"),
        (format!("{mae}decoder_dim = 0\n"), "method.decoder_dim = 0"),
        (format!("{mae}decoder_dim = 18\ndecoder_heads = 2\n"), "method.decoder_dim = 18"),
        ("[method]\nname = \"jigsaw\"\nhidden = 0\n".into(), "method.hidden = 0"),
        (format!("{dino}hidden = 0\n"), "method.hidden = 0"),
        (format!("{dino}out_dim = 0\n"), "method.out_dim = 0"),
        (format!("{dino}bottleneck = 0\n"), "method.bottleneck = 0"),
        (format!("{dino}warmup_teacher_temp_epochs = nan\n"), "method.warmup_teacher_temp_epochs = NaN"),
        (format!("{dino}student_temp = inf\n"), "method.student_temp = inf"),
        (format!("{dino}teacher_temp = inf\n"), "method.teacher_temp = inf"),
        (format!("{dino}warmup_teacher_temp = inf\n"), "method.warmup_teacher_temp = inf"),
        ("[method]\ntemperature = inf\n".into(), "method.temperature = inf"),
        ("[method]\nname = \"moco\"\ntemperature = inf\n".into(), "method.temperature = inf"),
        (format!("{inpainting}lambda_rec = nan\n"), "method.lambda_rec = NaN"),
        (format!("{inpainting}lambda_adv = inf\n"), "method.lambda_adv = inf"),
        (format!("{inpainting}overlap_weight = nan\n"), "method.overlap_weight = NaN"),
        (format!("{inpainting}discriminator_lr = inf\n"), "method.discriminator_lr = inf"),
        (format!("{inpainting}lambda_rec = 0.0\nlambda_adv = 0.0\n"), "method.lambda_rec = 0"),
        (format!("{inpainting}width = 0\n"), "method.width = 0"),
        ("[method]\nproj_dim = 0\n".into(), "method.proj_dim = 0"),
        ("[method]\nname = \"moco\"\nqueue_size = 0\n".into(), "method.queue_size = 0"),
        // Training.
        (format!("{mae}[train]\nbetas = [0.9, 1.0]\n"), "train.betas = [0.9, 1.0]"),
        (format!("{mae}[train]\nbetas = [nan, 0.95]\n"), "train.betas = [NaN, 0.95]"),
        ("[train]\nmomentum = 1.0\n".into(), "train.momentum = 1"),
        ("[train]\neta = 0.0\n".into(), "train.eta = 0"),
        ("[train]\neta = nan\n".into(), "train.eta = NaN"),
        ("[train]\nfinal_lr = nan\n".into(), "train.final_lr = NaN"),
        ("[train]\nbase_lr = 0.1\nfinal_lr = 1.0\n".into(), "train.final_lr = 1: above the peak lr"),
        ("[train]\nweight_decay = nan\n".into(), "train.weight_decay = NaN"),
        ("[train]\nwarmup_epochs = nan\n".into(), "train.warmup_epochs = NaN"),
        ("[train]\nwarmup_fraction = nan\n".into(), "train.warmup_fraction = NaN"),
        ("[train]\nwarmup_fraction = 1.5\n".into(), "train.warmup_fraction = 1.5"),
        (format!("{mae}[train]\nfinal_weight_decay = nan\n"), "train.final_weight_decay = NaN"),
        // Evaluation and fine-tuning.
        ("[eval]\nknn_k = 0\n".into(), "eval.knn_k = 0"),
        ("[eval]\nknn_t = 0.0\n".into(), "eval.knn_t = 0"),
        ("[eval]\nknn_t = nan\n".into(), "eval.knn_t = NaN"),
        ("[eval]\nbatch_size = 0\n".into(), "eval.batch_size = 0"),
        ("[eval]\nlinear_epochs = 0\n".into(), "eval.linear_epochs = 0"),
        ("[eval]\nlinear_lr = 0.0\n".into(), "eval.linear_lr = 0"),
        ("[eval]\nlinear_lr = nan\n".into(), "eval.linear_lr = NaN"),
        ("[linear_eval]\nweight_decay = nan\n".into(), "linear_eval.weight_decay = NaN"),
        ("[linear_eval]\nbase_lr = inf\n".into(), "linear_eval.base_lr = inf"),
        ("[linear_eval]\nlast_blocks = 0\n".into(), "linear_eval.last_blocks = 0"),
        ("[finetune]\nepochs = 0\n".into(), "finetune.epochs = 0"),
        ("[finetune]\nbase_lr = 0.0\n".into(), "finetune.base_lr = 0"),
        ("[finetune]\nlayer_decay = nan\n".into(), "finetune.layer_decay = NaN"),
        ("[finetune]\nweight_decay = nan\n".into(), "finetune.weight_decay = NaN"),
        ("[finetune]\nwarmup_epochs = nan\n".into(), "finetune.warmup_epochs = NaN"),
        ("[finetune]\nmixup = nan\n".into(), "finetune.mixup = NaN"),
        ("[finetune]\nrandom_erasing = 2.0\n".into(), "finetune.random_erasing = 2"),
        ("[finetune]\nrand_augment = { m = nan }\n".into(), "finetune.rand_augment"),
    ];
    let mut wrong = vec![];
    for (text, expected) in &rows {
        match Recipe::parse(text) {
            Ok(_) => wrong.push(format!("accepted:\n{text}")),
            Err(e) if !format!("{e:#}").contains(expected) => {
                wrong.push(format!("{text}refused with `{e:#}`, not `{expected}`"))
            }
            Err(_) => {}
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} rows:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n\n")
    );
    // A view of a kind that makes none is left out of a preset: DINO without local crops.
    assert!(Recipe::parse(&format!("{dino}[augment]\nlocal_crops = 0\n")).is_ok());
}

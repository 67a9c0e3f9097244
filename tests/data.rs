//! Data sources on real files: CIFAR binary releases, image folders and archives, idx files,
//! and the downloader against a server on 127.0.0.1.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;

use image::{DynamicImage, GrayImage, ImageBuffer, Rgb, RgbImage, Rgba, RgbaImage};
use selfsup::data::{check_eval_classes, download, Dataset, LoadOptions, Split};

fn open(path: &Path) -> anyhow::Result<Dataset> {
    Dataset::open(path, &LoadOptions::default())
}

#[test]
fn cifar10_binary_release_reads_every_record() {
    let dir = tempfile::tempdir().unwrap();
    let written = common::write_cifar10(dir.path(), 3);
    let ds = open(dir.path()).unwrap();
    assert_eq!(ds.classes, selfsup::data::CIFAR10_CLASSES);
    let train = ds.split("train").unwrap();
    let test = ds.split("test").unwrap();
    assert_eq!((train.len(), test.len()), (15, 3));
    // Planar R, G, B records decode to the very pixels and labels that were written.
    let expected: Vec<_> = written[..5].iter().flatten().collect();
    for (i, (img, label)) in expected.iter().enumerate() {
        assert_eq!(&train.images[i], img, "image {i}");
        assert_eq!(train.labels.as_ref().unwrap()[i], *label);
    }
    assert_eq!(test.images[2], written[5][2].0);
}

#[test]
fn cifar10_archive_reads_like_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cifar10(&dir.path().join("bin"), 2);
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    common::tar_gz(&dir.path().join("bin"), "cifar-10-batches-bin", &archive);
    let a = open(&archive).unwrap();
    let b = open(&dir.path().join("bin")).unwrap();
    assert_eq!(
        a.split("train").unwrap().images,
        b.split("train").unwrap().images
    );
    assert_eq!(
        a.split("test").unwrap().labels,
        b.split("test").unwrap().labels
    );
}

#[test]
fn truncated_cifar_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cifar10(dir.path(), 2);
    let path = dir.path().join("data_batch_3.bin");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(
        err.contains("data_batch_3.bin") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_cifar_batch_is_named() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cifar10(dir.path(), 1);
    std::fs::remove_file(dir.path().join("data_batch_5.bin")).unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(err.contains("data_batch_5.bin"), "{err}");
}

#[test]
fn cifar100_uses_fine_labels_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = Vec::new();
    for i in 0..4u8 {
        records.extend([i % 20, 50 + i]); // coarse, fine
        records.extend(common::pattern(i as u32).pixels().map(|p| p.0[0]));
        records.extend(common::pattern(i as u32).pixels().map(|p| p.0[1]));
        records.extend(common::pattern(i as u32).pixels().map(|p| p.0[2]));
    }
    std::fs::write(dir.path().join("train.bin"), &records).unwrap();
    std::fs::write(dir.path().join("test.bin"), &records[..2 * 3074]).unwrap();
    let names: Vec<String> = (0..100).map(|i| format!("fine{i}")).collect();
    std::fs::write(dir.path().join("fine_label_names.txt"), names.join("\n")).unwrap();
    let ds = open(dir.path()).unwrap();
    assert_eq!(ds.classes.len(), 100);
    assert_eq!(
        ds.split("train").unwrap().labels.as_ref().unwrap()[..],
        [50, 51, 52, 53]
    );
    assert_eq!(ds.split("test").unwrap().len(), 2);
    assert_eq!(ds.split("train").unwrap().images[3], common::pattern(3));
}

/// An image folder with every kind of image a user has: JPEG, grayscale, RGBA, 16-bit, WebP-less PNG.
fn write_mixed_folder(root: &Path) {
    for split in ["train", "test"] {
        for (c, class) in ["cat", "dog"].iter().enumerate() {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            common::pattern(c as u32).save(dir.join("a.jpg")).unwrap();
            GrayImage::from_fn(20, 10, |x, _| image::Luma([x as u8 * 10]))
                .save(dir.join("gray.png"))
                .unwrap();
            RgbaImage::from_pixel(12, 12, Rgba([10, 20, 30, 40]))
                .save(dir.join("rgba.png"))
                .unwrap();
            let deep: ImageBuffer<Rgb<u16>, Vec<u16>> =
                ImageBuffer::from_pixel(8, 8, Rgb([65535, 0, 32896]));
            DynamicImage::ImageRgb16(deep)
                .save(dir.join("deep.png"))
                .unwrap();
        }
    }
}

#[test]
fn image_folder_with_splits_makes_everything_rgb() {
    let dir = tempfile::tempdir().unwrap();
    write_mixed_folder(dir.path());
    let ds = open(dir.path()).unwrap();
    assert_eq!(ds.classes, ["cat", "dog"]);
    let train = ds.split("train").unwrap();
    assert_eq!(train.len(), 8);
    assert_eq!(train.labels.as_ref().unwrap()[..], [0, 0, 0, 0, 1, 1, 1, 1]);
    // Sorted by name: a.jpg, deep.png, gray.png, rgba.png; named by their paths (`embed`),
    // also in a subset (one image of each class).
    let names = train.file_names();
    assert_eq!(names[1], "train/cat/deep.png");
    assert_eq!(names[7], "train/dog/rgba.png");
    let two = train.subset(2, 0);
    let picked = two.file_names();
    assert!(
        picked[0].starts_with("train/cat/") && picked[1].starts_with("train/dog/"),
        "{picked:?}"
    );
    for (name, img) in picked.iter().zip(two.images.iter()) {
        let at = names.iter().position(|n| n == name).unwrap();
        assert_eq!(&train.images[at], img, "{name}");
    }
    assert_eq!(
        train.images[1].get_pixel(0, 0).0,
        [255, 0, 128],
        "16-bit scaled to 8-bit"
    );
    assert_eq!(train.images[2].dimensions(), (20, 10));
    assert_eq!(
        train.images[2].get_pixel(5, 0).0,
        [50, 50, 50],
        "grayscale replicated"
    );
    assert_eq!(
        train.images[3].get_pixel(0, 0).0,
        [10, 20, 30],
        "alpha dropped"
    );
}

#[test]
fn image_folder_archive_and_load_size() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    std::fs::create_dir_all(&root).unwrap();
    image::RgbImage::from_pixel(400, 200, Rgb([1, 2, 3]))
        .save(root.join("wide.png"))
        .unwrap();
    image::RgbImage::from_pixel(50, 60, Rgb([1, 2, 3]))
        .save(root.join("small.png"))
        .unwrap();
    let archive = dir.path().join("photos.tar");
    let mut tar = tar::Builder::new(std::fs::File::create(&archive).unwrap());
    tar.append_dir_all("photos", &root).unwrap();
    tar.finish().unwrap();
    let ds = Dataset::open(
        &archive,
        &LoadOptions {
            load_size: Some(100),
            skip_bad: false,
        },
    )
    .unwrap();
    assert!(ds.classes.is_empty(), "a flat folder is unlabelled");
    let split = ds.split("train").unwrap();
    assert_eq!(split.file_names(), ["small.png", "wide.png"]);
    assert!(split.labels.is_none());
    assert_eq!(
        split.images[0].dimensions(),
        (50, 60),
        "small images stay as they are"
    );
    assert_eq!(
        split.images[1].dimensions(),
        (200, 100),
        "shorter side resized to the load size"
    );
}

#[test]
fn files_that_are_not_images_are_ignored_and_counted() {
    // As torchvision's ImageFolder: a file is an image by its extension, in any case.
    let dir = tempfile::tempdir().unwrap();
    write_mixed_folder(dir.path());
    std::fs::write(dir.path().join("train/dog/readme.txt"), "not a picture").unwrap();
    std::fs::write(dir.path().join("train/cat/labels.csv"), "a.jpg,cat\n").unwrap();
    std::fs::write(dir.path().join("LICENSE"), "CC-BY").unwrap();
    std::fs::write(dir.path().join("test/cat/Thumbs.db"), [0u8; 64]).unwrap();
    // An upper-case extension is an image, and the format is sniffed from the bytes: a PNG
    // named .JPG decodes.
    std::fs::copy(
        dir.path().join("train/cat/gray.png"),
        dir.path().join("train/cat/IMG_0001.JPG"),
    )
    .unwrap();
    let ds = open(dir.path()).unwrap();
    assert_eq!(ds.split("train").unwrap().len(), 9);
    assert_eq!(ds.split("test").unwrap().len(), 8);
    assert_eq!(ds.classes, ["cat", "dog"]);
    assert_eq!(ds.ignored.len(), 4, "{:?}", ds.ignored);
    assert!(
        ds.summary().contains("ignored 4 files that are not images"),
        "{}",
        ds.summary()
    );

    // The same from a .tar.gz of the folder.
    let elsewhere = tempfile::tempdir().unwrap();
    let archive = elsewhere.path().join("mixed.tar.gz");
    common::tar_gz(dir.path(), "mixed", &archive);
    let ds = open(&archive).unwrap();
    assert_eq!((ds.split("train").unwrap().len(), ds.ignored.len()), (9, 4));

    // A folder of text files only names what it found and what it looks for.
    let texts = tempfile::tempdir().unwrap();
    std::fs::write(texts.path().join("notes.txt"), "x").unwrap();
    let err = format!("{:#}", open(texts.path()).unwrap_err());
    assert!(
        err.contains("no images") && err.contains("notes.txt") && err.contains("jpg"),
        "{err}"
    );
}

#[test]
fn corrupt_images_are_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_mixed_folder(dir.path());
    let jpeg = std::fs::read(dir.path().join("train/cat/a.jpg")).unwrap();
    std::fs::write(
        dir.path().join("train/cat/broken.jpg"),
        &jpeg[..jpeg.len() / 3],
    )
    .unwrap();
    // An image extension on bytes that are no image stays an error.
    std::fs::write(dir.path().join("train/dog/notes.png"), "not a picture").unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(
        err.contains("broken.jpg") && err.contains("notes.png") && err.contains("--skip-bad"),
        "{err}"
    );
    let ds = Dataset::open(
        dir.path(),
        &LoadOptions {
            load_size: None,
            skip_bad: true,
        },
    )
    .unwrap();
    assert_eq!(ds.skipped.len(), 2);
    assert_eq!(ds.split("train").unwrap().len(), 8);
}

#[test]
fn empty_folder_and_empty_class_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(err.contains("no images"), "{err}");
    write_mixed_folder(dir.path());
    std::fs::create_dir_all(dir.path().join("test/bird")).unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(
        err.contains("test/bird") && err.contains("no images"),
        "{err}"
    );
    let err = format!("{:#}", open(&dir.path().join("nowhere")).unwrap_err());
    assert!(err.contains("nowhere"), "{err}");
}

/// MNIST-style idx files `{prefix}-images-idx3-ubyte.gz` (and labels) of `n` 28x28 digits.
fn write_idx(dir: &Path, prefix: &str, n: usize) {
    write_idx_named(dir, prefix, n, "-", true);
}

/// Idx files named `{prefix}-images{sep}idx3-ubyte` (7-zip unpacks `sep` as '.'), gzipped or raw.
fn write_idx_named(dir: &Path, prefix: &str, n: usize, sep: &str, gzipped: bool) {
    let mut images = vec![0, 0, 8, 3];
    for v in [n as u32, 28, 28] {
        images.extend(v.to_be_bytes());
    }
    images.extend((0..n * 784).map(|i| (i % 251) as u8));
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    labels.extend((0..n).map(|i| (i % 10) as u8));
    let write = |name: String, bytes: Vec<u8>| {
        if !gzipped {
            return std::fs::write(dir.join(name), bytes).unwrap();
        }
        let mut enc = flate2::write::GzEncoder::new(
            std::fs::File::create(dir.join(name + ".gz")).unwrap(),
            flate2::Compression::fast(),
        );
        enc.write_all(&bytes).unwrap();
        enc.finish().unwrap();
    };
    write(format!("{prefix}-images{sep}idx3-ubyte"), images);
    write(format!("{prefix}-labels{sep}idx1-ubyte"), labels);
}

#[test]
fn idx_files_as_7zip_names_them_are_the_same_dataset() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_idx(a.path(), "train", 5);
    write_idx(a.path(), "t10k", 3);
    write_idx_named(b.path(), "train", 5, ".", false);
    write_idx_named(b.path(), "t10k", 3, ".", true);
    let (a, b) = (open(a.path()).unwrap(), open(b.path()).unwrap());
    for split in ["train", "test"] {
        let (a, b) = (a.split(split).unwrap(), b.split(split).unwrap());
        assert_eq!((&a.images, &a.labels), (&b.images, &b.labels), "{split}");
    }
}

#[test]
fn idx_images_without_pixels_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "t10k", 3);
    let mut images = vec![0, 0, 8, 3];
    for v in [3u32, 0, 28] {
        images.extend(v.to_be_bytes());
    }
    std::fs::write(dir.path().join("train-images-idx3-ubyte"), images).unwrap();
    let mut labels = vec![0, 0, 8, 1];
    labels.extend(3u32.to_be_bytes());
    labels.extend([0, 1, 2]);
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), labels).unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(
        err.contains("train-images-idx3-ubyte") && err.contains("no pixels"),
        "{err}"
    );
}

#[test]
fn idx_files_read_as_rgb() {
    let dir = tempfile::tempdir().unwrap();
    write_idx(dir.path(), "train", 5);
    write_idx(dir.path(), "t10k", 3);
    let ds = open(dir.path()).unwrap();
    let train = ds.split("train").unwrap();
    assert_eq!(train.len(), 5);
    assert_eq!(train.images[0].dimensions(), (28, 28));
    assert_eq!(train.images[0].get_pixel(3, 0).0, [3, 3, 3]);
    assert_eq!(train.labels.as_ref().unwrap()[4], 4);
    // A truncated idx file is named.
    let path = dir.path().join("t10k-images-idx3-ubyte.gz");
    let raw = {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap())
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    std::fs::write(
        dir.path().join("t10k-images-idx3-ubyte"),
        &raw[..raw.len() - 1],
    )
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(
        err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
        "{err}"
    );
}

/// Debian's `dataset-fashion-mnist` (installed by .ci/run): the real files users have.
#[test]
#[ignore = "needs Debian's package dataset-fashion-mnist (.ci/run installs it): cargo test -- --ignored"]
fn fashion_mnist_from_debian() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    assert!(
        dir.exists(),
        "apt-get install dataset-fashion-mnist (.ci/run does)"
    );
    let ds = open(dir).unwrap();
    assert_eq!(ds.split("train").unwrap().len(), 60000);
    assert_eq!(ds.split("test").unwrap().len(), 10000);
    assert_eq!(ds.classes[9], "ankle-boot");
    // Found by name where the package puts it, with no copy in the data folder.
    let empty = tempfile::tempdir().unwrap();
    let (ok, out, err) = info_by_name("fashion-mnist", &[("SELFSUP_DATA", empty.path())], None);
    assert!(
        ok && out.contains("split train: 60000 images"),
        "{out}{err}"
    );
}

/// Serves `body` once per connection; with `short`, promises more bytes than it sends.
fn serve(body: Vec<u8>, short: bool, connections: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            let mut stream = stream.unwrap();
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let promised = if short { body.len() * 2 } else { body.len() };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {promised}\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    format!("http://{addr}/cifar-10-binary.tar.gz")
}

#[test]
fn downloader_verifies_length_and_checksum() {
    let dir = tempfile::tempdir().unwrap();
    common::write_cifar10(&dir.path().join("bin"), 2);
    let archive = dir.path().join("archive.tar.gz");
    common::tar_gz(&dir.path().join("bin"), "cifar-10-batches-bin", &archive);
    let bytes = std::fs::read(&archive).unwrap();
    let md5 = format!("{:x}", <md5::Md5 as md5::Digest>::digest(&bytes));
    let out = dir.path().join("downloads");

    // Wrong checksum: refused, and nothing is left that looks like a good file.
    let err = format!(
        "{:#}",
        download(
            &serve(bytes.clone(), false, 1),
            &"0".repeat(32),
            &out,
            "c.tar.gz"
        )
        .unwrap_err()
    );
    assert!(
        err.contains("checksum mismatch") && err.contains(&md5),
        "{err}"
    );
    assert!(!out.join("c.tar.gz").exists() && !out.join("c.tar.gz.part").exists());

    // Truncated transfer: refused.
    let err = format!(
        "{:#}",
        download(&serve(bytes.clone(), true, 1), &md5, &out, "c.tar.gz").unwrap_err()
    );
    assert!(
        err.contains("truncated") || err.contains("broke off"),
        "{err}"
    );
    assert!(!out.join("c.tar.gz").exists());

    // A good archive is kept and reads as a dataset.
    let path = download(&serve(bytes.clone(), false, 1), &md5, &out, "c.tar.gz").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(open(&path).unwrap().split("train").unwrap().len(), 10);
    // Already there with the right checksum: no connection is made (the server is gone).
    assert_eq!(
        download("http://127.0.0.1:9/never", &md5, &out, "c.tar.gz").unwrap(),
        path
    );
}

/// `selfsup data info NAME` with the given environment: (ok, stdout, stderr).
fn info_by_name(name: &str, env: &[(&str, &Path)], mirror: Option<&str>) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_selfsup"));
    // A mirror no one serves unless one is given: no test reaches the network.
    cmd.args(["data", "info", name])
        .env_remove("SELFSUP_DATA")
        .env_remove("SELFSUP_SYSTEM_DATASETS")
        .env(
            "SELFSUP_DATA_MIRROR",
            mirror.unwrap_or("http://127.0.0.1:9"),
        );
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn datasets_by_name_come_from_the_data_folder_or_a_download() {
    // A copy in $SELFSUP_DATA, in the official binary layout.
    let data = tempfile::tempdir().unwrap();
    common::write_cifar10(&data.path().join("cifar-10-batches-bin"), 20);
    let (ok, out, err) = info_by_name("cifar10", &[("SELFSUP_DATA", data.path())], None);
    assert!(ok, "{err}");
    assert!(out.contains("split train: 100 images"), "{out}");

    // Without the variable, the platform's cache folder: here the official archive's name.
    let cache = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(cache.path().join("selfsup")).unwrap();
    common::tar_gz(
        &data.path().join("cifar-10-batches-bin"),
        "cifar-10-batches-bin",
        &cache.path().join("selfsup/cifar-10-binary.tar.gz"),
    );
    let (ok, out, err) = info_by_name("cifar10", &[("XDG_CACHE_HOME", cache.path())], None);
    assert!(ok && out.contains("split test: 20 images"), "{out}{err}");

    // No copy anywhere: the official files are downloaded into the data folder (here from a
    // mirror on 127.0.0.1), and one that is not the published file is refused by its MD5,
    // naming what was looked for where; nothing that looks like a good file is left.
    let empty = tempfile::tempdir().unwrap();
    let url = serve(b"not cifar-100".to_vec(), false, 1);
    let mirror = url.rsplit_once('/').unwrap().0;
    let (ok, _, err) = info_by_name("cifar100", &[("SELFSUP_DATA", empty.path())], Some(mirror));
    assert!(!ok, "{err}");
    for part in [
        "dataset cifar100: no copy in",
        "cifar-100-binary.tar.gz",
        "checksum mismatch",
        "03b5dce01913d631647c71ecec9e9cb8",
        &format!("{mirror}/cifar-100-binary.tar.gz"),
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let left: Vec<_> = walk_files(empty.path());
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn fashion_mnist_by_name_comes_from_debians_package_folder() {
    // The layout dataset-fashion-mnist installs: the four gzipped idx files in
    // <system datasets>/fashion-mnist/ (/usr/share/datasets unless SELFSUP_SYSTEM_DATASETS).
    let system = tempfile::tempdir().unwrap();
    let package = system.path().join("fashion-mnist");
    std::fs::create_dir_all(&package).unwrap();
    write_idx(&package, "train", 6);
    write_idx(&package, "t10k", 2);
    let empty = tempfile::tempdir().unwrap();
    let env = [
        ("SELFSUP_DATA", empty.path()),
        ("SELFSUP_SYSTEM_DATASETS", system.path()),
    ];
    let (ok, out, err) = info_by_name("fashion-mnist", &env, None);
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("source: {}", package.display())),
        "{out}"
    );
    assert!(
        out.contains("split train: 6 images, 28x28x3") && out.contains("split test: 2 images"),
        "{out}"
    );
    assert!(out.contains("ankle-boot"), "{out}");

    // Without the package (nor a copy, nor a download), the error names where it looked.
    std::fs::remove_dir_all(&package).unwrap();
    let (ok, _, err) = info_by_name("fashion-mnist", &env, None);
    assert!(!ok, "{err}");
    assert!(err.contains(&package.display().to_string()), "{err}");
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A labelled split sorted by class, as a folder lists it: `counts[c]` images of class `c`,
/// image `i` one pixel of red `i`.
fn class_sorted_split(counts: &[usize]) -> Split {
    let labels: Vec<u32> = (0..counts.len() as u32)
        .flat_map(|c| vec![c; counts[c as usize]])
        .collect();
    let images = (0..labels.len())
        .map(|i| RgbImage::from_pixel(1, 1, Rgb([i as u8, 0, 0])))
        .collect();
    Split::new("train", images, Some(labels))
}

#[test]
fn subsets_are_drawn_per_class_seeded_and_counted() {
    let classes = ["a".to_string(), "b".to_string()];
    let split = class_sorted_split(&[90, 10]);
    let eight = split.limit("data.train_limit", 8, 0, &classes).unwrap();
    assert_eq!(eight.describe_counts(&classes), "a 7, b 1");
    // Drawn by the seed: the same seed, the same images; another seed, others.
    let again = split.limit("data.train_limit", 8, 0, &classes).unwrap();
    assert_eq!(eight.images, again.images);
    let other = split.limit("data.train_limit", 8, 1, &classes).unwrap();
    assert_ne!(eight.images, other.images);
    // In proportion, but every class keeps one image.
    let shares: Vec<usize> = class_sorted_split(&[97, 2, 1])
        .subset(5, 0)
        .class_counts()
        .into_values()
        .collect();
    assert_eq!(shares, [3, 1, 1]);
    // A limit below the number of classes cannot keep them all: refused, named by its key.
    let err = split
        .limit("finetune.train_limit", 1, 0, &classes)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("finetune.train_limit = 1") && err.contains("2 classes"),
        "{err}"
    );
    // A picture may show fewer images than classes; 0 is no limit.
    assert_eq!(split.subset(1, 0).len(), 1);
    assert_eq!(split.limit("k", 0, 0, &classes).unwrap().len(), 100);
    // An unlabelled split keeps an even spread.
    let unlabelled = Split::new("train", split.images.to_vec(), None);
    let reds: Vec<u8> = unlabelled
        .subset(4, 0)
        .images
        .iter()
        .map(|i| i.get_pixel(0, 0).0[0])
        .collect();
    assert_eq!(reds, [0, 25, 50, 75]);
}

#[test]
fn a_test_class_the_training_split_lacks_is_refused_for_evaluation() {
    let dir = tempfile::tempdir().unwrap();
    common::write_folder(
        dir.path(),
        &[
            ("train", "a", 2),
            ("train", "b", 2),
            ("train", "c", 2),
            ("test", "a", 1),
            ("test", "c", 1),
            ("test", "d", 4),
        ],
    );
    let ds = open(dir.path()).unwrap();
    let (train, test) = (ds.split("train").unwrap(), ds.split("test").unwrap());
    let err = check_eval_classes(train, test, &ds.classes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'d' (4 images)"), "{err}");
    // A training class the test split lacks ('b') takes nothing from the score.
    let labels = test.labels.as_ref().unwrap();
    let known: Vec<usize> = (0..test.len()).filter(|&i| labels[i] != 3).collect();
    let without_d = Split::new(
        "test",
        known.iter().map(|&i| test.images[i].clone()).collect(),
        Some(known.iter().map(|&i| labels[i]).collect()),
    );
    check_eval_classes(train, &without_d, &ds.classes).unwrap();
    // `data info` names the class each split lacks.
    let info = ds.summary();
    assert!(info.contains("split train lacks: d"), "{info}");
    assert!(info.contains("split test lacks: b"), "{info}");
}

#[test]
fn images_without_pixels_are_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    common::write_folder(dir.path(), &[("a", "", 1), ("b", "", 1)]);
    for (name, (w, h)) in [
        ("a/none.ppm", (0, 0)),
        ("a/flat.ppm", (40, 0)),
        ("b/thin.ppm", (0, 40)),
    ] {
        std::fs::write(dir.path().join(name), format!("P6\n{w} {h}\n255\n")).unwrap();
    }
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    for name in ["none.ppm", "flat.ppm", "thin.ppm"] {
        assert!(err.contains(name) && err.contains("no pixels"), "{err}");
    }
    let skipping = LoadOptions {
        load_size: None,
        skip_bad: true,
    };
    let ds = Dataset::open(dir.path(), &skipping).unwrap();
    assert_eq!(ds.skipped.len(), 3);
    assert_eq!(ds.split("train").unwrap().len(), 2);
}

#[test]
fn a_load_size_of_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    common::write_folder(dir.path(), &[("a", "", 1)]);
    let zero = LoadOptions {
        load_size: Some(0),
        skip_bad: false,
    };
    let err = format!("{:#}", Dataset::open(dir.path(), &zero).unwrap_err());
    assert!(err.contains("load_size") && err.contains('0'), "{err}");
}

#[cfg(unix)]
#[test]
fn folder_links_are_followed_a_cycle_skipped_and_a_dangling_one_named() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let (data, elsewhere) = (dir.path().join("data"), dir.path().join("elsewhere"));
    common::write_folder(&data, &[("cat", "", 2)]);
    common::write_folder(&elsewhere, &[("dog", "", 3)]);
    common::pattern(9).save(elsewhere.join("c.png")).unwrap();
    symlink(elsewhere.join("dog"), data.join("dog")).unwrap();
    symlink(elsewhere.join("c.png"), data.join("cat/c.png")).unwrap();
    symlink("..", data.join("cat/loop")).unwrap();
    let (ok, out, err) = common::selfsup(&["data", "info", data.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("split train: 6 images"), "{out}");
    assert!(out.contains("classes: 2"), "{out}");
    assert!(err.contains("cat/loop") && err.contains("cycle"), "{err}");
    symlink(dir.path().join("nowhere"), data.join("cat/gone")).unwrap();
    let err = format!("{:#}", open(&data).unwrap_err());
    assert!(err.contains("cat/gone") && err.contains("nowhere"), "{err}");
}

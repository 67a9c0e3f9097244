"""torchvision reference for benches/augment.rs: the same pipelines on the same images.

SimCLR at 32 px on 10,000 CIFAR-10 training images, DINO multi-crop (2 x 224 + 8 x 96) on
../shared/data/photos, each image a PIL image in memory, views normalised to tensors, as a
DataLoader worker would. Threads: torch.set_num_threads(1) in one process, then 2 worker
processes (torchvision's usual parallelism).

Run: python3 benches/reference/augment_torchvision.py   (needs torch, torchvision, pillow)
"""
import io
import os
import tarfile
import time
from multiprocessing import Pool

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "..", "shared", "data")
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class Blur:
    """DINO's PIL Gaussian blur with a random radius."""

    def __init__(self, p, lo=0.1, hi=2.0):
        self.p, self.lo, self.hi = p, lo, hi

    def __call__(self, img):
        if torch.rand(1) < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(self.lo, self.hi))))
        return img


class Solarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if torch.rand(1) < self.p else img


def simclr(size=32):
    view = T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(kernel_size=max(3, int(0.1 * size)) | 1, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(**IMAGENET),
    ])
    return lambda img: [view(img), view(img)]


def dino(global_size=224, local_size=96, local_crops=8):
    jitter = T.Compose([
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    norm = T.Compose([T.ToTensor(), T.Normalize(**IMAGENET)])
    g1 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0)), jitter, Blur(1.0), norm])
    g2 = T.Compose([T.RandomResizedCrop(global_size, scale=(0.4, 1.0)), jitter, Blur(0.1), Solarize(0.2), norm])
    local = T.Compose([T.RandomResizedCrop(local_size, scale=(0.05, 0.4)), jitter, Blur(0.5), norm])
    return lambda img: [g1(img), g2(img)] + [local(img) for _ in range(local_crops)]


def load_cifar(n=10_000):
    images = []
    with tarfile.open(os.path.join(SHARED, "cifar10-jpeg.tar.gz")) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and "/train/" in m.name), key=lambda m: m.name)
        stride = len(members) / n
        for i in range(n):
            data = tar.extractfile(members[int(i * stride)]).read()
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return images


def load_photos():
    folder = os.path.join(SHARED, "photos")
    out = []
    for name in sorted(os.listdir(folder)):
        try:
            out.append(Image.open(os.path.join(folder, name)).convert("RGB"))
        except Exception:
            pass  # the licence and readme text files
    return out


def _work(args):
    name, images, seed = args
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    pipeline = PIPELINES[name]()
    return sum(len(pipeline(img)) for img in images)


PIPELINES = {"simclr": simclr, "dino": dino}


def throughput(name, images, repeats, workers):
    work = images * repeats
    start = time.perf_counter()
    if workers == 1:
        views = _work((name, work, 0))
    else:
        chunks = [(name, work[i::workers], i) for i in range(workers)]
        with Pool(workers) as pool:
            views = sum(pool.map(_work, chunks))
    return views / (time.perf_counter() - start)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cifar, photos = load_cifar(), load_photos()
    print(f"torch {torch.__version__}")
    print("| pipeline | images | processes | views/s |")
    print("|---|---|---|---|")
    for workers in (1, 2):
        print(f"| simclr 32 px, CIFAR-10 | {len(cifar)} | {workers} | {throughput('simclr', cifar, 1, workers):.0f} |")
    for workers in (1, 2):
        print(f"| dino 2x224 + 8x96 px, photos | {len(photos)} | {workers} | {throughput('dino', photos, 3, workers):.0f} |")

"""PyTorch reference for time to accuracy (issue 15): how good a SimCLR encoder a plain PyTorch
script gets out of a fixed CPU budget on this machine, measured the way selfsup measures its own
(`selfsup eval knn`: k = 200, T = 0.1, cosine similarity, votes weighted by exp(sim / T), the
50,000 training images as the bank, the 10,000 test images as queries, centre images only).

Budget: CPU seconds of the whole machine (/proc/stat, user + sys, DataLoader workers included)
from the first training step to the last, so run it on an otherwise idle machine. Decoding the
archive and the kNN evaluation are outside the budget, as they are for selfsup. The schedule is
fitted to the budget: the CPU cost of steps 10 to 30 (inside the warm-up, after the workers'
start) sets how many steps the budget holds, with a linear warm-up over the first 10% and a
cosine decay to 0, and stops early if it would overrun.

Cases:
- simclr_w0.25_sgd: the recipe of issue 15: CIFAR ResNet-18 at width 0.25, batch 256, SGD lr 0.6
  momentum 0.9 (weight decay 1e-5), NT-Xent tau 0.2, BN projection head 512-128.
- simclr_cpu: selfsup's recipes/simclr_cifar10_cpu.toml as it was in issue 15, written in PyTorch:
  width 0.125, AdamW 2e-3 (weight decay 1e-6), the same head and tau (the recipe's later values
  through `--tau`, `--lr`, `--size` and `--width`, below).
- simclr_cpu_tvinit: the same with torchvision's ResNet init of the convolutions (Kaiming normal,
  fan-out, for ReLU), which selfsup's published recipes use, instead of PyTorch's default.
Both with solo-learn's CIFAR views (crop 0.08-1, flip, jitter 0.4/0.4/0.2/0.1 at p 0.8,
grayscale 0.2, no blur), as selfsup's CPU recipe. A case name ending in `_lean` (say
`simclr_cpu_lean`) draws the same views batched in the main process (`lean_views.py`) instead of
a DataLoader with 2 worker processes: the fastest PyTorch for these 2 cores (issue 30).

Run: python3 benches/reference/time_to_accuracy_torch.py CASE [CPU_MINUTES=45]

Or with a fixed schedule instead of a budget, as selfsup's recipe runs it (a warm-up of one
epoch, cosine to 0 over EPOCHS epochs of 195 steps):
  python3 benches/reference/time_to_accuracy_torch.py CASE --epochs EPOCHS [--views FILE]
where FILE holds the views selfsup's own loader drew for its recipe (`cargo run --profile dev
--example dump_views -- recipes/simclr_cifar10_cpu.toml EPOCHS FILE`): then both frameworks train
on exactly the same inputs, in the same order. `--save-init FILE.pth` writes the backbone's
initial weights under torchvision's names, for a selfsup recipe's `model.init`: then both start
from the same backbone as well. `--seed N` (default 0) seeds PyTorch's generator: the init's
draws, and the lean views'. `--tau T` and `--lr LR` replace a case's NT-Xent temperature and peak
learning rate (selfsup's CPU recipe since issue 30's eighth round: `--tau 0.1 --lr 0.004`).
`--size PX` draws the lean views at PX px instead of 32 (the kNN still reads the 32 px images).
`--width W` trains the simclr_cpu cases' ResNet-18 at width W instead of 0.125 (the recipe's since
issue 30's twenty-third round: `--width 0.1875`).
"""
import io
import math
import os
import sys
import tarfile
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, os.path.dirname(__file__))
from lean_views import view  # noqa: E402
from train_throughput_torch import ARCHIVE, MEAN, STD, SimCLR, Views, cpu_seconds, lean_batches, normalize  # noqa: E402

torch.set_num_threads(2)


def cifar(split):
    """(images, labels) of one split, classes numbered in the sorted order of their folders."""
    found = []
    with tarfile.open(ARCHIVE) as tar:
        for m in tar.getmembers():
            if m.isfile() and f"/{split}/" in m.name and m.name.endswith(".jpg"):
                image = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                found.append((m.name.split("/")[-2], m.name, image))
    classes = sorted({c for c, _, _ in found})
    found.sort(key=lambda f: f[1])
    return [i for _, _, i in found], [classes.index(c) for c, _, _ in found]


def solo_view():
    return T.Compose([
        T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        *normalize()])


@torch.no_grad()
def features(backbone, images):
    backbone.eval()
    to_tensor = T.Compose(normalize())
    out = [backbone(torch.stack([to_tensor(i) for i in images[s:s + 512]])) for s in range(0, len(images), 512)]
    return F.normalize(torch.cat(out), dim=1)


@torch.no_grad()
def knn(train, train_labels, test, test_labels, k=200, t=0.1, classes=10):
    train_labels, correct = torch.tensor(train_labels), 0
    for s in range(0, len(test), 256):
        sims, idx = (test[s:s + 256] @ train.t()).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], classes).scatter_add_(1, train_labels[idx], (sims / t).exp())
        correct += (votes.argmax(1) == torch.tensor(test_labels[s:s + 256])).sum().item()
    return 100.0 * correct / len(test)


def dumped_batches(path, batch):
    """The views of `dump_views.rs` (beside this script), `[steps, 2, batch, 3, 32, 32]` u8, normalised."""
    import numpy as np
    data = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 2, batch, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for step in range(data.shape[0]):
        yield [(torch.from_numpy(np.array(data[step, v])).float() / 255 - mean) / std for v in range(2)]


def torchvision_names(backbone):
    """The backbone's state dict under torchvision's ResNet names (`layer1.0.conv1.weight`, ...),
    which `model.init` of a selfsup recipe reads."""
    def rename(key):
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            key = f"layer{int(i) // 2 + 1}.{int(i) % 2}.{rest.replace('down.', 'downsample.')}"
        return key
    return {rename(k): v for k, v in backbone.state_dict().items()}


def main(name, budget_minutes, epochs=None, views_file=None, save_init=None, seed=0, tau=None, lr=None, size=32, width=None):
    torch.manual_seed(seed)
    lean = name.endswith("_lean")
    if size != 32 and (not lean or views_file):
        sys.exit("--size draws the lean views only: name a case ending in _lean, without --views")
    name = name.removesuffix("_lean")
    if width is not None and name == "simclr_w0.25_sgd":
        sys.exit("--width sets the simclr_cpu cases' width: simclr_w0.25_sgd's is its name's")
    if name == "simclr_w0.25_sgd":
        model = SimCLR(0.25)
        opt = torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-5)
    elif name in ("simclr_cpu", "simclr_cpu_tvinit"):
        model = SimCLR(0.125 if width is None else width)
        if name == "simclr_cpu_tvinit":
            for m in model.backbone.modules():
                if isinstance(m, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-6)
    else:
        raise SystemExit(f"unknown case {name}")
    if tau is not None:
        model.tau = tau
    if lr is not None:
        opt.param_groups[0]["lr"] = lr
    if save_init:
        torch.save(torchvision_names(model.backbone), save_init)
    peak_lr, batch, budget = opt.param_groups[0]["lr"], 256, 60 * budget_minutes
    train, train_labels = cifar("train")
    test, test_labels = cifar("test")
    def batches():
        if views_file:
            yield from dumped_batches(views_file, batch)
            return
        if lean:
            solo = lambda x: view(x, size, (0.08, 1.0), (0.8, 0.4, 0.4, 0.2, 0.1), 0.2)
            yield from lean_batches(train, [solo, solo], batch)
        loader = torch.utils.data.DataLoader(Views(train, [solo_view(), solo_view()]), batch_size=batch,
                                             shuffle=True, drop_last=True, num_workers=2, persistent_workers=True)
        while True:
            yield from loader

    calibration, total, step, warmup, used_at_start = (10, 30), None, 0, None, 0.0
    if epochs is not None:
        steps_per_epoch = 50000 // batch
        calibration, total, warmup, budget = (-1, -1), epochs * steps_per_epoch, steps_per_epoch, float("inf")
    cpu0, wall0, recent = sum(cpu_seconds()), time.perf_counter(), []
    model.train()
    for views in batches():
        used = sum(cpu_seconds()) - cpu0
        if step == calibration[0]:
            used_at_start = used
        if step == calibration[1]:
            per_step = (used - used_at_start) / (calibration[1] - calibration[0])
            total = step + int((budget - used) / per_step)
            warmup = max(step, total // 10)
            print(f"{per_step:.2f} CPU-s a step: {total} steps ({total * batch / 50000:.2f} epochs) "
                  f"in {budget_minutes} CPU-min", flush=True)
        if total is not None and (step >= total or used > budget):
            break
        w = warmup or total or 100
        lr = peak_lr * (step + 1) / w if step < w else peak_lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(views)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        recent = recent[-9:] + [loss.item()]
        if step % 50 == 0:
            print(f"step {step}/{total} loss {sum(recent) / len(recent):.3f} (mean of the last {len(recent)}) "
                  f"lr {lr:.4f} {used / 60:.1f} CPU-min", flush=True)
    cpu, wall = sum(cpu_seconds()) - cpu0, time.perf_counter() - wall0
    accuracy = knn(features(model.backbone, train), train_labels, features(model.backbone, test), test_labels)
    print(f"| PyTorch {torch.__version__} {name}{' (lean)' if lean else ''} | {step} steps ({step * batch / 50000:.2f} epochs) | "
          f"{cpu / 60:.1f} CPU-min ({wall / 60:.1f} min wall) | kNN top-1 {accuracy:.2f}% |", flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("cpu_minutes", nargs="?", type=float, default=45.0)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--views")
    parser.add_argument("--save-init")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tau", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--size", type=int, default=32, help="the training views' side in px (lean views only); kNN on the 32 px images")
    parser.add_argument("--width", type=float, help="the ResNet-18's width in the simclr_cpu cases (default 0.125)")
    a = parser.parse_args()
    main(a.case, a.cpu_minutes, a.epochs, a.views, a.save_init, a.seed, a.tau, a.lr, a.size, a.width)

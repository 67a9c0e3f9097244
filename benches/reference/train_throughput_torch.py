"""PyTorch reference for benches/train_throughput.rs: the same four training recipes, as a plain
PyTorch user would write them, on the same CIFAR-10 copy and the same 2 cores.

Each case decodes ../shared/data/cifar10-jpeg.tar.gz into memory, draws the views with
torchvision transforms in a DataLoader (2 worker processes, as many as cores), and trains
with torch.set_num_threads(2): 2 warm-up steps, then the timed steps. img/s is images over the
timed steps' wall time; CPU seconds are the whole machine's (/proc/stat, the workers included),
so run it on an otherwise idle machine. Peak RSS: the main process's (ru_maxrss), one process a
case.

Cases (as in the Rust bench):
- simclr_r18w0.25_b256: CIFAR ResNet-18 at width 0.25, head 128-512-128 with BN, NT-Xent τ 0.2,
  SGD lr 0.6 momentum 0.9, batch 256, SimCLR views.
- simclr_r18_b128: the same at full width (head 512-512-128), batch 128.
- mae_vit_tiny4_b64: ViT-Tiny/4 at 32 px, mask 0.75, decoder 256-d x 4 blocks, norm-pix loss,
  AdamW (0.9, 0.95), batch 64, MAE views.
- dino_vit_tiny4_2+4crops_b64: ViT-Tiny/4, DINO head 2048-2048-256 -> 4096, EMA teacher,
  2 global crops of 32 px + 4 local crops of 16 px, AdamW, grad clip 3, batch 64.

Two ways to make the views, both kept:
- workers (the default): torchvision transforms per image in a DataLoader with 2 worker
  processes, as the PyTorch tutorials do; on these 2 cores about a third of the CPU goes to the
  kernel (process switches, shared-memory batches).
- --lean: the whole batch's views as tensor ops in the main process (`lean_views.py`: crops by
  affine_grid / grid_sample, jitter, grayscale, blur and solarize on the batch), the fastest
  PyTorch we could write for 32 px images here. Issue 30 compares selfsup with this one.

--bf16 runs each step's forward in `torch.autocast("cpu", dtype=torch.bfloat16)` (oneDNN's bf16
kernels, on AMX tiles where the CPU has them), the counterpart of selfsup's `--bf16`.

--flops counts each case's GFLOP per image and training step instead (torch.utils.flop_counter:
matmuls, convolutions, attention; forward and backward): img/s times it is the GFLOP/s of either
framework, which runs the same recipe.

Run: python3 benches/reference/train_throughput_torch.py [--lean] [--bf16] [CASE...]   (needs torch, torchvision)
     python3 benches/reference/train_throughput_torch.py --flops [CASE...]
"""
import copy
import io
import math
import os
import resource
import subprocess
import sys
import tarfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

torch.set_num_threads(2)
torch.manual_seed(0)
ARCHIVE = os.path.join(os.path.dirname(__file__), "../../../shared/data/cifar10-jpeg.tar.gz")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_train():
    images = []
    with tarfile.open(ARCHIVE) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/train/" in m.name and m.name.endswith(".jpg"):
                images.append(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
    return images


# ---- views -------------------------------------------------------------------------------
def normalize():
    return [T.ToTensor(), T.Normalize(MEAN, STD)]


def simclr_view():
    return T.Compose([
        T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=0.5), *normalize()])


def dino_view(size, scale, blur, solarize=0.0):
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.RandomApply([T.GaussianBlur(3, (0.1, 2.0))], p=blur), T.RandomSolarize(128, p=solarize),
        *normalize()])


class Views(torch.utils.data.Dataset):
    def __init__(self, images, views):
        self.images, self.views = images, views

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return [v(self.images[i]) for v in self.views]


# ---- models ------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """CIFAR stem (3x3 stride 1, no max-pool), widths 64·w ... 512·w, as selfsup's."""

    def __init__(self, width=1.0):
        super().__init__()
        c = [max(1, round(64 * width * 2 ** i)) for i in range(4)]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c[0])
        layers, cin = [], c[0]
        for i, cout in enumerate(c):
            layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.dim = c[3]

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.layers(F.relu(self.bn1(self.conv1(x)))), 1).flatten(1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, d))


class VitBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Vit(nn.Module):
    """ViT-Tiny/4 at 32 px (timm's layout); positional embeddings resized for other grids."""

    def __init__(self, dim=192, depth=12, heads=3, patch=4, size=32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(VitBlock(dim, heads) for _ in range(depth))
        self.norm, self.dim = nn.LayerNorm(dim, eps=1e-6), dim

    def tokens(self, x):
        x = self.patch(x)
        g, side = x.shape[-1], int(math.sqrt(self.pos.shape[1] - 1))
        pos = self.pos[:, 1:]
        if g != side:
            pos = F.interpolate(pos.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(g, g),
                                mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, g * g, -1)
        return x.flatten(2).transpose(1, 2) + pos

    def encode(self, tokens):
        x = torch.cat([(self.cls + self.pos[:, :1]).expand(tokens.shape[0], -1, -1), tokens], 1)
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    def forward(self, x):
        return self.encode(self.tokens(x))[:, 0]


# ---- methods -----------------------------------------------------------------------------
class SimCLR(nn.Module):
    def __init__(self, width, tau=0.2):
        super().__init__()
        self.backbone, self.tau = ResNet18(width), tau
        d = self.backbone.dim
        self.projector = nn.Sequential(nn.Linear(d, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 128))

    def forward(self, views):
        n = views[0].shape[0]
        z = F.normalize(self.projector(self.backbone(torch.cat(views[:2]))), dim=1)
        logits = z @ z.t() / self.tau - torch.eye(2 * n) * 1e9
        return F.cross_entropy(logits, torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]))


class MAE(nn.Module):
    def __init__(self, ratio=0.75, dd=256, depth=4, heads=8):
        super().__init__()
        self.encoder, self.ratio = Vit(), ratio
        self.embed = nn.Linear(192, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.dec_pos = nn.Parameter(torch.randn(1, 65, dd) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList(VitBlock(dd, heads) for _ in range(depth))
        self.norm, self.pred = nn.LayerNorm(dd, eps=1e-6), nn.Linear(dd, 48)

    def forward(self, views):
        x = views[0]
        n = x.shape[0]
        target = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(n, 64, 48)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        tokens = self.encoder.tokens(x)
        keep = int(64 * (1 - self.ratio))
        shuffle = torch.rand(n, 64).argsort(1)
        restore = shuffle.argsort(1)
        visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, 192))
        y = self.embed(self.encoder.encode(visible))
        seq = torch.cat([y[:, 1:], self.mask_token.expand(n, 64 - keep, -1)], 1)
        seq = torch.gather(seq, 1, restore[:, :, None].expand(-1, -1, y.shape[-1]))
        y = torch.cat([y[:, :1], seq], 1) + self.dec_pos
        for b in self.blocks:
            y = b(y)
        pred = self.pred(self.norm(y))[:, 1:]
        mask = torch.ones(n, 64)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


class DinoHead(nn.Module):
    def __init__(self, d, out=4096, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINO(nn.Module):
    def __init__(self):
        super().__init__()
        self.student = nn.Sequential(Vit(), DinoHead(192))
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, 4096))

    def forward(self, views):
        n = views[0].shape[0]
        with torch.no_grad():
            t = self.teacher(torch.cat(views[:2]))
            probs = F.softmax((t - self.center) / 0.04, dim=-1).chunk(2)
        s = torch.cat([self.student(torch.cat(views[:2])), self.student(torch.cat(views[2:]))])
        logp = F.log_softmax(s / 0.1, dim=-1).chunk(len(views))
        loss, pairs = 0, 0
        for i, q in enumerate(probs):
            for j, p in enumerate(logp):
                if i != j:
                    loss, pairs = loss - (q * p).sum(-1).mean(), pairs + 1
        with torch.no_grad():
            self.center.mul_(0.9).add_(t.mean(0, keepdim=True), alpha=0.1)
        return loss / pairs

    @torch.no_grad()
    def after_step(self, m=0.996):
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)


def lean_views(name):
    """The case's views for --lean: functions of a uint8 batch [B, 3, 32, 32]."""
    sys.path.insert(0, os.path.dirname(__file__))
    from lean_views import view
    if name.startswith("simclr"):
        simclr = lambda x: view(x, 32, (0.08, 1.0), (0.8, 0.8, 0.8, 0.8, 0.2), 0.2, 0.5)
        return [simclr, simclr]
    if name.startswith("mae"):
        return [lambda x: view(x, 32, (0.2, 1.0))]
    jitter = (0.8, 0.4, 0.4, 0.2, 0.1)
    return [lambda x: view(x, 32, (0.4, 1.0), jitter, 0.2, 1.0),
            lambda x: view(x, 32, (0.4, 1.0), jitter, 0.2, 0.1, 0.2)] + \
        [lambda x: view(x, 16, (0.05, 0.4), jitter, 0.2, 0.5)] * 4


def case(name):
    if name == "simclr_r18w0.25_b256":
        model, batch, steps = SimCLR(0.25), 256, 8
        views = [simclr_view(), simclr_view()]
        opt = torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-5)
    elif name == "simclr_r18_b128":
        model, batch, steps = SimCLR(1.0), 128, 4
        views = [simclr_view(), simclr_view()]
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-5)
    elif name == "mae_vit_tiny4_b64":
        model, batch, steps = MAE(), 64, 8
        views = [T.Compose([T.RandomResizedCrop(32, scale=(0.2, 1.0)), T.RandomHorizontalFlip(), *normalize()])]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    elif name == "dino_vit_tiny4_2+4crops_b64":
        model, batch, steps = DINO(), 64, 4
        views = [dino_view(32, (0.4, 1.0), 1.0), dino_view(32, (0.4, 1.0), 0.1, 0.2)]
        views += [dino_view(16, (0.05, 0.4), 0.5)] * 4
        opt = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1.25e-4, weight_decay=0.04)
    else:
        raise SystemExit(f"unknown case {name}")
    return model, batch, steps, views, opt


def cpu_seconds():
    """(user, sys) seconds of the whole machine, from /proc/stat."""
    fields = open("/proc/stat").readline().split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[0]) + int(fields[1])) / ticks, int(fields[2]) / ticks


def lean_batches(images, views, batch):
    """Endless batches of views drawn in the main process from a uint8 tensor of the images."""
    data = torch.from_numpy(np.stack([np.asarray(i) for i in images])).permute(0, 3, 1, 2).contiguous()
    while True:
        order = torch.randperm(len(data))
        for s in range(0, len(data) - batch + 1, batch):
            x = data[order[s:s + batch]]
            yield [v(x) for v in views]


def count_flops(name, images):
    """GFLOP of one training step per image (forward and backward; matmuls, convolutions and
    attention, as torch.utils.flop_counter counts them): the same recipe costs the same in any
    framework, so img/s times this is each framework's GFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode
    model, batch, _, _, _ = case(name)
    it = lean_batches(images, lean_views(name), batch)
    with FlopCounterMode(display=False) as counter:
        model(next(it)).backward()
    print(f"| {name} | {counter.get_total_flops() / batch / 1e9:.3f} |", flush=True)


def run(name, images, lean, bf16):
    model, batch, steps, views, opt = case(name)
    if lean:
        it = lean_batches(images, lean_views(name), batch)
    else:
        loader = torch.utils.data.DataLoader(Views(images, views), batch_size=batch, shuffle=True,
                                             drop_last=True, num_workers=2, persistent_workers=True)
        it = iter(loader)
    for step in range(2 + steps):
        if step == 2:
            cpu0, wall0 = cpu_seconds(), time.perf_counter()
        views = next(it)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(views)
        opt.zero_grad()
        loss.backward()
        if isinstance(model, DINO):
            nn.utils.clip_grad_norm_(model.student.parameters(), 3.0)
        opt.step()
        if isinstance(model, DINO):
            model.after_step()
    wall, cpu1 = time.perf_counter() - wall0, cpu_seconds()
    user, sys_ = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {name} | {steps} | {batch * steps / wall:.1f} | {user:.0f} | {sys_:.0f} ({100 * sys_ / (user + sys_):.0f}%) "
          f"| {(user + sys_) / wall:.2f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    lean, bf16 = "--lean" in args, "--bf16" in args
    flags = [a for a in args if a in ("--lean", "--bf16")]
    args = [a for a in args if a not in flags]
    if args[:1] == ["--flops"]:
        print("| case | GFLOP per image and step |\n|---|---|")
        for n in args[1:] or ["simclr_r18w0.25_b256", "simclr_r18_b128", "mae_vit_tiny4_b64", "dino_vit_tiny4_2+4crops_b64"]:
            count_flops(n, cifar_train())
        raise SystemExit
    if args[:1] == ["--case"]:
        run(args[1], cifar_train(), lean, bf16)
        raise SystemExit
    names = args or ["simclr_r18w0.25_b256", "simclr_r18_b128", "mae_vit_tiny4_b64", "dino_vit_tiny4_2+4crops_b64"]
    how = "lean: batched views in the main process" if lean else "DataLoader with 2 workers"
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, {how}, {'bf16 autocast' if bf16 else 'f32'}")
    print("| case | steps | img/s | user s | sys s | cores busy | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for n in names:
        # One process per case, so that each peak RSS is the case's own.
        subprocess.run([sys.executable, __file__, "--case", n] + flags, check=True)

"""PyTorch reference for `selfsup check-device --case simclr|dino`, run by scripts/gpu-check.sh on
the same GPU in the same run: the same two training recipes on the same kind of synthetic images,
as a plain PyTorch user would write them.

- simclr: ResNet-18 (CIFAR stem: 3x3 stride 1, no max-pool), SimCLR's head (512 -> 512 -> 128,
  no biases, BN after each, the output BN without beta), NT-Xent tau 0.5 with both directions
  summed, LARS (MAE's lars.py: rank-1 tensors skip decay and trust ratio) lr 1.0 x 256/256,
  weight decay 1e-4, batch 256; 32 px views: crop 0.08-1, flip, jitter 0.4/0.4/0.4/0.1 at p 0.8,
  grey 0.2 (simclr_cifar10.toml).
- dino: timm's ViT-S/16 (student drop path 0.1), DINO head 2048-2048-256 -> 65,536 with the
  weight-normalised last layer (g = 1), EMA teacher (0.996), centring, student tau 0.1, teacher
  0.04; 2 global 224 px crops (scale 0.4-1) + 8 local 96 px crops (0.05-0.4), DINO's blur and
  solarisation; backbone once per resolution, head once over all crops; AdamW lr 5e-4 x 64/256,
  weight decay 0.04, gradient clipping 3.0, batch 64.
In float32 (PyTorch's defaults: cuDNN may use TF32 for convolutions), or with AMP=bf16 the
networks' forward passes under torch.autocast(bfloat16) (as solo-learn's `precision: bf16-mixed`;
official DINO uses fp16 autocast) and the losses in float32 (selfsup's `train.precision = "bf16"`).

Timing as check-device: one epoch of STEPS batches to warm up (cuDNN autotuning, worker start),
then one timed epoch; img/s = images / wall time of the timed epoch, loading included (a
DataLoader with one worker a CPU core, persistent, pinned). Images: uniform noise, 32 px
(simclr) or 256 px (dino), as check-device's.

Run: python3 benches/reference/gpu_check_torch.py CASE STEPS [BATCH]   -> one JSON line on stdout
(BATCH, default the recipe's, and DEVICE=cpu are for trying the script on a small machine)
"""
import json
import os
import sys
import time

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision import transforms as T

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def autocast(device):
    """The forward passes' autocast: bfloat16 with AMP=bf16, none with AMP=f32 or unset."""
    amp = os.environ.get("AMP") or "f32"
    if amp not in ("f32", "bf16"):
        sys.exit(f"AMP={amp}: this reference runs f32 or bf16 (f16 needs a GradScaler)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def noise(n, side, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


class Views(torch.utils.data.Dataset):
    def __init__(self, images, views):
        self.images, self.views = images, views

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return [v(self.images[i]) for v in self.views]


class LARS(torch.optim.Optimizer):
    """MAE's util/lars.py."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(pn)
                    dp = dp.mul(torch.where(pn > 0.0, torch.where(un > 0, g["eta"] * pn / un, one), one))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def simclr(device):
    backbone = torchvision.models.resnet18()
    backbone.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone.maxpool, backbone.fc = nn.Identity(), nn.Identity()
    out_bn = nn.BatchNorm1d(128)
    out_bn.bias.requires_grad_(False)
    model = nn.Sequential(backbone, nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU(),
                          nn.Linear(512, 128, bias=False), out_bn).to(device)
    optim = LARS([p for p in model.parameters() if p.requires_grad], lr=1.0, weight_decay=1e-4)
    view = T.Compose([
        T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
        T.ToTensor(), T.Normalize(MEAN, STD)])

    def step(views):
        a, b = (v.to(device, non_blocking=True) for v in views)
        n = a.shape[0]
        with autocast(device):
            z = model(torch.cat([a, b]))
        z = F.normalize(z.float(), dim=1)
        logits = z @ z.t() / 0.5 - torch.eye(2 * n, device=device) * 1e9
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(device)
        loss = 2 * F.cross_entropy(logits, targets)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        return loss

    return step, [view, view], 256, 32


class DinoHead(nn.Module):
    def __init__(self, d, out=65536, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.v = nn.Parameter(torch.randn(out, bottleneck) * 0.02)

    def forward(self, x):
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.v, dim=1).t()


def dino(device):
    def vit(drop_path):
        return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0,
                                 drop_path_rate=drop_path, dynamic_img_size=True)

    student = nn.ModuleDict(dict(backbone=vit(0.1), head=DinoHead(384))).to(device)
    teacher = nn.ModuleDict(dict(backbone=vit(0.0), head=DinoHead(384))).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    center = torch.zeros(1, 65536, device=device)
    optim = torch.optim.AdamW(student.parameters(), lr=5e-4 * 64 / 256, weight_decay=0.04)

    def crop(size, scale, blur, solarize=0.0):
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(), T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(0.2), T.RandomApply([T.GaussianBlur(9, (0.1, 2.0))], p=blur),
            T.RandomSolarize(128, p=solarize), T.ToTensor(), T.Normalize(*IMAGENET)])

    views = [crop(224, (0.4, 1.0), 1.0), crop(224, (0.4, 1.0), 0.1, 0.2)]
    views += [crop(96, (0.05, 0.4), 0.5)] * 8

    def forward(model, crops):
        with autocast(device):
            feats = [model["backbone"](torch.cat(crops[:2]))]
            if len(crops) > 2:
                feats.append(model["backbone"](torch.cat(crops[2:])))
            return model["head"](torch.cat(feats)).float()

    def step(crops):
        nonlocal center
        crops = [c.to(device, non_blocking=True) for c in crops]
        n = crops[0].shape[0]
        with torch.no_grad():
            t = teacher_out = forward(teacher, crops[:2])
            t = F.softmax((teacher_out - center) / 0.04, dim=-1).chunk(2)
        s = (forward(student, crops) / 0.1).chunk(len(crops))
        loss, terms = 0.0, 0
        for iq, q in enumerate(t):
            for v, sv in enumerate(s):
                if v != iq:
                    loss = loss + torch.sum(-q * F.log_softmax(sv, dim=-1), dim=-1).mean()
                    terms += 1
        loss = loss / terms
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(student.parameters(), 3.0)
        optim.step()
        with torch.no_grad():
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(0.996).add_(ps.detach(), alpha=0.004)
            center = center * 0.9 + teacher_out.mean(0, keepdim=True) * 0.1
        return loss

    return step, views, 64, 256


def main():
    case, steps = sys.argv[1], int(sys.argv[2])
    autocast(torch.device("cpu"))  # refuses an AMP it does not run, before any work
    device = torch.device(os.environ.get("DEVICE", "cuda"))  # DEVICE=cpu to try the script
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    torch.manual_seed(0)
    step, views, batch, side = {"simclr": simclr, "dino": dino}[case](device)
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else batch
    data = Views(noise(batch * steps, side, 2), views)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=os.cpu_count(), persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    rates, losses = [], []
    for _ in range(2):  # a warm-up epoch, then the timed one
        sync()
        start, images = time.perf_counter(), 0
        for batch_views in loader:
            losses.append(step(batch_views).item())
            images += batch_views[0].shape[0]
        sync()
        rates.append(images / (time.perf_counter() - start))
    print(json.dumps(dict(case=case, framework=f"pytorch {torch.__version__}",
                          device=name, precision=os.environ.get("AMP") or "f32",
                          images_per_s=rates[-1], warmup_images_per_s=rates[0],
                          last_loss=losses[-1], mean_loss=float(np.mean(losses[-steps:])),
                          peak_allocated_mib=torch.cuda.max_memory_allocated() // 2**20 if device.type == "cuda" else None,
                          ok=all(np.isfinite(losses)))))


if __name__ == "__main__":
    main()

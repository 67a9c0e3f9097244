"""PyTorch reference for benches/simclr_step.rs: the same SimCLR step on 2 CPU threads.

ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool), projection head 512-2048-128
with batch norm, NT-Xent (tau 0.5) over both views in one pass, LARS as in selfsup
(trust ratio on matrices, none on biases and norms), batch 128 images = 256 views of 32 px,
fresh random inputs every step, 5 timed steps after one warm-up. Peak memory: ru_maxrss.

Run: python3 benches/reference/simclr_step_torch.py   (needs torch, torchvision)
"""
import resource
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

torch.set_num_threads(2)
torch.manual_seed(0)


def resnet18_cifar():
    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m


class SimCLR(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = resnet18_cifar()
        self.projector = nn.Sequential(nn.Linear(512, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(), nn.Linear(2048, 128))

    def forward(self, x1, x2, tau=0.5):
        n = x1.shape[0]
        z = F.normalize(self.projector(self.backbone(torch.cat([x1, x2]))), dim=1)
        logits = z @ z.t() / tau - torch.eye(2 * n) * 1e9
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
        return F.cross_entropy(logits, targets)


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, eta=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                u = p.grad
                if p.ndim > 1:
                    u = u.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(u)
                    q = torch.where(pn > 0, torch.where(un > 0, g["eta"] * pn / un, torch.ones_like(pn)), torch.ones_like(pn))
                    u = u.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = u.clone()
                else:
                    state["mu"].mul_(g["momentum"]).add_(u)
                p.add_(state["mu"], alpha=-g["lr"])


model = SimCLR()
opt = LARS(model.parameters(), lr=0.1)
batch, steps, times = 128, 5, []
for step in range(steps + 1):
    x1, x2 = torch.randn(batch, 3, 32, 32), torch.randn(batch, 3, 32, 32)
    start = time.perf_counter()
    loss = model(x1, x2)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step > 0:
        times.append(time.perf_counter() - start)
mean = sum(times) / len(times)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"PyTorch {torch.__version__} cpu (2 threads): ResNet-18 SimCLR step, batch {batch}: {mean:.2f} s/step, {batch / mean:.1f} img/s, peak RSS {peak:.0f} MiB")

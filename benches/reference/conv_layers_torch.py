"""PyTorch reference for `cargo bench --bench conv_layers` (issue 30's per-layer profile): the
convolutions of a CIFAR ResNet-18 one by one, forward and backward (input and weight
gradients), best of 7, on 2 threads, NCHW tensors as a user's model holds them.

Run: python3 benches/reference/conv_layers_torch.py [WIDTH=0.125 [BATCH=512 [PX=32]]]
"""
import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)


def layers(width, px):
    c1, c2, c3, c4 = (max(1, round(b * width)) for b in (64, 128, 256, 512))
    p1, p2, p3, p4 = px, -(-px // 2), -(-px // 4), -(-px // 8)
    return [
        (3, c1, p1, 3, 1, 1), (c1, c1, p1, 3, 1, 4),
        (c1, c2, p1, 3, 2, 1), (c1, c2, p1, 1, 2, 1), (c2, c2, p2, 3, 1, 3),
        (c2, c3, p2, 3, 2, 1), (c2, c3, p2, 1, 2, 1), (c3, c3, p3, 3, 1, 3),
        (c3, c4, p3, 3, 2, 1), (c3, c4, p3, 1, 2, 1), (c4, c4, p4, 3, 1, 3),
    ]


def best(f):
    times = []
    for _ in range(7):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    width = float(sys.argv[1]) if len(sys.argv) > 1 else 0.125
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    side = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    print(f"PyTorch {torch.__version__}: ResNet-18 w{width} convolutions, batch {n}, {side} px views")
    print("| layer | count | forward ms | backward ms | forward GFLOP/s | backward GFLOP/s | share of the convolutions |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for c, co, px, k, s, count in layers(width, side):
        w = torch.randn(co, c, k, k, requires_grad=True)
        x = torch.rand(n, c, px, px, requires_grad=True)

        def forward():
            return F.conv2d(x, w, stride=s, padding=k // 2)

        def both():
            forward().sum().backward()
            x.grad = w.grad = None

        fwd = best(forward)
        back = max(best(both) - fwd, 1e-9)
        flop = 2 * n * co * (-(-px // s)) ** 2 * c * k * k
        rows.append((f"{c}→{co} {px} px {k}×{k}/{s}", count, fwd, back, flop))
    total = sum(r[1] * (r[2] + r[3]) for r in rows)
    for name, count, fwd, back, flop in rows:
        print(f"| {name} | {count} | {fwd * 1e3:.1f} | {back * 1e3:.1f} | {flop / fwd / 1e9:.1f} | "
              f"{2 * flop / back / 1e9:.1f} | {100 * count * (fwd + back) / total:.0f}% |")
    print(f"all convolutions of one step: {total * 1e3:.0f} ms")


if __name__ == "__main__":
    main()

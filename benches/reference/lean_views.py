"""Batched views for the lean PyTorch references (issue 30): the whole batch's augmentation as
tensor ops in the main process, the fastest PyTorch we could write for small images on 2 cores
(a DataLoader with worker processes spends about a third of these cores in the kernel).

The draws follow torchvision's transforms, one draw per image:
- RandomResizedCrop: up to 10 tries of (area ~ U(scale), log ratio ~ U(log 3/4, log 4/3)), the first
  that fits, else the whole (square) image; then bilinear resampling through `affine_grid` and
  `grid_sample` (align_corners False, as a resize of the crop). Flip by negating the x scale.
- ColorJitter(b, c, s, h) at probability p: per-image factors, applied in one random order per
  batch (torchvision draws an order per image); hue through torchvision's own RGB<->HSV.
- RandomGrayscale, GaussianBlur(3, sigma ~ U(0.1, 2)) with reflect padding, RandomSolarize(128).

Images are a uint8 tensor [N, 3, H, W] decoded once.
"""
import math

import torch
import torch.nn.functional as F
from torchvision.transforms import _functional_tensor as TF

MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(1, 3, 1, 1)


def resized_crop(x, size, scale, flip=0.5):
    """x float [B, 3, H, W] -> [B, 3, size, size]."""
    b, _, h, w = x.shape
    area = torch.empty(b, 10).uniform_(*scale) * h * w
    ratio = torch.exp(torch.empty(b, 10).uniform_(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1))
    pick = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((b,), float(w)))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((b,), float(h)))
    left = (torch.rand(b) * (w - cw + 1)).floor()
    top = (torch.rand(b) * (h - ch + 1)).floor()
    sign = torch.where(torch.rand(b) < flip, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = sign * cw / w
    theta[:, 0, 2] = (left + cw / 2) / w * 2 - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (top + ch / 2) / h * 2 - 1
    grid = F.affine_grid(theta, (b, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def gray(x):
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(x, p, brightness, contrast, saturation, hue):
    sel = (torch.rand(x.shape[0]) < p).nonzero()[:, 0]
    if len(sel) == 0:
        return x
    y, n = x[sel], len(sel)

    def factor(s):
        return torch.empty(n, 1, 1, 1).uniform_(1 - s, 1 + s)

    for op in torch.randperm(4).tolist():
        if op == 0 and brightness:
            y = (y * factor(brightness)).clamp(0, 1)
        elif op == 1 and contrast:
            m = gray(y).mean((1, 2, 3), keepdim=True)
            f = factor(contrast)
            y = (f * y + (1 - f) * m).clamp(0, 1)
        elif op == 2 and saturation:
            f = factor(saturation)
            y = (f * y + (1 - f) * gray(y)).clamp(0, 1)
        elif op == 3 and hue:
            hsv = TF._rgb2hsv(y)
            shift = torch.empty(n, 1, 1).uniform_(-hue, hue)
            hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
            y = TF._hsv2rgb(hsv)
    x = x.clone()
    x[sel] = y
    return x


def grayscale(x, p):
    sel = (torch.rand(x.shape[0]) < p).nonzero()[:, 0]
    if len(sel):
        x = x.clone()
        x[sel] = gray(x[sel]).expand(-1, 3, -1, -1)
    return x


def blur(x, p):
    """GaussianBlur(3, sigma ~ U(0.1, 2)) at probability p, one depthwise conv for the batch."""
    sel = (torch.rand(x.shape[0]) < p).nonzero()[:, 0]
    if len(sel) == 0:
        return x
    y, n = x[sel], len(sel)
    sigma = torch.empty(n, 1).uniform_(0.1, 2.0)
    k = torch.exp(-torch.tensor([-1.0, 0.0, 1.0]) ** 2 / (2 * sigma ** 2))
    k = k / k.sum(1, keepdim=True)
    kernel = (k[:, :, None] * k[:, None, :]).repeat_interleave(3, 0)[:, None]
    h, w = y.shape[-2:]
    y = F.conv2d(F.pad(y.reshape(1, 3 * n, h, w), (1, 1, 1, 1), mode="reflect"), kernel, groups=3 * n)
    x = x.clone()
    x[sel] = y.reshape(n, 3, h, w)
    return x


def solarize(x, p):
    sel = torch.rand(x.shape[0], 1, 1, 1) < p
    return torch.where(sel & (x >= 128 / 255), 1 - x, x)


def view(images, size, scale, jitter=None, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0):
    """One batched view of uint8 `images` [B, 3, H, W]: normalised float [B, 3, size, size].
    `jitter`: (p, brightness, contrast, saturation, hue) or None."""
    x = resized_crop(images.float() / 255, size, scale)
    if jitter:
        x = color_jitter(x, *jitter)
    if grayscale_p:
        x = grayscale(x, grayscale_p)
    if blur_p:
        x = blur(x, blur_p)
    if solarize_p:
        x = solarize(x, solarize_p)
    return (x - MEAN) / STD

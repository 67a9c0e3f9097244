"""Writes the small PyTorch fixtures that tests/interop.rs imports (run once; CI has no PyTorch).

    pip install torch torchvision timm safetensors
    python3 tools/pytorch_fixtures.py            # writes tests/fixtures/

Each model is built by timm or torchvision's own code, its weights (batch-norm statistics
included) are made non-trivial, and a fixed input with the features PyTorch computes is saved:

- vit_s16_layout: timm VisionTransformer in the key layout of vit_small_patch16_224 (the
  official DINO ViT-S/16 layout), narrowed to dim 64 and 2 blocks, with its classifier head;
  as safetensors, and as a DINO full checkpoint (.pth: {"teacher": {"backbone.*", "head.*"}}).
- resnet18_cifar: torchvision ResNet-18 (BasicBlock) at 1/16 width with the CIFAR stem
  (3x3 conv, no max-pool) that solo-learn and lightly train; safetensors.
- resnet50_moco: torchvision ResNet-50 (Bottleneck) at 1/16 width with the ImageNet stem, as
  MoCo's official checkpoint lays it out (.pth: {"state_dict": {"module.encoder_q.*",
  "module.encoder_k.*", "module.queue"}}).
- vit_dinov2_layout.pth: a timm ViT with LayerScale on 14-px patches (vit_small_patch14_dinov2's
  layout, narrowed), saved as facebookresearch/dinov2's hub checkpoints are (a flat state dict
  with its `mask_token`).
- vit_dinov2_reg_timm.safetensors: timm's DINOv2 with 4 registers (vit_small_patch14_reg4_dinov2:
  `reg_token`, `no_embed_class`, LayerScale), narrowed; vit_dinov2_reg.pth: the same
  network as facebookresearch/dinov2 lays it out (`register_tokens`, `pos_embed` with a class
  row: zero, so the class token is the same), the inverse of timm's `_convert_dinov2`. (Named
  `vit_dinov2_reg_layout.pth`, this file is one that burn's PyTorch reader (zip 9.8.2) refuses,
  "Invalid Central Directory header", though torch reads it: its entries' offsets depend on
  the name.)
- vit_deit3_layout.safetensors: timm's DeiT-III layout (deit3_small_patch16_224: LayerScale,
  `no_embed_class`), narrowed.
- io.safetensors: `<name>.input` and `<name>.features` (the pooled features, before any head).
"""
import pathlib

import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures"


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet (its blocks and _make_layer) with 64·width channels in the stem."""

    def __init__(self, block, layers, width, cifar):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.dilation, self.groups, self.base_width = 1, 1, 64
        self.inplanes = width
        if cifar:
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, 10)


def perturb(model, seed):
    """Random affine parameters and running statistics, so every tensor's mapping matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


def features(model, x, vit):
    with torch.no_grad():
        if vit:
            return model.forward_head(model.forward_features(x), pre_logits=True)
        fc, model.fc = model.fc, nn.Identity()
        out = model(x)
        model.fc = fc
        return out


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    io = {}

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=1, num_classes=10
    )
    vit = perturb(vit, 1)
    sd = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(sd, OUT / "vit_s16_layout.safetensors")
    teacher = {"backbone." + k: v for k, v in sd.items() if not k.startswith("head")}
    teacher["head.mlp.0.weight"] = torch.randn(32, 64)
    teacher["head.last_layer.weight_g"] = torch.ones(16, 1)
    torch.save({"teacher": teacher, "epoch": 100}, OUT / "vit_s16_layout_dino_full.pth")
    x = torch.randn(2, 3, 32, 32)
    io["vit.input"], io["vit.features"] = x, features(vit, x, True)

    r18 = perturb(NarrowResNet(BasicBlock, [2, 2, 2, 2], 4, cifar=True), 2)
    save_file(r18.state_dict(), OUT / "resnet18_cifar.safetensors")
    x = torch.randn(2, 3, 32, 32)
    io["resnet18.input"], io["resnet18.features"] = x, features(r18, x, False)

    r50 = perturb(NarrowResNet(Bottleneck, [3, 4, 6, 3], 4, cifar=False), 3)
    key = perturb(NarrowResNet(Bottleneck, [3, 4, 6, 3], 4, cifar=False), 4)
    state = {"module.encoder_q." + k: v for k, v in r50.state_dict().items()}
    state.update({"module.encoder_k." + k: v for k, v in key.state_dict().items()})
    state["module.queue"] = torch.randn(16, 8)
    torch.save({"state_dict": state, "epoch": 200}, OUT / "resnet50_moco.pth")
    x = torch.randn(2, 3, 64, 64)
    io["resnet50.input"], io["resnet50.features"] = x, features(r50, x, False)

    def narrow_vit(seed, **kw):
        vit = timm.models.vision_transformer.VisionTransformer(
            embed_dim=64, depth=2, num_heads=1, num_classes=0, **kw
        )
        return perturb(vit, seed)

    dinov2 = narrow_vit(5, img_size=42, patch_size=14, init_values=1e-5)
    sd = {k: v.contiguous() for k, v in dinov2.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 64)
    torch.save(sd, OUT / "vit_dinov2_layout.pth")
    x = torch.randn(2, 3, 42, 42)
    io["dinov2.input"], io["dinov2.features"] = x, features(dinov2, x, True)

    reg = narrow_vit(
        6, img_size=42, patch_size=14, init_values=1e-5, reg_tokens=4, no_embed_class=True
    )
    sd = {k: v.contiguous() for k, v in reg.state_dict().items()}
    save_file(sd, OUT / "vit_dinov2_reg_timm.safetensors")
    original = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
    original["register_tokens"] = sd["reg_token"]
    original["pos_embed"] = torch.cat([torch.zeros(1, 1, 64), sd["pos_embed"]], 1)
    original["mask_token"] = torch.zeros(1, 64)
    torch.save(original, OUT / "vit_dinov2_reg.pth")
    x = torch.randn(2, 3, 42, 42)
    io["dinov2_reg.input"], io["dinov2_reg.features"] = x, features(reg, x, True)

    deit3 = narrow_vit(7, img_size=32, patch_size=16, init_values=1e-6, no_embed_class=True)
    save_file(
        {k: v.contiguous() for k, v in deit3.state_dict().items()},
        OUT / "vit_deit3_layout.safetensors",
    )
    x = torch.randn(2, 3, 32, 32)
    io["deit3.input"], io["deit3.features"] = x, features(deit3, x, True)

    save_file({k: v.contiguous() for k, v in io.items()}, OUT / "io.safetensors")
    for p in sorted(OUT.iterdir()):
        print(f"{p.stat().st_size:>8}  {p.relative_to(OUT.parent.parent)}")


if __name__ == "__main__":
    main()

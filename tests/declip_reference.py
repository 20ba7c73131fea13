"""DeCLIP's CONV-N decoder and its parameter count, written here from bit-ml/DeCLIP's description
(models/clip_models.py), independently of deeploc: the reference the CLIP tests compare deeploc against."""

from __future__ import annotations

import itertools

import torch
from torch import nn

# DeCLIP's filter sizes on a ViT-L/14 map.
SIZES = (1024, 512, 256, 128, 64)


def declip_fc(depth: int, seed: int = 0, sizes: tuple[int, ...] = SIZES) -> nn.Sequential:
    """DeCLIP's conv-N ``fc`` (per stage N/4 x [Conv 5x5, BatchNorm, ReLU] then a x2 bilinear Upsample, last a
    Conv 5x5 64 -> 1) with random weights and random BatchNorm statistics (so eval-mode normalisation is
    exercised), in eval mode."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for c_in, c_out in itertools.pairwise(sizes):
        for i in range(depth // 4):
            layers += [nn.Conv2d(c_in if i == 0 else c_out, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU()]
        layers.append(nn.Upsample(scale_factor=2, mode="bilinear"))
    layers.append(nn.Conv2d(sizes[-1], 1, 5, padding=2))
    fc = nn.Sequential(*layers)
    for module in fc.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            nn.init.normal_(module.bias, 0.0, 0.1)
        if isinstance(module, nn.BatchNorm2d):
            nn.init.normal_(module.weight, 1.0, 0.1)
            nn.init.normal_(module.bias, 0.0, 0.1)
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(1234)
    return fc.eval()


def declip_conv_parameters(depth: int, sizes: tuple[int, ...] = SIZES) -> int:
    """DeCLIP's conv-N parameter count: per stage one conv c_in -> c_out and N/4 - 1 convs c_out -> c_out (5x5,
    bias), each followed by BatchNorm (2 c_out); then a 5x5 head to one channel."""
    total = 0
    for c_in, c_out in itertools.pairwise(sizes):
        total += (c_in * 25 + 1) * c_out + 2 * c_out
        total += (depth // 4 - 1) * ((c_out * 25 + 1) * c_out + 2 * c_out)
    return total + sizes[-1] * 25 + 1

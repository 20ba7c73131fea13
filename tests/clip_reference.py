"""References the CLIP tests compare deeploc against, independent of deeploc's code: OpenAI CLIP's model code (as
shipped in the PyPI package ``clip-anytorch``) with DeCLIP's map of a block's tokens, and DeCLIP's CONV-N decoder and
parameter count written from bit-ml/DeCLIP's description (models/clip_models.py)."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

# OpenAI CLIP's normalisation, which DeCLIP's data/datasets.py uses too.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
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


def openai_model_code() -> ModuleType:
    """OpenAI CLIP's ``model.py`` from the clip-anytorch package, loaded by path: the package's ``__init__``
    imports ``pkg_resources``, which current setuptools no longer ships."""
    spec = importlib.util.find_spec("clip")
    assert spec is not None and spec.submodule_search_locations, "clip-anytorch missing: pip install -e '.[dev]'"
    path = Path(next(iter(spec.submodule_search_locations))) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def openai_layer_map(visual: nn.Module, inputs: torch.Tensor, k: int) -> torch.Tensor:
    """OpenAI's VisionTransformer.forward up to block ``k``, then DeCLIP's map: tokens[1:] (LND) -> N x D x h x w."""
    x = visual.conv1(inputs)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding).permute(1, 0, 2)
    for block in visual.transformer.resblocks[: k + 1]:
        x = block(x)
    tokens = x[1:].permute(1, 2, 0)
    side = int(tokens.shape[-1] ** 0.5)
    return tokens.reshape(tokens.shape[0], tokens.shape[1], side, side)

"""Frozen feature encoders φ and the paper's multi-scale feature keys (DrPO §1.6.4, Drifting §6.5).

An encoder maps generator latents `[N, C_lat, h, w]` to a dict ``key -> [N, L_key, D_key]`` of
point sets; the drift loss is computed per key and summed. Keys follow the official code:
``<layer>_mean`` / ``<layer>_std`` (global, L=1), ``<layer>_mean_2`` / ``_std_2`` (2×2-pixel patches)
and ``<layer>_mean_4`` / ``_std_4`` (4×4-pixel patches).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.features.common import FeatureDict, multiscale_mean_std

def _norm(groups: int, channels: int) -> nn.Module:
    """GroupNorm, or nothing when ``groups == 0`` (see LatentResNetEncoder on why)."""
    return nn.GroupNorm(groups, channels) if groups > 0 else nn.Identity()


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(groups, c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(groups, c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        return F.silu(self.norm2(self.conv2(h)) + self.skip(x))


class LatentResNetEncoder(nn.Module):
    """GroupNorm ResNet over VAE latents, the shape of the paper's latent-MAE encoder.

    Stage i has ``stage_blocks[i]`` basic blocks of width ``width · 2^i``; stages after the first
    halve the resolution (``downsample=True``), and each stage ends with a GroupNorm
    ``layer{i+1}_norm``. Features are the multi-scale mean/std of the last stage. With
    ``stage_blocks=(3, 4, 6, 3)`` this is the latent-MAE layout; the tiny default uses a couple of
    random-initialised blocks (frozen, seeded), which works as a fixed random feature map.

    ``groups=0`` drops every normalisation layer. A *trained* encoder's GroupNorm keeps the
    information it learned to keep, but in a random encoder per-sample normalisation erases the
    global level of each channel group — for latents that is the image's overall colour, exactly
    what a colour reward ranks on — so the random default runs without it.
    """

    def __init__(self, in_channels: int = 4, width: int = 32, stage_blocks: tuple[int, ...] = (1, 1),
                 downsample: bool = False, groups: int = 8, patch_sizes: tuple[int, ...] = (2, 4)):
        super().__init__()
        self.patch_sizes = patch_sizes
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(groups, width), nn.SiLU())
        stages, norms, c_in = [], [], width
        for i, n_blocks in enumerate(stage_blocks):
            c_out = width * 2**i
            stride = 2 if (downsample and i > 0) else 1
            blocks = [_BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1, groups) for j in range(n_blocks)]
            stages.append(nn.Sequential(*blocks))
            norms.append(_norm(groups, c_out))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.norms = nn.ModuleList(norms)
        self.layer_name = f"layer{len(stage_blocks)}"
        self.requires_grad_(False)
        self.eval()

    def forward(self, latents: torch.Tensor) -> FeatureDict:
        h = self.stem(latents.float())
        for stage, norm in zip(self.stages, self.norms):
            h = norm(stage(h))
        return multiscale_mean_std(h, self.layer_name, self.patch_sizes)

    @classmethod
    def random_frozen(cls, seed: int, **kwargs) -> "LatentResNetEncoder":
        """Deterministic random initialisation from ``seed`` (independent of global RNG state)."""
        fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(seed)
            return cls(**kwargs)

"""Frozen feature spaces φ for pretraining the toy base with the Drifting objective.

The drift field compares sets of points; what it can match is what φ measures. Object positions in the
shapes world are random, so raw-latent distances mostly measure position mismatch (the field then pulls
samples to a blurry average). Both spaces here summarise a frozen *random* conv net by per-channel spatial
statistics — global mean and std (translation-invariant: a shifted scene has the same values up to
border effects) and 2×2-pooled mean/std maps (coarse layout, which the position prompts need):

- :class:`LatentFeatures` — on the latent `[N, 4, 8, 8]`, plus the raw latent and its 2×2 pooling
  (10 point sets). Cheap, but a latent 3×3 receptive field covers most of a shape, and these statistics
  carry little *shape* information (the first committed base drew round blobs).
- :class:`PixelFeatures` — on the decoded image `[N, 3, 32, 32]` in [-1, 1]: 3×3 convs at 32, 16 and
  8 px (receptive fields 3, 7 and 15 px) respond to edge orientations, corners and whole shapes, so
  bars (horizontal/vertical edges), triangles (diagonals) and circles have different statistics
  (12 point sets). Costs a decoder forward and backward per generated sample.

Each returns ``{key: [N, D_key]}``; the drift loss is applied per key and summed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def channel_stats(h: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """Per-channel mean/std over space `[N, C]` and 2×2-pooled mean/std `[N, 4C]` of ``h`` `[N, C, H, W]`."""
    mean = F.adaptive_avg_pool2d(h, 2)
    var = (F.adaptive_avg_pool2d(h * h, 2) - mean * mean).clamp_min(0)
    return {f"{name}_mean": h.mean((2, 3)), f"{name}_std": (h.var((2, 3), unbiased=False) + 1e-6).sqrt(),
            f"{name}_mean_2x2": mean.flatten(1), f"{name}_std_2x2": (var + 1e-6).sqrt().flatten(1)}


def _frozen_convs(seed: int, shapes: list[tuple[int, int, int]]) -> nn.ModuleList:
    """Random 3×3 convs ``(in, out, stride)`` drawn from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in shapes)


class LatentFeatures(nn.Module):
    """Frozen φ over latents `[N, 4, 8, 8]` → 10 keys: ``latent``, ``latent_2x2``, ``conv{1,2}_*`` stats."""

    def __init__(self, seed: int = 0, in_channels: int = 4):
        super().__init__()
        self.convs = _frozen_convs(seed, [(in_channels, 32, 1), (32, 64, 2)])
        self.requires_grad_(False).eval()

    def forward(self, latents: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"latent": latents.flatten(1), "latent_2x2": F.adaptive_avg_pool2d(latents, 2).flatten(1)}
        h = latents.float()
        for i, conv in enumerate(self.convs, 1):
            h = F.relu(conv(h))
            out.update(channel_stats(h, f"conv{i}"))
        return out


class PixelFeatures(nn.Module):
    """Frozen φ over images `[N, 3, 32, 32]` in [-1, 1] → 12 keys ``pix{1,2,3}_*`` (3×3 convs 3→32 stride 1,
    32→64 stride 2, 64→64 stride 2, ReLU; channel statistics of each)."""

    def __init__(self, seed: int = 1):
        super().__init__()
        self.convs = _frozen_convs(seed, [(3, 32, 1), (32, 64, 2), (64, 64, 2)])
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out, h = {}, images.float()
        for i, conv in enumerate(self.convs, 1):
            h = F.relu(conv(h))
            out.update(channel_stats(h, f"pix{i}"))
        return out

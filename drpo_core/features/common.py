"""What every feature encoder φ shares: the feature-dict type, the encoder protocol and the paper's
multi-scale mean/std keys (DrPO §1.6.4, Drifting §6.5)."""

from __future__ import annotations

from typing import Protocol

import torch
from torch.nn import functional as F

FeatureDict = dict[str, torch.Tensor]


class FeatureEncoder(Protocol):
    """Frozen φ: latents `[N, C, h, w]` → ``{key: [N, L, D]}``; differentiable w.r.t. its input."""

    def __call__(self, latents: torch.Tensor) -> FeatureDict: ...


def multiscale_mean_std(fmap: torch.Tensor, prefix: str, patch_sizes: tuple[int, ...] = (2, 4), eps: float = 1e-6) -> FeatureDict:
    """Global and patch-pooled per-channel mean/std of a feature map.

    Args:
        fmap: `[N, C, H, W]`.
        prefix: key prefix (the layer name, e.g. ``layer4``).
        patch_sizes: side lengths p of the non-overlapping p×p patches; H and W must be divisible.

    Returns:
        ``{prefix_mean: [N, 1, C], prefix_std: [N, 1, C], prefix_mean_p: [N, HW/p², C], ...}``.
    """
    N, C, H, W = fmap.shape
    out = {
        f"{prefix}_mean": fmap.mean(dim=(2, 3))[:, None],
        f"{prefix}_std": (fmap.var(dim=(2, 3), unbiased=False) + eps).sqrt()[:, None],
    }
    for p in patch_sizes:
        if H % p or W % p:
            raise ValueError(f"feature map {H}x{W} of {prefix!r} is not divisible into {p}x{p} patches")
        mean = F.avg_pool2d(fmap, p)  # [N, C, H/p, W/p]
        var = (F.avg_pool2d(fmap * fmap, p) - mean * mean).clamp_min(0)
        out[f"{prefix}_mean_{p}"] = mean.flatten(2).transpose(1, 2)
        out[f"{prefix}_std_{p}"] = (var + eps).sqrt().flatten(2).transpose(1, 2)
    return out

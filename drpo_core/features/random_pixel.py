"""φ from a frozen *random* conv net on VAE-decoded images (``features.kind: random_pixel``).

    φ(x) = { multiscale_mean_std( ReLU(conv_l(... ReLU(conv_1( 2·VAE_dec(x) − 1 )))) ) }_l

Three 3×3 convs (3→32 stride 1, 32→64 stride 2, 64→64 stride 2; receptive fields 3, 7, 15 px), seeded,
frozen, no normalisation. Their per-channel statistics respond to colour, edge orientation, corners and whole
small shapes — what the shapes world's GenEval rules test — with no weights to download; the global
``_mean``/``_std`` keys are translation-invariant (``features.patch_sizes: []`` keeps only those). The same
statistics pretrained the toy base (drpo_core/toyworld/toy_features.py); the VAE decode sits inside the
gradient path (frozen), as for the pixel ViTs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.features.common import FeatureDict, multiscale_mean_std

LAYERS = ((3, 32, 1), (32, 64, 2), (64, 64, 2))  # (in, out, stride)


class RandomPixelEncoder(nn.Module):
    """Frozen random-conv statistics of decoded images; ``encoder(latents) -> {pix{l}_mean: [N, 1, C], ...}``."""

    def __init__(self, generator, seed: int = 1234, patch_sizes: tuple[int, ...] = ()):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.convs = nn.ModuleList(nn.Conv2d(i, o, 3, s, 1) for i, o, s in LAYERS)
        self.requires_grad_(False).eval().to(generator.device)
        self.generator = generator  # not a submodule: φ holds no generator weights
        self.patch_sizes = tuple(patch_sizes)

    def forward(self, latents: torch.Tensor) -> FeatureDict:
        h = self.generator.vae_decode(latents) * 2 - 1  # [N, 3, H, W] in [-1, 1], differentiable
        feats: FeatureDict = {}
        for i, conv in enumerate(self.convs, 1):
            h = F.relu(conv(h))
            sizes = tuple(p for p in self.patch_sizes if h.shape[-1] % p == 0 and p < h.shape[-1])
            feats.update(multiscale_mean_std(h, f"pix{i}", sizes))
        return feats

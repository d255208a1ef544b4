"""Frozen feature encoders φ and the paper's multi-scale feature keys (DrPO §1.6.4, Drifting §6.5).

An encoder maps generator latents `[N, C_lat, h, w]` to a dict ``key -> [N, L_key, D_key]`` of
point sets; the drift loss is computed per key and summed. Keys follow the official code:
``<layer>_mean`` / ``<layer>_std`` (global, L=1), ``<layer>_mean_2`` / ``_std_2`` (2×2-pixel patches)
and ``<layer>_mean_4`` / ``_std_4`` (4×4-pixel patches).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
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


def build_encoder(cfg, in_channels: int, device: torch.device, generator=None) -> FeatureEncoder:
    """The frozen φ named by a :class:`drpo_core.config.FeaturesConfig`.

    ``unet_hidden`` (the generator's own UNet, adapter disabled) and ``dinov2`` / ``vit_mae`` (VAE
    decode inside the gradient path) need ``generator``; ``latent_resnet`` needs only the latent channels.
    """
    if cfg.kind == "latent_resnet":
        kwargs = dict(in_channels=in_channels, width=cfg.width, stage_blocks=tuple(cfg.stage_blocks),
                      downsample=cfg.downsample, groups=cfg.groups, patch_sizes=tuple(cfg.patch_sizes))
        encoder = LatentResNetEncoder.random_frozen(cfg.seed, **kwargs)
        if cfg.checkpoint:
            from drpo_core.latent_mae import load_latent_resnet_checkpoint

            desc = f"in_channels={in_channels}, width={cfg.width}, stage_blocks={list(cfg.stage_blocks)}"
            load_latent_resnet_checkpoint(encoder, cfg.checkpoint, desc)
        return encoder.to(device)
    if generator is None:
        raise ValueError(f"features.kind {cfg.kind!r} runs on the generator's own modules; pass generator=")
    if cfg.kind == "unet_hidden":
        from drpo_core.features_unet import UnetHiddenEncoder

        return UnetHiddenEncoder(generator, layers=cfg.layers, timestep=cfg.timestep, noise_scale=cfg.noise_scale,
                                 grid=cfg.pool_grid, patch_sizes=tuple(cfg.patch_sizes), seed=cfg.seed)
    from drpo_core.features_pixel import PixelViTEncoder

    return PixelViTEncoder(cfg.kind, cfg.path, generator, layers=cfg.layers, patch_sizes=tuple(cfg.patch_sizes))

"""Frozen feature encoders φ: latent ResNet / latent-MAE, base-UNet hidden states, pixel ViTs."""

from __future__ import annotations

import torch

from drpo_core.features.common import FeatureEncoder
from drpo_core.features.latent import LatentResNetEncoder


def build_encoder(cfg, in_channels: int, device: torch.device, generator=None,
                  latent_size: tuple[int, int] | None = None) -> FeatureEncoder:
    """The frozen φ named by a :class:`drpo_core.config.FeaturesConfig`.

    ``unet_hidden`` (the generator's own UNet, adapter disabled) and ``dinov2`` / ``vit_mae`` (VAE
    decode inside the gradient path) need ``generator``; ``latent_resnet`` needs only the latent channels.
    ``latent_mae`` keys are checked against the latents' spatial size (``latent_size``, else the generator's).
    """
    if cfg.kind == "latent_resnet":
        kwargs = dict(in_channels=in_channels, width=cfg.width, stage_blocks=tuple(cfg.stage_blocks),
                      downsample=cfg.downsample, groups=cfg.groups, patch_sizes=tuple(cfg.patch_sizes))
        encoder = LatentResNetEncoder.random_frozen(cfg.seed, **kwargs)
        if cfg.checkpoint:
            from drpo_core.features.latent_checkpoint import (check_saved_architecture, load_latent_resnet_checkpoint,
                                                              resolve_latent_resnet_checkpoint)

            path = resolve_latent_resnet_checkpoint(cfg.checkpoint)
            check_saved_architecture(path, cfg)
            desc = f"in_channels={in_channels}, width={cfg.width}, stage_blocks={list(cfg.stage_blocks)}"
            load_latent_resnet_checkpoint(encoder, path, desc)
        return encoder.to(device)
    if cfg.kind == "latent_mae":
        from drpo_core.features.latent_mae import build_latent_mae

        encoder = build_latent_mae(cfg, in_channels)
        size = latent_size or (tuple(generator.latent_shape[1:]) if generator is not None else None)
        if size is not None:
            encoder.check_latent_size(*size)
        return encoder.to(device)
    if generator is None:
        raise ValueError(f"features.kind {cfg.kind!r} runs on the generator's own modules; pass generator=")
    if cfg.kind == "random_pixel":
        from drpo_core.features.random_pixel import RandomPixelEncoder

        return RandomPixelEncoder(generator, seed=cfg.seed, patch_sizes=tuple(cfg.patch_sizes))
    if cfg.kind == "unet_hidden":
        from drpo_core.features.unet import UnetHiddenEncoder

        return UnetHiddenEncoder(generator, layers=cfg.layers, timestep=cfg.timestep, noise_scale=cfg.noise_scale,
                                 grid=cfg.pool_grid, patch_sizes=tuple(cfg.patch_sizes), seed=cfg.seed, mode=cfg.unet_mode)
    from drpo_core.features.pixel import PixelViTEncoder

    return PixelViTEncoder(cfg.kind, cfg.path, generator, layers=cfg.layers, patch_sizes=tuple(cfg.patch_sizes), keys=cfg.keys)

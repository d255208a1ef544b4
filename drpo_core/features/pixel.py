"""φ from a pixel ViT on VAE-decoded images (drpo-method.md §1.6.4: "VAE-dec. + DINOv2", SDXL pixel ViT-MAE).

    φ(x) = ViT( normalise( resize( VAE_dec(x) ) ) ) hidden states of chosen layers

The VAE decode sits inside the gradient path (both frozen; gradients reach the generator through x).
``dinov2`` loads ``Dinov2Model``; ``vit_mae`` loads ``ViTMAEModel`` with ``mask_ratio=0`` and the
identity patch order (MAE's random shuffle is fixed by passing increasing ``noise``), so every patch is
seen in place. Both come from a hub id or a local folder through ``from_pretrained``.

Keys per layer l, by default the official three: ``layer{l}_patch_mean`` / ``_std`` `[N, 1, D]` (over all
patches) and ``layer{l}_cls`` `[N, 1, D]`; ``features.keys`` may also ask for ``layer{l}_patch_mean_p`` /
``_std_p`` (p×p groups of patches, where the patch grid divides).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from drpo_core.features.common import FeatureDict, multiscale_mean_std

DEFAULT_PATHS = {"dinov2": "facebook/dinov2-base", "vit_mae": "facebook/vit-mae-base"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def default_layers(kind: str, num_layers: int) -> list[int]:
    """dinov2: four evenly spaced layers (3/6/9/12 for 12); vit_mae: the last layer."""
    if kind == "vit_mae":
        return [num_layers]
    return sorted({max(1, round(num_layers * k / 4)) for k in range(1, 5)})


def _preprocessing(path: str) -> tuple[tuple[float, ...], tuple[float, ...], int | None]:
    """Image mean, std and input side from the checkpoint's preprocessor config (crop size if it crops);
    ImageNet's mean/std and no size when it has none (both model families use ImageNet's)."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError):
        return IMAGENET_MEAN, IMAGENET_STD, None
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else getattr(processor, "size", None)
    side = (size.get("height") or size.get("shortest_edge")) if isinstance(size, dict) else None
    return tuple(processor.image_mean), tuple(processor.image_std), side


class PixelViTEncoder(nn.Module):
    """Frozen DINOv2 / ViT-MAE features of decoded images; ``encoder(latents) -> {key: [N, L, D]}``."""

    def __init__(self, kind: str, path: str | None, generator, layers: list[int] | None = None,
                 patch_sizes: tuple[int, ...] = (2, 4), keys: list[str] | None = None):
        super().__init__()
        from transformers import Dinov2Model, ViTMAEModel

        cls = {"dinov2": Dinov2Model, "vit_mae": ViTMAEModel}[kind]
        self.kind, self.path = kind, path or DEFAULT_PATHS[kind]
        extra = {"mask_ratio": 0.0} if kind == "vit_mae" else {}
        try:
            model = cls.from_pretrained(self.path, dtype=generator.dtype, **extra)
        except (OSError, ValueError) as e:
            raise ValueError(f"features.path {self.path!r}: cannot load a {cls.__name__}: {str(e).splitlines()[0]}") from None
        self.model = model.requires_grad_(False).eval().to(generator.device)
        self.generator = generator
        config = model.config
        mean, std, side = _preprocessing(self.path)
        # ViT-MAE's position table fixes its input side; DINOv2 interpolates its table, so it takes the
        # processor's crop side (224 for facebook/dinov2-*, whose config says 518). The whole image is
        # resized to that side: no centre crop, so no part of the image escapes φ.
        config_side = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        self.image_size = config_side if kind == "vit_mae" or side is None else side
        self.grid = self.image_size // config.patch_size
        self.image_size = self.grid * config.patch_size
        n = config.num_hidden_layers
        self.layers = [int(layer) for layer in layers] if layers else default_layers(kind, n)
        bad = [layer for layer in self.layers if not 1 <= layer <= n]
        if bad:
            raise ValueError(f"features.layers {bad} out of range for {self.path!r} with {n} layers (1..{n})")
        self.patch_sizes = tuple(p for p in patch_sizes if p < self.grid and self.grid % p == 0)
        available = [f"layer{l}_{s}" for l in self.layers for s in ("patch_mean", "patch_std", "cls")]
        available += [f"layer{l}_patch_{m}_{p}" for l in self.layers for p in self.patch_sizes for m in ("mean", "std")]
        self.keys = list(keys) if keys else available[:3 * len(self.layers)]  # official: 3 keys per layer
        unknown = [k for k in self.keys if k not in available]
        if unknown:
            raise ValueError(f"features.keys: {unknown[0]!r} is not a {kind} key here; available: {', '.join(available)}")
        self.register_buffer("mean", torch.tensor(mean, device=generator.device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=generator.device).view(1, 3, 1, 1))

    def forward(self, latents: torch.Tensor) -> FeatureDict:
        images = self.generator.vae_decode(latents)  # [N, 3, H, W] in [0, 1], differentiable
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=images.shape[-1] > self.image_size)
        x = ((x - self.mean) / self.std).to(self.model.dtype)
        extra = {}
        if self.kind == "vit_mae":  # increasing noise → argsort is the identity: patches stay in place
            extra["noise"] = torch.arange(self.grid**2, device=x.device, dtype=torch.float32).expand(x.shape[0], -1)
        hidden = self.model(pixel_values=x, output_hidden_states=True, **extra).hidden_states
        feats: FeatureDict = {}
        for layer in self.layers:
            h = hidden[layer].float()  # [N, 1 + grid², D]: CLS then patches in raster order
            patches = h[:, 1:1 + self.grid**2].transpose(1, 2).reshape(h.shape[0], -1, self.grid, self.grid)
            feats.update(multiscale_mean_std(patches, f"layer{layer}_patch", self.patch_sizes))
            feats[f"layer{layer}_cls"] = h[:, :1]
        return {k: feats[k] for k in self.keys}

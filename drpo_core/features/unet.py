"""φ from the frozen base UNet's hidden states (drpo-method.md §1.6.4, SDXL-Turbo backend (b)).

    φ(x) = pooled hidden states of U_base(x + s·n, t=100, c=∅) at down_blocks.2, mid_block, up_blocks.0

- U_base is the generator's own UNet with its adapter disabled (full fine-tuning: the frozen copy),
  so no extra weights are needed; gradients reach the generator only through the input latents x.
- n is one fixed noise tensor (seeded), the same for every image, so φ is a deterministic function
  of x and anchors / candidates / reference are compared in one feature space.
- The official code conditions on the prompt; the encoder protocol maps latents only, so this uses
  the empty prompt (its embedding is cached by the generator).
- Forward hooks capture the block outputs; the forward stops after the last hooked block, so the
  remaining up blocks cost nothing.

Keys per hooked block ``<name>`` (``down2``, ``mid``, ``up0``): ``<name>_pool<g>`` `[N, g², C]` (the map
average-pooled to a g×g grid: g² points of dimension C) and ``multiscale_mean_std`` of the map.

``mode="official"`` is the official teacher-UNet φ (``SDXLTeacherUNetFeatureExtractor``) instead:

    φ_l(x) = flatten( avgpool_{g×g, stride g}( U_base(x + s·n, t, c_prompt)_l ) )   `[N, 1, C·(H/g)·(W/g)]`

keyed by the module name (``down_blocks.2``...), one vector per image and layer (a map smaller than g
is pooled to 1×1), conditioned on each image's own prompt, with fresh noise n at every call (drawn from
a generator seeded once, so a run is reproducible). It needs the prompts: ``encoder(latents, prompts=…)``.
"""

from __future__ import annotations

import re

import torch
from torch.nn import functional as F

from drpo_core.features.common import FeatureDict, multiscale_mean_std
from drpo_core.models.generator import candidate_noise
from drpo_core.models.speed import gradient_checkpointing_off


class _EnoughFeatures(Exception):
    """Raised by the last hook to skip the rest of the UNet forward."""


def default_unet_layers(unet) -> list[str]:
    """down_blocks.2 (or the last down block present), mid_block, up_blocks.0."""
    return [f"down_blocks.{min(2, len(unet.down_blocks) - 1)}", "mid_block", "up_blocks.0"]


def short_name(module_name: str) -> str:
    """``down_blocks.2`` → ``down2``, ``mid_block`` → ``mid``, other dots → underscores."""
    name = re.sub(r"^(down|up)_blocks\.(\d+)", r"\1\2", module_name)
    return name.replace("mid_block", "mid").replace(".", "_")


class UnetHiddenEncoder:
    """Frozen base-UNet feature encoder; ``encoder(latents [N, C, h, w]) -> {key: [N, L, D]}``."""

    def __init__(self, generator, layers: list[str] | None = None, timestep: int = 100, noise_scale: float = 0.1,
                 grid: int = 4, patch_sizes: tuple[int, ...] = (2, 4), seed: int = 0, mode: str = "pooled_points"):
        self.generator, self.timestep, self.noise_scale, self.grid = generator, timestep, noise_scale, grid
        self.official = mode == "official"
        self.needs_prompts = self.official  # the learner passes each image's prompt
        self.rng = torch.Generator(device="cpu").manual_seed(seed)  # official mode: fresh noise per call
        unet = generator.unet
        self.layers = [str(name) for name in layers] if layers else default_unet_layers(unet)
        known = {name for name, _ in unet.named_modules()}
        unknown = [name for name in self.layers if name not in known]
        if unknown:
            blocks = [n for n in known if re.fullmatch(r"(down|up)_blocks\.\d+|mid_block", n)]
            raise ValueError(f"features.layers {unknown} are not modules of the UNet; blocks are {sorted(blocks)}")
        self.patch_sizes = patch_sizes
        self.noise = candidate_noise([seed], generator.latent_shape, generator.device)[0]  # [C, h, w], fixed

    def _hook(self, captured: dict, name: str):
        def hook(module, args, output):
            captured[name] = output[0] if isinstance(output, tuple) else output
            if len(captured) == len(self.layers):
                raise _EnoughFeatures
        return hook

    def __call__(self, latents: torch.Tensor, prompts: list[str] | None = None) -> FeatureDict:
        gen = self.generator
        n = latents.shape[0]
        if self.official:
            if prompts is None or len(prompts) != n:
                raise ValueError("unet_hidden in official mode is prompt-conditioned: pass one prompt per latent")
            noise = torch.randn(latents.shape, generator=self.rng).to(latents.device, latents.dtype)
            x, cond = latents + self.noise_scale * noise, gen.encode_prompts(list(prompts))
        else:
            x, cond = latents + self.noise_scale * self.noise.to(latents.dtype), gen.encode_prompts([""] * n)
        t = torch.full((n,), self.timestep, device=latents.device, dtype=torch.long)
        captured: dict[str, torch.Tensor] = {}
        with gen.base_model(), gradient_checkpointing_off(gen.unet) as unet:
            handles = [unet.get_submodule(name).register_forward_hook(self._hook(captured, name)) for name in self.layers]
            try:
                gen.unet_forward(x, t, cond)
            except _EnoughFeatures:
                pass
            finally:
                for handle in handles:
                    handle.remove()
        feats: FeatureDict = {}
        if self.official:
            for name in self.layers:
                fmap = captured[name].float()
                small = fmap.shape[-1] < self.grid or fmap.shape[-2] < self.grid
                pooled = F.adaptive_avg_pool2d(fmap, 1) if small else F.avg_pool2d(fmap, self.grid, self.grid)
                feats[name] = pooled.flatten(1)[:, None]
            return feats
        for name in self.layers:
            fmap = captured[name].float()  # [N, C, H, W]
            prefix = short_name(name)
            feats[f"{prefix}_pool{self.grid}"] = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)
            H, W = fmap.shape[-2:]
            sizes = tuple(p for p in self.patch_sizes if p < min(H, W) and H % p == 0 and W % p == 0)
            feats.update(multiscale_mean_std(fmap, prefix, sizes))
        return feats

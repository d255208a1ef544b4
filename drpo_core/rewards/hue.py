"""Offline GenEval-style colour reward: the fraction of pixels whose hue matches the prompt's colour.

Non-differentiable on purpose (a thresholded count), needs no weights, and has a base rate the tiny
random model reaches for every default colour, so the embedded job shows a real alignment effect.
"""

from __future__ import annotations

import re

import torch

# Hue ranges in degrees [lo, hi) on the HSV circle; red wraps around 0.
HUE_RANGES: dict[str, list[tuple[float, float]]] = {
    "red": [(0.0, 20.0), (340.0, 360.0)],
    "orange": [(20.0, 45.0)],
    "yellow": [(45.0, 70.0)],
    "green": [(90.0, 150.0)],
    "cyan": [(170.0, 200.0)],
    "blue": [(210.0, 260.0)],
    "purple": [(260.0, 300.0)],
    "pink": [(300.0, 340.0)],
}


def rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`[N, 3, H, W]` RGB in [0, 1] → hue in degrees [0, 360), saturation and value, each `[N, H, W]`."""
    r, g, b = images[:, 0], images[:, 1], images[:, 2]
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    safe = chroma.clamp_min(1e-8)
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue)) % 360.0
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-8), torch.zeros_like(value))
    return hue, saturation, value


class HueFractionReward:
    """score = fraction of pixels with hue in the prompt colour's range, saturation ≥ s_min, value ≥ v_min.

    The colour is the first word of the prompt found in :data:`HUE_RANGES`; a prompt naming no
    known colour gets NaN (a missing score), never an exception.
    """

    version = "hue-fraction-v1"

    def __init__(self, min_saturation: float = 0.25, min_value: float = 0.15):
        self.min_saturation, self.min_value = min_saturation, min_value
        self._color_pattern = re.compile(r"\b(" + "|".join(HUE_RANGES) + r")\b", re.IGNORECASE)

    def color_of(self, prompt: str) -> str | None:
        found = self._color_pattern.search(prompt)
        return found.group(1).lower() if found else None

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        hue, sat, val = rgb_to_hsv(images.float().clamp(0, 1))
        vivid = (sat >= self.min_saturation) & (val >= self.min_value)
        scores = torch.full((images.shape[0],), float("nan"))
        for i, prompt in enumerate(prompts):
            color = self.color_of(prompt)
            if color is None:
                continue
            in_range = torch.zeros_like(vivid[i])
            for lo, hi in HUE_RANGES[color]:
                in_range |= (hue[i] >= lo) & (hue[i] < hi)
            scores[i] = (in_range & vivid[i]).float().mean().cpu()
        return scores

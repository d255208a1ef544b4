"""Differentiable colour reward: a smooth version of the hue fraction, for reward-gradient baselines (DRaFT).

For each pixel the chroma vector in the opponent plane,

    a = R − (G + B)/2,    b = (√3/2)(G − B),    chroma = √(a² + b²),

points at the hue angle θ. The pixel's soft membership in the prompt colour c (hue centre θ_c, half
width w_c from :data:`drpo_core.rewards.hue.HUE_RANGES`) is

    m = σ((cos(θ − θ_c) − cos w_c) / τ_hue) · σ((chroma − c_min) / τ_chroma),

with cos(θ − θ_c) = (a cos θ_c + b sin θ_c) / √(chroma² + ε), and the score is the mean of m over
pixels. As τ → 0 it tends to the fraction of pixels in the hue range with enough chroma, so it ranks
like :class:`HueFractionReward` while having a gradient everywhere.
"""

from __future__ import annotations

import math
import re

import torch

from drpo_core.rewards.common import check_reward_inputs
from drpo_core.rewards.hue import HUE_RANGES


def _hue_arc(color: str) -> tuple[float, float]:
    """Centre and half width in degrees of the colour's hue range (red's range wraps around 0)."""
    lo, hi = HUE_RANGES[color][0]
    if len(HUE_RANGES[color]) == 2:  # red: [0, 20) ∪ [340, 360) → centre 0, half width 20
        lo = HUE_RANGES[color][1][0] - 360.0
    return (lo + hi) / 2.0, (hi - lo) / 2.0


class SoftHueReward:
    """score = mean over pixels of the soft hue membership (differentiable; NaN for a prompt naming no colour)."""

    version = "soft-hue-v1"
    differentiable = True

    def __init__(self, hue_temperature: float = 0.02, chroma_temperature: float = 0.05, min_chroma: float = 0.1):
        if hue_temperature <= 0 or chroma_temperature <= 0:
            raise ValueError("soft_hue temperatures must be > 0")
        self.hue_temperature, self.chroma_temperature, self.min_chroma = hue_temperature, chroma_temperature, min_chroma
        self._color_pattern = re.compile(r"\b(" + "|".join(HUE_RANGES) + r")\b", re.IGNORECASE)

    def color_of(self, prompt: str) -> str | None:
        found = self._color_pattern.search(prompt)
        return found.group(1).lower() if found else None

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        check_reward_inputs(images, prompts, metadata)
        x = images.float().clamp(0, 1)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        a_opp, b_opp = r - (g + b) / 2, (math.sqrt(3) / 2) * (g - b)  # [N, H, W]
        chroma = (a_opp.pow(2) + b_opp.pow(2) + 1e-8).sqrt()
        scores = []
        for i, prompt in enumerate(prompts):
            color = self.color_of(prompt)
            if color is None:
                scores.append(x.new_tensor(float("nan")))
                continue
            centre, half = (math.radians(v) for v in _hue_arc(color))
            cos_to_centre = (a_opp[i] * math.cos(centre) + b_opp[i] * math.sin(centre)) / chroma[i]
            in_arc = torch.sigmoid((cos_to_centre - math.cos(half)) / self.hue_temperature)
            vivid = torch.sigmoid((chroma[i] - self.min_chroma) / self.chroma_temperature)
            scores.append((in_arc * vivid).mean())
        return torch.stack(scores)

"""Neighbour noise: K unit-Gaussian noises that share a base, ε_i = √(1−σ²) ε_base + σ δ_i.

Neighbor-GRPO (:mod:`drpo_core.algorithms.grpo`) makes a prompt's K candidates neighbours this way; the
generic candidate sampler (:func:`drpo_core.training.sampler.group_noise`) builds them from the seeds, so
the noise lives here, below both, and the sampler never imports a baseline's module.
"""

from __future__ import annotations

import math

import torch


def neighbor_noise(base: torch.Tensor, deltas: torch.Tensor, sigma: float) -> torch.Tensor:
    """ε_i = √(1−σ²) ε_base + σ δ_i: ``base`` `[C, h, w]`, ``deltas`` `[K, C, h, w]` → `[K, C, h, w]` (unit variance)."""
    if not 0 < sigma <= 1:
        raise ValueError(f"neighbor sigma must be in (0, 1], got {sigma}")
    return math.sqrt(1.0 - sigma**2) * base[None] + sigma * deltas

"""Rewards: callables ``(images [N, 3, H, W] in [0, 1], prompts, metadata=None) -> scores [N]``.

A score of NaN marks a missing score (that candidate is excluded from ranking). A reward may also
offer ``pop_stats() -> dict[str, float]``: counters since the last call, logged per step.
"""

from __future__ import annotations

from typing import Protocol

import torch

from drpo_core.config import RewardConfig
from drpo_core.rewards.hue import HueFractionReward


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor: ...


def build_reward(cfg: RewardConfig) -> RewardFn:
    """Construct the in-process reward named by ``cfg.kind`` with ``cfg.options`` as keyword arguments."""
    if cfg.kind == "hue_fraction":
        try:
            return HueFractionReward(**cfg.options)
        except TypeError as e:
            raise ValueError(f"rewards[{cfg.label}].options: {e}") from None
    if cfg.kind == "soft_hue":
        from drpo_core.rewards.soft_hue import SoftHueReward

        try:
            return SoftHueReward(**cfg.options)
        except TypeError as e:
            raise ValueError(f"rewards[{cfg.label}].options: {e}") from None
    if cfg.kind == "http":
        from drpo_core.rewards.http import HttpReward  # lazy: httpx only when a remote reward is configured

        return HttpReward.from_config(cfg)
    if cfg.kind in ("hps", "pickscore", "clip", "geneval"):
        from drpo_core.rewards.model_factory import build_model_reward  # lazy: open_clip/transformers only when used

        return build_model_reward(cfg)
    raise ValueError(f"unknown reward kind {cfg.kind!r}")


__all__ = ["RewardFn", "build_reward", "HueFractionReward"]

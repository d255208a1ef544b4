"""Scoring (algorithm line 6): run every reward on the candidates, z-score per prompt, combine.

The reward is used only for ranking; its output never enters a gradient.
"""

from __future__ import annotations

import torch

from drpo_core.algorithms.groups import CandidateGroup, stable_seed
from drpo_core.algorithms.ranking import ensemble_scores


class RewardScorer:
    """Plain worker class: scores groups with weighted rewards ``{label: (reward_fn, weight)}``."""

    def __init__(self, rewards: dict[str, tuple], shuffle_seed: int | None = None, binary: bool = False):
        if not rewards:
            raise ValueError("at least one reward is needed")
        self.rewards = rewards
        self.binary = binary  # binary rewards rank on the raw weighted sum (pass/fail thresholds need raw values)
        self.shuffle_seed = shuffle_seed  # control runs: permute scores within each group

    def score(self, groups: list[CandidateGroup]) -> list[CandidateGroup]:
        todo = [g for g in groups if not g.rewards]
        if todo:
            images = torch.cat([g.images for g in todo])
            if images.dtype == torch.uint8:  # the samplers' format; rewards read [0, 1] floats
                images = images.float() / 255
            prompts = [g.prompt for g in todo for _ in range(g.size)]
            metadata = [g.metadata for g in todo for _ in range(g.size)]
            for label, (fn, _) in self.rewards.items():
                answer = fn(images, prompts, metadata)
                try:
                    raw = torch.as_tensor(answer, dtype=torch.float32).flatten().cpu()
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"reward {label!r} returned {type(answer).__name__} {str(answer)[:60]!r}, not one "
                                     "number per image") from None
                if raw.shape[0] != images.shape[0]:
                    raise ValueError(f"reward {label!r} returned {raw.shape[0]} scores for {images.shape[0]} images")
                for g, part in zip(todo, raw.split([g.size for g in todo])):
                    g.rewards[label] = part
        weights = {label: w for label, (_, w) in self.rewards.items()}
        for g in groups:
            if self.binary:
                scores = sum(weights[k] * v for k, v in g.rewards.items())
            else:
                scores = ensemble_scores({k: v[None] for k, v in g.rewards.items()}, weights)[0]
            if self.shuffle_seed is not None:
                scores = self._shuffled(scores, g.group_id)
            g.scores = scores
        return groups

    def _shuffled(self, scores: torch.Tensor, group_id: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(stable_seed("shuffle", self.shuffle_seed, group_id))
        return scores[torch.randperm(scores.shape[0], generator=gen)]

    def pop_stats(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        for label, (fn, _) in self.rewards.items():
            if hasattr(fn, "pop_stats"):
                stats.update({f"reward/{label}/remote_{k}": v for k, v in fn.pop_stats().items()})
        return stats

"""Prompt groups: the unit of work that flows sample → score → rank → learn.

A group holds one prompt's candidates. Tensors keep the candidate axis explicit (`[K', ...]`, where
K' ≥ K when a binary reward needed extra sampling rounds); the learner regresses the first K.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch


def stable_seed(*parts: object) -> int:
    """A 63-bit seed that depends only on ``parts`` (not on process, hash salt or global RNG)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def candidate_seed(run_seed: int, step: int, slot: int, index: int) -> int:
    """Seed of candidate ``index`` of prompt ``slot`` at ``step``."""
    return stable_seed("candidate", run_seed, step, slot, index)


@dataclass
class CandidateGroup:
    """One prompt's candidates.

    Attributes:
        group_id: unique id (used to drop duplicates and re-issue lost work).
        prompt: the text prompt c.
        seeds: candidate seeds `[K']`; ε_i is regenerated from seeds[i].
        latents: policy outputs x_i = G_θ(ε_i, c), detached, `[K', C, h, w]` (None in the rewards' view).
        images: decoded candidates, uint8 `[K', 3, H, W]` (what a reward server receives; the scorer reads
            them as x/255 in [0, 1]), or None in the learner's view.
        version: weight version of the policy that produced ``latents``.
        base_latents: frozen-base outputs G_base(ε_i, c) for the first K seeds, `[K, C, h, w]`, or None.
        metadata: per-prompt metadata passed to rewards (e.g. a GenEval record), or None.
        rewards: reward label → raw scores `[K']` (NaN = missing).
        scores: ranking scores `[K']` (ensemble of z-scores), set by the scorer.
    """

    group_id: str
    prompt: str
    seeds: list[int]
    latents: torch.Tensor | None
    images: torch.Tensor | None
    version: int
    base_latents: torch.Tensor | None = None
    metadata: dict | None = None
    rewards: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.seeds)
        for name in ("latents", "images"):
            t = getattr(self, name)
            if t is not None and t.shape[0] != n:
                raise ValueError(f"group {self.group_id}: {n} seeds but {name} {tuple(t.shape)}")

    def for_reward(self) -> "CandidateGroup":
        """What a reward needs: prompt, metadata and the uint8 images on CPU (no latents)."""
        return replace(self, latents=None, base_latents=None, images=self.images.cpu(), rewards={}, scores=None)

    def for_learner(self) -> "CandidateGroup":
        """What the learner needs: prompt, seeds (it recomputes G_θ(ε_i, c) from them), version, and the
        detached policy and base latents on CPU for the anchors and the reference drift (no images)."""
        return replace(self, images=None, latents=self.latents.cpu(),
                       base_latents=None if self.base_latents is None else self.base_latents.cpu())

    @classmethod
    def joined(cls, reward_view: "CandidateGroup", learner_view: "CandidateGroup") -> "CandidateGroup":
        """The whole group again from its two views (a generator extending it by another round)."""
        return replace(learner_view, images=reward_view.images)

    @property
    def size(self) -> int:
        return len(self.seeds)

"""What every learner objective other than the online DrPO drift is: :class:`Objective`.

* ``keep(group)`` → None to train on the group, or the reason it is skipped (counted as ``skipped/<reason>``).
* ``chunk_loss(groups)`` → (Σ over the groups of the per-prompt loss, Σ of their stats).

The subclasses live in :mod:`drpo_core.training.objectives` (the baselines and the reward-weighted drifts) and
:mod:`drpo_core.training.offline_objective` (DrPO with dataset anchors); ``objectives.build_objective`` picks one.
"""

from __future__ import annotations

import torch

from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.algorithms.ranking import SKIP_CONSTANT, SKIP_TOO_FEW_VALID
from drpo_core.training.sampler import group_noise


def add_stats(sums: dict[str, float], stats: dict[str, float]) -> None:
    """sums[k] += stats[k] for every key (a missing key starts at 0)."""
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + v


class Objective:
    def __init__(self, generator, encoder, algo):
        self.generator, self.encoder, self.algo = generator, encoder, algo
        self.K = algo.num_candidates

    def keep(self, group: CandidateGroup) -> str | None:
        """Default: a full set of finite, non-constant scores among the first K."""
        s = group.scores[: self.K] if group.scores is not None else None
        if s is None or torch.isnan(s).any():
            return SKIP_TOO_FEW_VALID
        return SKIP_CONSTANT if bool((s == s[0]).all()) else None

    def policy_latents(self, groups: list[CandidateGroup], index: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x = G_θ(ε_i, c) with grad for each group's first K candidates (or the ``index`` rows), `[ΣK, C, h, w]`."""
        gen = self.generator
        sigma = self.algo.grpo.neighbor_sigma if self.algo.kind == "grpo" else None
        noises, prompts = [], []
        for b, g in enumerate(groups):
            eps = group_noise(gen, g.seeds[: self.K], sigma)
            eps = eps if index is None else eps[index[b]]
            noises.append(eps)
            prompts += [g.prompt] * eps.shape[0]
        return gen.predict_x0(torch.cat(noises), gen.encode_prompts(prompts)).float()

    def chunk_loss(self, groups: list[CandidateGroup]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

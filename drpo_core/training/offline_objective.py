"""DrPO with anchors from a preference dataset (``algo.offline``; see :mod:`drpo_core.training.offline_anchors`).

The regressed set, the drift, the reference drift and the loss are DrPO's
(:func:`drpo_core.algorithms.loss.drpo_group_loss`); only where A⁺ / A⁻ come from differs:

* ``images``: A⁺ = φ(E(chosen images)), A⁻ = φ(E(rejected images)), E the VAE encoder.
* ``distance``: the K candidates ranked by :func:`distance_margin_scores` against the data images;
  A⁺ / A⁻ = the top / bottom M candidates (plus the data images with ``include_data_anchors``).
"""

from __future__ import annotations

import torch

from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.algorithms.ranking import select_anchors
from drpo_core.training.objective_base import Objective, add_stats
from drpo_core.training.offline_anchors import distance_margin_scores, encode_images, load_images, load_preference_dataset


class OfflineDrpoObjective(Objective):
    def __init__(self, generator, encoder, algo):
        super().__init__(generator, encoder, algo)
        self.records = load_preference_dataset(algo.offline.dataset)
        self._latents: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(self, group: CandidateGroup) -> str | None:
        return None if group.prompt in self.records else "not_in_offline_dataset"

    def data_latents(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latents of the prompt's chosen and rejected images (encoded once, cached)."""
        if prompt not in self._latents:
            rec, res = self.records[prompt], self.generator.cfg.resolution
            self._latents[prompt] = (encode_images(self.generator, load_images(rec.chosen, res)),
                                     encode_images(self.generator, load_images(rec.rejected, res)))
        return self._latents[prompt]

    def chunk_loss(self, groups):
        K, M, algo, device = self.K, self.algo.num_anchors, self.algo, self.generator.device
        feats = self.encoder(self.policy_latents(groups))  # key -> [B·K, L, D] with grad
        use_ref = algo.lambda_ref > 0
        total, sums = torch.zeros((), device=device), {}
        for b, g in enumerate(groups):
            rows = slice(b * K, (b + 1) * K)
            mine = {k: v[rows].float() for k, v in feats.items()}
            with torch.no_grad():
                chosen, rejected = (self.encoder(z) for z in self.data_latents(g.prompt))
                if algo.offline.mode == "images":
                    pos, neg = chosen, rejected
                else:
                    scores = distance_margin_scores(mine, chosen, rejected)
                    sel = select_anchors(scores[None].cpu(), M)
                    if not bool(sel.keep[0]):  # every candidate equally far: no ranking signal
                        add_stats(sums, {"skipped/offline_constant_margin": 1.0})
                        continue
                    idx_pos, idx_neg = sel.pos_idx[0].to(device), sel.neg_idx[0].to(device)
                    pos = {k: v.detach()[idx_pos] for k, v in mine.items()}
                    neg = {k: v.detach()[idx_neg] for k, v in mine.items()}
                    if algo.offline.include_data_anchors:
                        pos = {k: torch.cat([pos[k], chosen[k]]) for k in pos}
                        neg = {k: torch.cat([neg[k], rejected[k]]) for k in neg}
                ref = self.encoder(g.base_latents[:K].to(device)) if use_ref else None
            loss, stats = drpo_group_loss(mine, {k: v.float() for k, v in pos.items()},
                                          {k: v.float() for k, v in neg.items()},
                                          {k: v.float() for k, v in ref.items()} if ref else None, algo)
            total = total + loss
            add_stats(sums, stats)
        return total, sums

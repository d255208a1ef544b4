"""The learner's objectives other than the default online DrPO drift, selected by ``algo.kind``.

Each objective sees exactly what DrPO sees (the scored :class:`CandidateGroup` of K candidates per
prompt, their seeds, the frozen base's latents) and returns the summed per-prompt loss of a chunk of
prompts; :class:`drpo_core.training.learner.DrpoLearner` does the micro-batching, clipping and AdamW
step for all of them. The math is in :mod:`drpo_core.algorithms` (one file per loss); what an objective
answers (``keep``, ``chunk_loss``) is :class:`drpo_core.training.objective_base.Objective`.
:func:`build_objective` picks the objective of a config, the dataset-anchored DrPO
(:mod:`drpo_core.training.offline_objective`) included.
"""

from __future__ import annotations

import torch

from drpo_core.algorithms.dpo import dpo_loss
from drpo_core.algorithms.draft import draft_loss
from drpo_core.algorithms.groups import CandidateGroup, stable_seed
from drpo_core.algorithms.grpo import neighbor_grpo_loss, quasi_norm_advantages
from drpo_core.algorithms.ranking import select_anchors
from drpo_core.algorithms.raft import raft_loss
from drpo_core.algorithms.weighted_drift import (awr_advsign_drift_loss, awr_hard_drift_loss, awr_kernel_drift_loss,
                                                 awr_topk_drift_loss)
from drpo_core.training.objective_base import Objective, add_stats
from drpo_core.training.offline_objective import OfflineDrpoObjective


class DraftObjective(Objective):
    """DRaFT: backpropagate the differentiable rewards through the VAE decode (never skips a group)."""

    def __init__(self, generator, encoder, algo, rewards: dict[str, tuple]):
        super().__init__(generator, encoder, algo)
        for label, (fn, _) in rewards.items():
            if not getattr(fn, "differentiable", False):
                raise ValueError(f"algo.kind 'draft' needs differentiable rewards; {label!r} is not")
        self.rewards = rewards

    def keep(self, group: CandidateGroup) -> str | None:
        return None

    def chunk_loss(self, groups):
        x = self.policy_latents(groups)
        images = self.generator.vae_decode(x)  # with grad: the step DrPO removes
        total, sums = torch.zeros((), device=x.device), {}
        for b, g in enumerate(groups):
            rows = slice(b * self.K, (b + 1) * self.K)
            scores = {label: torch.as_tensor(fn(images[rows], [g.prompt] * self.K, [g.metadata] * self.K)).flatten()
                      for label, (fn, _) in self.rewards.items()}
            ref = g.base_latents[: self.K].to(x.device) if g.base_latents is not None else None
            loss, stats = draft_loss(scores, {k: w for k, (_, w) in self.rewards.items()}, x[rows], ref,
                                     self.algo.draft.ref_l2_weight)
            total = total + loss
            add_stats(sums, stats)
        return total, sums


class _TopBottomObjective(Objective):
    """Shared by DPO and RAFT: the same disjoint top-M / bottom-M selection DrPO uses."""

    def keep(self, group):
        sel = select_anchors(group.scores[None], self.algo.num_anchors, binary_threshold=self.algo.binary_threshold)
        return None if bool(sel.keep[0]) else next(iter(sel.skipped))

    def anchors(self, g: CandidateGroup) -> tuple[torch.Tensor, torch.Tensor]:
        sel = select_anchors(g.scores[None], self.algo.num_anchors, binary_threshold=self.algo.binary_threshold)
        return g.latents[sel.pos_idx[0]], g.latents[sel.neg_idx[0]]


class DpoObjective(_TopBottomObjective):
    def chunk_loss(self, groups):
        x = self.policy_latents(groups)
        total, sums, opt = torch.zeros((), device=x.device), {}, self.algo.dpo
        for b, g in enumerate(groups):
            pos, neg = (a.to(x.device).flatten(1) for a in self.anchors(g))
            ref = g.base_latents[: self.K].to(x.device).flatten(1) if g.base_latents is not None else None
            loss, stats = dpo_loss(x[b * self.K:(b + 1) * self.K].flatten(1), ref, pos, neg, beta=opt.beta,
                                   reference_free=opt.reference_free, ref_l2_weight=opt.ref_l2_weight)
            total = total + loss
            add_stats(sums, stats)
        return total, sums


class RaftObjective(_TopBottomObjective):
    def chunk_loss(self, groups):
        x = self.policy_latents(groups)
        total, sums = torch.zeros((), device=x.device), {}
        for b, g in enumerate(groups):
            best = self.anchors(g)[0].to(x.device).flatten(1)
            ref = g.base_latents[: self.K].to(x.device).flatten(1) if g.base_latents is not None else None
            loss, stats = raft_loss(x[b * self.K:(b + 1) * self.K].flatten(1), best, ref, self.algo.raft.ref_l2_weight)
            total = total + loss
            add_stats(sums, stats)
        return total, sums


class GrpoObjective(Objective):
    """Neighbor-GRPO: A trainable anchors per prompt, chosen by a seed of the group id (reproducible)."""

    def anchor_index(self, g: CandidateGroup) -> torch.Tensor:
        rng = torch.Generator().manual_seed(stable_seed("grpo-anchors", g.group_id))
        return torch.randperm(self.K, generator=rng)[: self.algo.grpo.num_anchors]

    def chunk_loss(self, groups):
        opt = self.algo.grpo
        index = [self.anchor_index(g) for g in groups]
        current = self.policy_latents(groups, index)  # [B·A, C, h, w]
        A = opt.num_anchors
        total, sums = torch.zeros((), device=current.device), {}
        for b, g in enumerate(groups):
            cur = current[b * A:(b + 1) * A]
            adv = quasi_norm_advantages(g.scores[: self.K], p=opt.p_norm, clip=opt.advantage_clip)
            loss, stats = neighbor_grpo_loss(g.latents[: self.K].to(cur.device), cur, g.latents[index[b]].to(cur.device), adv,
                                             clip_range=opt.clip_range, max_log_ratio=opt.max_log_ratio,
                                             temperature=opt.temperature)
            if opt.ref_l2_weight > 0:
                l2 = (cur - g.base_latents[index[b]].to(cur.device)).pow(2).mean()
                loss = loss + opt.ref_l2_weight * l2
                stats["grpo/ref_l2"] = float(l2.detach())
            total = total + loss
            add_stats(sums, stats)
        return total, sums


class AwrObjective(Objective):
    """Reward-weighted drifts: per feature key, summed over keys like the DrPO loss, times ``awr.loss_weight``."""

    def chunk_loss(self, groups):
        algo, opt, K = self.algo, self.algo.awr, self.K
        feats = self.encoder(self.policy_latents(groups))
        ref_feats = None
        if algo.kind in ("drpo-awr", "drpo-awr-topk"):
            with torch.no_grad():
                ref_feats = self.encoder(torch.cat([g.base_latents[:K] for g in groups]).to(self.generator.device))
        common = dict(alpha=opt.alpha, radii=tuple(algo.radii), kernel=algo.kernel, logit_clip=opt.logit_clip)
        device = next(iter(feats.values())).device
        total, sums = torch.zeros((), device=device), {}
        for b, g in enumerate(groups):
            rows, scores = slice(b * K, (b + 1) * K), g.scores[:K].to(device)
            group_loss = torch.zeros((), device=device)
            for key, f in feats.items():
                gen = f[rows].float()
                if algo.kind == "drpo-awr":
                    loss, stats = awr_kernel_drift_loss(gen, ref_feats[key][rows], scores, **common)
                elif algo.kind == "drpo-awr-topk":
                    loss, stats = awr_topk_drift_loss(gen, ref_feats[key][rows], scores, top_fraction=opt.top_fraction,
                                                      force_scale=opt.force_scale, **common)
                elif algo.kind == "drpo-awr-hard":
                    loss, stats = awr_hard_drift_loss(gen, scores, pos_weight=algo.pos_weight, neg_weight=algo.neg_weight,
                                                      top_fraction=opt.top_fraction, **common)
                else:
                    loss, stats = awr_advsign_drift_loss(gen, scores, pos_weight=algo.pos_weight,
                                                         neg_weight=algo.neg_weight, **common)
                group_loss = group_loss + loss
                add_stats(sums, {f"{k}/{key}": v for k, v in stats.items()})
            total = total + opt.loss_weight * group_loss
            add_stats(sums, {"loss/pref": float(group_loss.detach())})
        return total, sums


def build_objective(generator, encoder, algo, rewards: dict[str, tuple] | None = None) -> Objective | None:
    """The objective of ``algo.kind`` (None: the learner's built-in online DrPO path)."""
    if algo.offline.dataset:
        return OfflineDrpoObjective(generator, encoder, algo)
    kind = algo.kind
    if kind == "drpo":
        return None
    if kind == "draft":
        if not rewards:
            raise ValueError("algo.kind 'draft' needs the rewards in the learner")
        return DraftObjective(generator, encoder, algo, rewards)
    if kind.startswith("drpo-awr"):
        return AwrObjective(generator, encoder, algo)
    return {"dpo": DpoObjective, "raft": RaftObjective, "grpo": GrpoObjective}[kind](generator, encoder, algo)


__all__ = ["Objective", "build_objective"]

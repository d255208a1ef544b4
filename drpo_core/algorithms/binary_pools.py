"""The official GenEval (binary reward) anchor rule, as in the official SD-Turbo trainer before its removal
from the head (UGVly/DrPO e93ff02^ ``_collect_geneval_online_latents``; re-implemented from reading).

For one prompt, candidates arrive in rounds of K (up to R rounds). Per round r:

1. passes P_r = {i in round r : s_i ≥ τ}, fails F_r = the rest;
2. pass pool 𝒫 ← 𝒫 ∪ P_r, then if |𝒫| > M keep a uniformly random M of it; the same for the fail pool 𝒩;
3. stop once |𝒫| ≥ M and |𝒩| ≥ M.

If a pool is still short after the last round the prompt is skipped. Otherwise both pools are shuffled;
the positives A⁺ are the first M of 𝒫, the negatives A⁻ the first M of 𝒩, and the regressed set is
𝒫 ∪ 𝒩 without A⁻ — with pools capped at M that is exactly the positives. Every random draw comes from one
``torch.Generator`` (seeded per prompt group by the caller), in the official order: cap 𝒫, cap 𝒩 per round,
then shuffle 𝒫, shuffle 𝒩.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BinaryPick:
    pos_idx: torch.Tensor  # [M] candidate indices of A⁺
    neg_idx: torch.Tensor  # [M] candidate indices of A⁻
    regress_idx: torch.Tensor  # [n] candidates whose features are regressed (the positives)


def _capped(pool: torch.Tensor, new: torch.Tensor, cap: int, rng: torch.Generator) -> torch.Tensor:
    pool = torch.cat([pool, new])
    if pool.numel() > cap:
        pool = pool[torch.randperm(pool.numel(), generator=rng)[:cap]]
    return pool


def official_binary_pools(scores: torch.Tensor, round_size: int, num_anchors: int, threshold: float,
                          rng: torch.Generator) -> BinaryPick | None:
    """Anchors and regressed set of one prompt from its scores `[K·R']` in round order; None = skip.

    NaN (missing) scores count as neither pass nor fail.
    """
    M = num_anchors
    scores = scores.float().cpu()
    pos = neg = torch.zeros(0, dtype=torch.long)
    for start in range(0, scores.numel(), round_size):
        idx = torch.arange(start, min(start + round_size, scores.numel()))
        s = scores[idx]
        if bool((s >= threshold).any()):
            pos = _capped(pos, idx[s >= threshold], M, rng)
        if bool((s < threshold).any()):
            neg = _capped(neg, idx[s < threshold], M, rng)
        if pos.numel() >= M and neg.numel() >= M:
            break
    if pos.numel() < M or neg.numel() < M:
        return None
    pos = pos[torch.randperm(pos.numel(), generator=rng)]
    neg = neg[torch.randperm(neg.numel(), generator=rng)]
    best, worst = pos[:M], neg[:M]
    available = torch.cat([pos, neg])
    regress = available[~(available[:, None] == worst[None, :]).any(dim=1)]
    return BinaryPick(pos_idx=best, neg_idx=worst, regress_idx=regress if regress.numel() else best[:1])

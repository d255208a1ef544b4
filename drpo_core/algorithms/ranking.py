"""Reward ranking: per-prompt z-scores, weighted ensembles and disjoint top-M / bottom-M selection.

The reward is used only through this ranking (DrPO §1.6.5): it is never differentiated, so any
black-box, non-differentiable or remote scorer works. Shapes keep the group axis explicit:
scores are `[B, K]` (B prompts, K candidates each); a missing score is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Reasons a prompt group is skipped (counted in metrics as ``skipped/<reason>``).
SKIP_TOO_FEW_VALID = "too_few_valid"
SKIP_CONSTANT = "constant_scores"
SKIP_TOO_FEW_POSITIVES = "too_few_positives"
SKIP_TOO_FEW_NEGATIVES = "too_few_negatives"


def zscore(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-prompt z-score over the valid (non-NaN) candidates. `[B, K] -> [B, K]`; NaN stays NaN.

    A group whose valid scores are all equal maps to zeros (no ranking signal).
    """
    valid = ~torch.isnan(scores)
    count = valid.sum(1, keepdim=True).clamp_min(1)
    filled = torch.where(valid, scores, torch.zeros_like(scores))
    mean = filled.sum(1, keepdim=True) / count
    var = (torch.where(valid, scores - mean, torch.zeros_like(scores)) ** 2).sum(1, keepdim=True) / count
    z = (scores - mean) / (var.sqrt() + eps)
    return torch.where(valid, z, torch.full_like(scores, float("nan")))


def ensemble_scores(components: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """Weighted sum of per-prompt z-scored rewards, `{name: [B, K]} -> [B, K]`.

    A candidate missing any component (NaN) is missing in the ensemble. With one component this is
    just its z-score, which ranks exactly like the raw reward.
    """
    if not components:
        raise ValueError("ensemble needs at least one reward")
    total = None
    for name, raw in components.items():
        part = weights[name] * zscore(raw.float())
        total = part if total is None else total + part
    return total


@dataclass(frozen=True)
class Selection:
    """Anchors chosen for one step.

    Attributes:
        pos_idx: `[B, M]` candidate indices of the top-M (rows of skipped prompts are -1).
        neg_idx: `[B, M]` candidate indices of the bottom-M.
        keep: `[B]` bool, False where the prompt is skipped.
        skipped: reason → count of skipped prompts.
    """

    pos_idx: torch.Tensor
    neg_idx: torch.Tensor
    keep: torch.Tensor
    skipped: dict[str, int] = field(default_factory=dict)


def _order_desc(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``values`` `[K]` descending; ties keep candidate order (deterministic)."""
    return torch.sort(values, descending=True, stable=True).indices


def select_anchors(scores: torch.Tensor, num_anchors: int, *, binary_threshold: float | None = None) -> Selection:
    """Disjoint top-M positives and bottom-M negatives per prompt from ranking scores `[B, K]`.

    Steps:

    1. Drop NaN (missing) candidates; a prompt with fewer than 2M valid candidates is skipped.
    2. Continuous rewards: sort descending (ties by candidate index); a group whose valid scores
       are all equal carries no ranking signal and is skipped.
    3. Binary rewards (``binary_threshold`` set): positives are candidates with score ≥ threshold,
       negatives the others; a prompt needs at least M of each, else it is skipped. Within each
       class the higher score wins, ties by index.
    """
    B, K = scores.shape
    M = num_anchors
    if 2 * M > K:
        raise ValueError(f"2M={2 * M} anchors do not fit in K={K} candidates; top-M and bottom-M must be disjoint")
    pos_idx = torch.full((B, M), -1, dtype=torch.long)
    neg_idx = torch.full((B, M), -1, dtype=torch.long)
    keep = torch.zeros(B, dtype=torch.bool)
    skipped: dict[str, int] = {}

    def skip(reason: str) -> None:
        skipped[reason] = skipped.get(reason, 0) + 1

    for b in range(B):
        row = scores[b].float().cpu()
        valid = torch.nonzero(~torch.isnan(row)).flatten()
        if valid.numel() < 2 * M:
            skip(SKIP_TOO_FEW_VALID)
            continue
        values = row[valid]
        if binary_threshold is None:
            if bool((values == values[0]).all()):
                skip(SKIP_CONSTANT)
                continue
            order = valid[_order_desc(values)]
            pos_idx[b], neg_idx[b] = order[:M], order[-M:].flip(0)
        else:
            passed = values >= binary_threshold
            if int(passed.sum()) < M:
                skip(SKIP_TOO_FEW_POSITIVES)
                continue
            if int((~passed).sum()) < M:
                skip(SKIP_TOO_FEW_NEGATIVES)
                continue
            winners, losers = valid[passed], valid[~passed]
            pos_idx[b] = winners[_order_desc(row[winners])][:M]
            neg_idx[b] = losers[_order_desc(-row[losers])][:M]
        keep[b] = True
    return Selection(pos_idx=pos_idx, neg_idx=neg_idx, keep=keep, skipped=skipped)

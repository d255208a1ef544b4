"""Reward-weighted drifts of the official head (``src/drpo/drift.py``, ``--drifting_objective drpo-awr*``).

Instead of hard top-M / bottom-M anchors, candidates act as anchors with advantage-weighted-regression
weights softmax(score / α). Four variants (``algo.kind``):

* ``drpo-awr`` (``reward_kernel_drift_loss``): per point x, force = reward-weighted kernel mean over
  the batch − x + kernel mean over the frozen base's points − plain kernel mean over the batch.
* ``drpo-awr-topk`` (``reward_topk_contrastive_kernel_drift_loss``): soft positives = the top
  ⌈K·f⌉ candidates weighted by softmax(s/α), soft negatives = the bottom ⌈K·f⌉ by softmax(−s/α);
  force = positive mean − x + base mean − negative mean, scaled by ``force_scale``.
* ``drpo-awr-hard`` (``reward_topk_weighted_binary_drift_loss``): the DrPO dipole field
  (:func:`drpo_core.algorithms.drift.drift_field`) on the same top / bottom sets with per-anchor
  weights w⁺·n⁺·softmax(s/α) and w⁻·n⁻·softmax(−s/α) (mean weight w⁺, w⁻ as in DrPO).
* ``drpo-awr-advsign`` (``reward_advantage_sign_weighted_binary_drift_loss``): the dipole field with
  every candidate an anchor: above-mean candidates positive, below-mean negative, each side weighted
  by the softmax of ±advantage/α within its side.

Shapes: ``gen`` `[K, L, D]` (K candidates, L patch vectors, with grad), ``ref`` `[K, L, D]` frozen-base
features for the same noises, ``scores`` `[K]`. As in :mod:`drpo_core.algorithms.loss` the K·L patch
vectors form one point set; each patch carries its candidate's score (the official code, which has
L = 1 per key on this path, is the special case). The loss is mean (x/σ − sg(x̄/σ + F))², σ detached.
"""

from __future__ import annotations

import math

import torch

from drpo_core.algorithms.drift import Kernel, _logits, drift_field
from drpo_core.training.precision import full_precision

_RMS_FLOOR = 1e-8  # the official code clamps the squared RMS at 1e-8


def _awr_logits(scores: torch.Tensor, alpha: float, clip: float) -> torch.Tensor:
    """score/α − max, clipped to ±clip (clip 0 = none)."""
    logits = scores / alpha
    logits = logits - logits.max()
    return logits.clamp(-clip, clip) if clip > 0 else logits


def _points(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().reshape(-1, x.shape[-1])


def _point_scores(scores: torch.Tensor, patches: int) -> torch.Tensor:
    return scores.detach().float().repeat_interleave(patches)


def _pairwise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T).clamp_min(1e-8).sqrt()


def _regress(gen: torch.Tensor, force: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    x = gen.float().reshape(-1, gen.shape[-1])
    goal = (x.detach() / sigma + force).detach()
    return (x / sigma - goal).pow(2).mean()


def _check(gen: torch.Tensor, ref: torch.Tensor | None, scores: torch.Tensor) -> None:
    if gen.ndim != 3 or (ref is not None and ref.shape != gen.shape):
        raise ValueError(f"gen and ref must both be [K, L, D], got {tuple(gen.shape)} and {None if ref is None else tuple(ref.shape)}")
    if scores.shape != (gen.shape[0],):
        raise ValueError(f"scores must be [K={gen.shape[0]}], got {tuple(scores.shape)}")


def _kernel_scale(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """s = mean distance from the batch to [batch; base] (clamped 1e-3), σ = max(s/√D, 1e-3)."""
    s = _pairwise(x, torch.cat([x, r])).mean().clamp_min(1e-3)
    return s, (s / math.sqrt(x.shape[1])).clamp_min(1e-3)


@full_precision  # the drifts are computed in fp32 whatever the autocast (drift.py)
def awr_kernel_drift_loss(gen, ref, scores, *, alpha: float = 1.0, radii=(0.02, 0.05, 0.2), kernel: Kernel = "laplacian",
                          logit_clip: float = 20.0) -> tuple[torch.Tensor, dict[str, float]]:
    """``drpo-awr``. Steps:

    1. Points x `[N, D]` (N = K·L), base points r `[N, D]`, point scores; s, σ from x vs [x; r].
    2. Reward logits ρ_m = clip(s_m/α − max s/α).
    3. Per radius: A^R = softmax_m(k(x_n, x_m) + ρ_m), A^G = softmax_m k(x_n, x_m), A^B = softmax_m k(x_n, r_m);
       F_r = A^R x/σ − x/σ + A^B r/σ − A^G x/σ, RMS-normalised; F = Σ_r F_r.
    4. Regress onto sg(x/σ + F).
    """
    _check(gen, ref, scores)
    x, r = _points(gen), _points(ref)  # 1.
    scale, sigma = _kernel_scale(x, r)
    rho = _awr_logits(_point_scores(scores, gen.shape[1]), alpha, logit_clip)  # 2.
    xs, rs = x / sigma, r / sigma
    d_xx, d_xr = _pairwise(x, x), _pairwise(x, r)
    force = torch.zeros_like(xs)
    for radius in radii:  # 3.
        k_xx, k_xr = _logits(d_xx, x, x, scale, radius, kernel), _logits(d_xr, x, r, scale, radius, kernel)
        f = (k_xx + rho[None]).softmax(1) @ xs - xs + k_xr.softmax(1) @ rs - k_xx.softmax(1) @ xs
        force = force + f / f.pow(2).mean().clamp_min(_RMS_FLOOR).sqrt()
    probs = rho.softmax(0)
    return _regress(gen, force, sigma), {"awr/effective_count": float(1 / probs.pow(2).sum()) / gen.shape[1],
                                         "scale": float(scale)}


def _top_bottom(scores: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the top and bottom ⌈K·f⌉ candidates (ties by index)."""
    K = scores.shape[0]
    n = max(1, min(K, math.ceil(K * fraction)))
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices
    return order[:n], order.flip(0)[:n]


@full_precision
def awr_topk_drift_loss(gen, ref, scores, *, alpha: float = 1.0, radii=(0.02, 0.05, 0.2), kernel: Kernel = "laplacian",
                        logit_clip: float = 20.0, top_fraction: float = 0.5, force_scale: float = 1.0):
    """``drpo-awr-topk``. Steps:

    1. Top / bottom ⌈K·f⌉ candidates T, B; their points and point scores; s, σ from x vs [x; r].
    2. ρ⁺ = clip(s_T/α − max), ρ⁻ = clip(−s_B/α − max).
    3. Per radius: F_r = softmax(k(x, T) + ρ⁺) T/σ − x/σ + softmax k(x, r) r/σ − softmax(k(x, B) + ρ⁻) B/σ,
       RMS-normalised and times ``force_scale``; F = Σ_r F_r.
    4. Regress onto sg(x/σ + F).
    """
    _check(gen, ref, scores)
    L = gen.shape[1]
    x, r = _points(gen), _points(ref)
    scale, sigma = _kernel_scale(x, r)
    top, bottom = _top_bottom(scores, top_fraction)  # 1.
    t, b = _points(gen[top]), _points(gen[bottom])
    rho_pos = _awr_logits(_point_scores(scores[top], L), alpha, logit_clip)  # 2.
    rho_neg = _awr_logits(-_point_scores(scores[bottom], L), alpha, logit_clip)
    xs, rs, ts, bs = x / sigma, r / sigma, t / sigma, b / sigma
    d_xt, d_xb, d_xr = _pairwise(x, t), _pairwise(x, b), _pairwise(x, r)
    force = torch.zeros_like(xs)
    for radius in radii:  # 3.
        pos = (_logits(d_xt, x, t, scale, radius, kernel) + rho_pos[None]).softmax(1) @ ts
        neg = (_logits(d_xb, x, b, scale, radius, kernel) + rho_neg[None]).softmax(1) @ bs
        base = _logits(d_xr, x, r, scale, radius, kernel).softmax(1) @ rs
        f = pos - xs + base - neg
        force = force + force_scale * f / f.pow(2).mean().clamp_min(_RMS_FLOOR).sqrt()
    return _regress(gen, force, sigma), {"awr/top_count": float(top.numel()), "scale": float(scale)}


@full_precision
def awr_hard_drift_loss(gen, scores, *, alpha: float = 1.0, pos_weight: float = 3000.0, neg_weight: float = 3000.0,
                        radii=(0.02, 0.05, 0.2), kernel: Kernel = "laplacian", logit_clip: float = 20.0,
                        top_fraction: float = 0.5):
    """``drpo-awr-hard``. Steps:

    1. Top / bottom ⌈K·f⌉ candidates as positive / negative anchor points (detached).
    2. Per-point weights w⁺ n⁺ softmax(ρ⁺), w⁻ n⁻ softmax(ρ⁻) (n = number of points of each set).
    3. The DrPO dipole field with these column weights; regress onto sg(x/σ + V).
    """
    _check(gen, None, scores)
    L = gen.shape[1]
    top, bottom = _top_bottom(scores, top_fraction)  # 1.
    pos, neg = _points(gen[top]), _points(gen[bottom])
    p_pos = _awr_logits(_point_scores(scores[top], L), alpha, logit_clip).softmax(0)  # 2.
    p_neg = _awr_logits(-_point_scores(scores[bottom], L), alpha, logit_clip).softmax(0)
    field = drift_field(gen.reshape(-1, gen.shape[-1]), pos, neg, pos_weight=pos_weight * pos.shape[0] * p_pos,
                        neg_weight=neg_weight * neg.shape[0] * p_neg, radii=tuple(radii), kernel=kernel)  # 3.
    return _regress(gen, field.V, field.sigma), {"awr/hard_anchors": float(top.numel()), "scale": float(field.scale)}


@full_precision
def awr_advsign_drift_loss(gen, scores, *, alpha: float = 1.0, pos_weight: float = 3000.0, neg_weight: float = 3000.0,
                           radii=(0.02, 0.05, 0.2), kernel: Kernel = "laplacian", logit_clip: float = 20.0):
    """``drpo-awr-advsign``. Steps:

    1. Advantage A_k = s_k − mean s; positives A > 0, negatives A < 0 (if a side is empty: the argmax /
       argmin candidate alone).
    2. Weights within each side: w⁺ n⁺ softmax(clip(A/α)), w⁻ n⁻ softmax(clip(−A/α)), zero off-side,
       n± = number of the side's candidates; every patch of a candidate carries its weight.
    3. The DrPO dipole field with every candidate point as both a positive and a negative column
       (off-side weight 0); regress onto sg(x/σ + V).
    """
    _check(gen, None, scores)
    L = gen.shape[1]
    s = scores.detach().float()
    adv = s - s.mean()  # 1.
    pos_mask, neg_mask = adv > 0, adv < 0
    if not pos_mask.any():
        pos_mask = torch.zeros_like(pos_mask); pos_mask[s.argmax()] = True
    if not neg_mask.any():
        neg_mask = torch.zeros_like(neg_mask); neg_mask[s.argmin()] = True

    def side(logits: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:  # 2.
        logits = logits.clamp(-logit_clip, logit_clip) if logit_clip > 0 else logits
        probs = logits.masked_fill(~mask, float("-inf")).softmax(0).masked_fill(~mask, 0.0)
        return (weight * mask.sum() * probs).repeat_interleave(L)

    w_pos, w_neg = side(adv / alpha, pos_mask, pos_weight), side(-adv / alpha, neg_mask, neg_weight)
    points = gen.reshape(-1, gen.shape[-1])
    field = drift_field(points, points.detach(), points.detach(), pos_weight=w_pos, neg_weight=w_neg,
                        radii=tuple(radii), kernel=kernel)  # 3.
    return _regress(gen, field.V, field.sigma), {"awr/positives": float(pos_mask.sum()), "scale": float(field.scale)}

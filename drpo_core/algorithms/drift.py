"""Drift field and drift regression loss (DrPO §1.6.1, Drifting Models Algorithm 2).

Notation (paper → code)::

    x_i  (generated feature, with grad)   → ``gen``        `[N, D]`
    x̄_i  (its detached copy)               → ``gen_bar``    `[N, D]`
    A⁺   (positive anchors)                → ``pos``        `[P, D]`
    A⁻   (negative anchors)                → ``neg``        `[Q, D]`
    w⁺, w⁻ (anchor column weights, "η")   → ``pos_weight``, ``neg_weight``
    r    (kernel radius / temperature τ)   → ``radii``
    s, σ (feature scale)                   → ``scale``, ``sigma``
    V    (drift, in scaled coordinates)    → ``V``          `[N, D]`

The default (``field_form="mean_shift"``) is what the official code computes: a joint row/column
softmax-normalised mean shift with weighted columns and per-radius RMS normalisation, so the
paper's step size η has no literal counterpart (the 3000 enters as column weights). The paper's
literal dipole-energy gradient (``field_form="kernel_gradient"``) is kept selectable; see
docs/paper_map.md for the differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from drpo_core.training.precision import full_precision

Kernel = Literal["laplacian", "rbf", "cosine"]
FieldForm = Literal["mean_shift", "kernel_gradient"]

_SELF_MASK = 100.0  # logit penalty (÷ r) that removes a point's coupling with itself
_SQ_DIST_FLOOR = 1e-8
_SCALE_FLOOR = 1e-3
_AFFINITY_FLOOR = 1e-6
_RMS_FLOOR = 1e-12


@dataclass(frozen=True)
class DriftField:
    """Result of :func:`drift_field`.

    Attributes:
        V: drift in scaled coordinates `[N, D]` (fp32, detached).
        sigma: per-coordinate scale σ (scalar tensor); scaled points are ``x / sigma``.
        scale: mean weighted distance s (scalar tensor).
    """

    V: torch.Tensor
    sigma: torch.Tensor
    scale: torch.Tensor


def _logits(dist: torch.Tensor, gen_bar: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
            radius: float, kernel: Kernel) -> torch.Tensor:
    if kernel == "laplacian":
        return -dist / (scale * radius)
    if kernel == "rbf":
        return -0.5 * (dist / (scale * radius)) ** 2
    if kernel == "cosine":
        cos = torch.nn.functional.normalize(gen_bar, dim=1) @ torch.nn.functional.normalize(targets, dim=1).T
        return cos / radius
    raise ValueError(f"unknown kernel {kernel!r}; expected laplacian, rbf or cosine")


@full_precision  # autocast off: a bf16 matmul in ‖a‖² + ‖b‖² − 2a·b erases the distances between nearby features
@torch.no_grad()
def drift_field(
    gen: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor,
    *,
    pos_weight: float | torch.Tensor = 3000.0,
    neg_weight: float | torch.Tensor = 3000.0,
    self_weight: float = 1.0,
    radii: tuple[float, ...] = (0.02, 0.05, 0.2),
    kernel: Kernel = "laplacian",
    mask_negative_self: bool = False,
    field_form: FieldForm = "mean_shift",
) -> DriftField:
    """Drift V for the generated points ``gen`` `[N, D]` toward ``pos`` `[P, D]`, away from ``neg`` `[Q, D]`.

    Steps (official code, drpo-method.md §1.6.1):

    1. Targets ``T = [x̄ ; A⁻ ; A⁺]`` with column weights ``w = [self_weight·1_N ; w⁻ ; w⁺]``. The
       generated batch itself is a negative block (``self_weight=0`` removes it).
    2. Distances ``d_ij = ‖x̄_i − t_j‖`` in fp32 (squared distance floored at 1e-8).
    3. Scale ``s = mean_ij(d_ij w_j) / mean_j(w_j)``, ``σ = max(s/√D, 1e-3)`` so that ``x/σ`` has
       mean pairwise distance ≈ √D.
    4. For each radius r: kernel logits, self-mask, joint row/column softmax
       ``Â = sqrt(softmax_j · softmax_i) · w_j``, masses ``P_i = Σ_{A⁺} Â``, ``N_i = Σ_{x̄,A⁻} Â``,
       force ``F = N_i Σ_{A⁺} Â (t−x̄)/σ − P_i Σ_{x̄,A⁻} Â (t−x̄)/σ``, RMS-normalised.
    5. ``V = Σ_r F̂(r)``.

    ``pos_weight`` / ``neg_weight`` are one weight for every anchor or a per-anchor tensor `[P]` / `[Q]`
    (the reward-weighted variants, :mod:`drpo_core.algorithms.weighted_drift`).

    With ``mask_negative_self`` the negatives must be ``x̄`` itself (reference drift, §1.6.2) and the
    diagonal of that block is masked too.
    """
    if gen.ndim != 2 or pos.ndim != 2 or neg.ndim != 2:
        raise ValueError(f"expected 2-D point sets, got gen {tuple(gen.shape)}, pos {tuple(pos.shape)}, neg {tuple(neg.shape)}")
    N, D = gen.shape
    if pos.shape[1] != D or neg.shape[1] != D:
        raise ValueError(f"feature dims differ: gen has D={D}, pos D={pos.shape[1]}, neg D={neg.shape[1]}")
    if mask_negative_self and neg.shape[0] != N:
        raise ValueError(f"mask_negative_self needs neg to be the generated set (Q={neg.shape[0]} != N={N})")
    if not radii:
        raise ValueError("radii must hold at least one radius")

    # 1. targets and column weights
    gen_bar = gen.detach().float()
    pos, neg = pos.detach().float(), neg.detach().float()
    blocks = [neg, pos]
    weights = [_column_weights(neg_weight, neg.shape[0], gen_bar), _column_weights(pos_weight, pos.shape[0], gen_bar)]
    if self_weight > 0:
        blocks.insert(0, gen_bar)
        weights.insert(0, gen_bar.new_full((N,), self_weight))
    targets = torch.cat(blocks)  # [T, D]
    w = torch.cat(weights)  # [T]
    n_self = N if self_weight > 0 else 0
    n_neg_block = n_self + neg.shape[0]  # columns [0, n_neg_block) repel, the rest attract

    # 2. distances [N, T]
    sq = (gen_bar.pow(2).sum(1, keepdim=True) + targets.pow(2).sum(1)[None] - 2 * gen_bar @ targets.T)
    dist = sq.clamp_min(_SQ_DIST_FLOOR).sqrt()

    # 3. feature scale
    scale = ((dist * w[None]).mean() / w.mean()).clamp_min(_SCALE_FLOOR)
    sigma = (scale / math.sqrt(D)).clamp_min(_SCALE_FLOOR)
    targets_scaled, gen_scaled = targets / sigma, gen_bar / sigma
    signs = torch.cat([-torch.ones(n_neg_block), torch.ones(targets.shape[0] - n_neg_block)]).to(w)

    V = torch.zeros_like(gen_bar)
    eye = torch.eye(N, dtype=torch.bool, device=gen_bar.device)
    for radius in radii:
        # 4a. kernel logits with self-masking
        logits = _logits(dist, gen_bar, targets, scale, radius, kernel)
        if n_self:
            logits[:, :N] -= eye * (_SELF_MASK / radius)
        if mask_negative_self:
            logits[:, n_self:n_self + N] -= eye * (_SELF_MASK / radius)

        if field_form == "mean_shift":
            # 4b. joint normalisation (Drifting Algorithm 2); weights multiply after the softmax product
            affinity = (logits.softmax(dim=1) * logits.softmax(dim=0)).clamp_min(_AFFINITY_FLOOR).sqrt() * w[None]
            a_neg, a_pos = affinity[:, :n_neg_block], affinity[:, n_neg_block:]
            mass_pos = a_pos.sum(1, keepdim=True)  # P_i  [N, 1]
            mass_neg = a_neg.sum(1, keepdim=True)  # N_i  [N, 1]
            # N_i Σ⁺ Â (t − x̄) − P_i Σ⁻ Â (t − x̄): the x̄ terms cancel, leaving weighted target means
            force = mass_neg * (a_pos @ targets_scaled[n_neg_block:]) - mass_pos * (a_neg @ targets_scaled[:n_neg_block])
        elif field_form == "kernel_gradient":
            # Paper form: V = Σ_j ±w_j ∇_x k(x, t_j), with ∇_x k = k · ∇_x logit
            coeff = logits.exp() * w[None] * signs[None] * _logit_gradient_coefficient(dist / sigma, kernel, scale / sigma * radius)
            force = coeff @ targets_scaled - coeff.sum(1, keepdim=True) * gen_scaled
        else:
            raise ValueError(f"unknown field_form {field_form!r}")

        # 4c. per-radius drift normalisation: RMS over all points and dims = 1 (an exactly-zero force stays 0)
        V += force / force.pow(2).mean().sqrt().clamp_min(_RMS_FLOOR)

    # 5. V is the sum over radii
    return DriftField(V=V, sigma=sigma, scale=scale)


def _column_weights(value: float | torch.Tensor, count: int, like: torch.Tensor) -> torch.Tensor:
    """Anchor column weights `[count]`: a scalar broadcast, or a per-anchor tensor checked for its length."""
    if isinstance(value, torch.Tensor):
        if value.shape != (count,):
            raise ValueError(f"per-anchor weights must have shape ({count},), got {tuple(value.shape)}")
        return value.detach().to(like)
    return like.new_full((count,), float(value))


def _logit_gradient_coefficient(dist_scaled: torch.Tensor, kernel: Kernel, tau: torch.Tensor) -> torch.Tensor:
    """c_ij with ∂logit_ij/∂x̄_i = c_ij (t_j − x̄_i) in scaled coordinates, `[N, T]` (kernel_gradient only)."""
    if kernel == "laplacian":  # logit = −‖t−x‖/τ  →  (t−x)/(τ‖t−x‖)
        return 1.0 / (tau * dist_scaled.clamp_min(1e-6))
    if kernel == "rbf":  # logit = −½‖t−x‖²/τ²  →  (t−x)/τ²
        return torch.full_like(dist_scaled, 1.0) / tau**2
    raise ValueError("field_form='kernel_gradient' supports the laplacian and rbf kernels")


@full_precision
def drift_loss(gen: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, **field_kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """Regression of scaled features onto the detached drifted target (DrPO Eq. L_DrPO).

    ``goal = sg(x̄/σ + V)``, ``loss = mean_{i,d} (x/σ − goal)²``; the value equals ``mean V²``.
    Gradients flow only through ``gen`` `[N, D]`; σ is detached.

    Returns the scalar loss and stats (``drift_norm`` = RMS of V, ``scale`` = s).
    """
    field = drift_field(gen, pos, neg, **field_kwargs)
    scaled = gen.float() / field.sigma
    goal = (gen.detach().float() / field.sigma + field.V).detach()
    loss = (scaled - goal).pow(2).mean()
    stats = {"drift_norm": float(field.V.pow(2).mean().sqrt()), "scale": float(field.scale)}
    return loss, stats

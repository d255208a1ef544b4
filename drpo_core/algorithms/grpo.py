"""One-step Neighbor-GRPO (He et al., arXiv 2511.16955), as in the official ``baselines/grpo``.

A one-step generator has no stochastic trajectory, so the policy is a surrogate: the K candidates of a
prompt share a base noise (they are neighbours), and a trainable *anchor* output defines a softmax
over the candidates by latent distance. Notation (official code → here)::

    ε_i = √(1−σ²) ε_base + σ δ_i                    → :func:`neighbor_noise` (drpo_core.algorithms.neighbor_noise)
    x_k^old   (candidate latents, rollout)          → ``candidates``       `[K, D]` detached
    a_j = G_θ(ε_{a_j}, c)  (A anchors, with grad)   → ``current_anchors``  `[A, D]`
    a_j^old   (the same anchors at rollout)         → ``old_anchors``      `[A, D]`
    π(k | a) = softmax_k(−mean_d (x_k − a)² / T)
    Â_k = clip(√K (r_k − r̄) / ‖r − r̄‖_p · scale, ±c)  → :func:`quasi_norm_advantages`
    L = −mean_{j,k} min(ρ_jk Â_k, clip(ρ_jk, 1±ε) Â_k),  ρ_jk = π_θ(k | a_j) / π_old(k | a_j^old)
"""

from __future__ import annotations

import math

import torch

from drpo_core.algorithms.neighbor_noise import neighbor_noise

__all__ = ["neighbor_noise", "quasi_norm_advantages", "neighbor_grpo_loss"]


def quasi_norm_advantages(rewards: torch.Tensor, p: float = 0.8, clip: float = 5.0, scale: float = 1.0,
                          eps: float = 1e-6) -> torch.Tensor:
    """Group advantages `[K] → [K]`.

    Steps:
        1. Centre: c = r − mean(r).
        2. Quasi-norm ‖c‖_p = (Σ |c_k|^p)^{1/p}; a (near) constant group gives zeros.
        3. Â = √K · c / ‖c‖_p · scale, clipped to ±clip (clip 0 = none).
    """
    if rewards.ndim != 1 or rewards.numel() < 2:
        raise ValueError(f"rewards must be [K] with K >= 2, got {tuple(rewards.shape)}")
    c = rewards.float() - rewards.float().mean()  # 1.
    norm = c.abs().pow(p).sum().pow(1.0 / p)  # 2.
    if norm <= eps:
        return torch.zeros_like(c)
    adv = math.sqrt(rewards.numel()) * c / norm * scale  # 3.
    return adv.clamp(-clip, clip) if clip > 0 else adv


def neighbor_grpo_loss(candidates: torch.Tensor, current_anchors: torch.Tensor, old_anchors: torch.Tensor,
                       advantages: torch.Tensor, *, clip_range: float = 0.2, max_log_ratio: float = 10.0,
                       temperature: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate of one prompt group (shapes in the module docstring).

    Steps:
        1. Distances d_jk = mean_d (x_k − a_j)² for the current and the old anchors `[A, K]`.
        2. log π_θ(k | a_j) = log_softmax_k(−d_jk / T); the old one detached.
        3. ρ = exp(clamp(log π_θ − log π_old, ±max_log_ratio)).
        4. L = −mean_{j,k} min(ρ Â_k, clip(ρ, 1−ε, 1+ε) Â_k).
    """
    K = candidates.shape[0]
    if advantages.shape != (K,):
        raise ValueError(f"advantages must be [K={K}], got {tuple(advantages.shape)}")
    x = candidates.detach().float().reshape(K, -1)
    cur = current_anchors.float().reshape(current_anchors.shape[0], -1)
    old = old_anchors.detach().float().reshape(old_anchors.shape[0], -1)
    d_cur = (x[None] - cur[:, None]).pow(2).mean(-1)  # 1. [A, K]
    d_old = (x[None] - old[:, None]).pow(2).mean(-1)
    logp = torch.log_softmax(-d_cur / temperature, dim=1)  # 2.
    logp_old = torch.log_softmax(-d_old / temperature, dim=1).detach()
    log_ratio = (logp - logp_old).clamp(-max_log_ratio, max_log_ratio)  # 3.
    ratio = log_ratio.exp()
    adv = advantages.detach().float().to(ratio.device)[None]
    clipped = ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = -torch.minimum(ratio * adv, clipped * adv).mean()  # 4.
    stats = {"grpo/ratio_mean": float(ratio.detach().mean()),
             "grpo/clipfrac": float((ratio.detach() != clipped.detach()).float().mean()),
             "grpo/approx_kl": float((ratio - 1 - log_ratio).detach().mean())}
    return loss, stats

"""RAFT / best-of-K regression for a one-step generator (reward-ranked fine-tuning, Dong et al. 2023).

RAFT keeps the best of K samples and maximises their likelihood. A one-step generator has no
likelihood, so this uses the same latent pseudo log-probability as the DPO baseline
(:func:`drpo_core.algorithms.dpo.pseudo_log_prob`) with only the chosen term and no reference::

    L_c = −log p̃_θ(A⁺) = mean_{i,j} mean_d (G_θ(ε_i, c) − a⁺_j)²   (+ λ_L2 · mse(x, x^base))

over all K noises ε_i and the top-M candidates a⁺_j (detached). Regressing a top candidate onto its own
noise alone would give no gradient on-policy (x_j = a⁺_j), hence all K noises. It pulls every sample
toward the centroid of the best ones: the mode-seeking baseline DrPO's repulsion and reference drift guard against.
"""

from __future__ import annotations

import torch

from drpo_core.algorithms.dpo import pseudo_log_prob


def raft_loss(policy: torch.Tensor, best: torch.Tensor, reference: torch.Tensor | None = None,
              ref_l2_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one prompt group: ``policy`` `[K, D]` with grad, ``best`` `[M, D]` top-M latents (detached).

    Steps:
        1. L_fit = −log p̃_θ(A⁺).
        2. L = L_fit + λ_L2 · mse(policy, reference).
    """
    fit = -pseudo_log_prob(policy, best.detach())  # 1.
    loss, stats = fit, {"raft/fit": float(fit.detach())}
    if ref_l2_weight > 0:  # 2.
        if reference is None:
            raise ValueError("raft.ref_l2_weight > 0 needs the frozen base's latents")
        l2 = (policy.float() - reference.detach().float()).pow(2).mean()
        loss = loss + ref_l2_weight * l2
        stats["raft/ref_l2"] = float(l2.detach())
    return loss, stats

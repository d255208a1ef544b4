"""One-step online DPO with a latent pseudo log-probability (the official ``baselines/dpo`` recipe).

Notation (official code → here)::

    policy_latents x_i = G_θ(ε_i, c)     → ``policy``     `[K, D]` (with grad; D = C·h·w)
    ref_latents    x_i^ref = G_base(ε_i)  → ``reference``  `[K, D]` (detached; the LoRA switched off)
    chosen / rejected targets             → ``chosen`` `[P, D]`, ``rejected`` `[Q, D]`: detached
                                            top-M / bottom-M candidates by reward
    log p̃(y | x) = −mean_{i,j} mean_d (x_i − y_j)²   (``pairwise_preference_score``, metric l2)

    logit = β [(log p̃_θ(A⁺) − log p̃_θ(A⁻)) − (log p̃_ref(A⁺) − log p̃_ref(A⁻))]
    L_c   = −log σ(logit)   (+ λ_L2 · mse(x, x^ref))

One logit per prompt: the pseudo log-probability averages over all K noises and all anchors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pseudo_log_prob(gen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p̃ = −mean_{i,j} mean_d (gen_i − targets_j)², `[N, D] × [P, D] → []` (fp32)."""
    diff = gen.float()[:, None, :] - targets.float()[None, :, :]
    return -diff.pow(2).mean()


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor | None, chosen: torch.Tensor, rejected: torch.Tensor, *,
             beta: float, reference_free: bool = False, ref_l2_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one prompt group (shapes above; ``reference`` may be None only when reference-free without L2).

    Steps:
        1. Policy gap g_θ = log p̃_θ(A⁺) − log p̃_θ(A⁻).
        2. Reference gap g_ref on the frozen base's latents for the same noises (0 if reference-free).
        3. logit = β (g_θ − g_ref); L = −log σ(logit) + λ_L2 · mse(policy, reference).
    """
    chosen, rejected = chosen.detach(), rejected.detach()
    gap = pseudo_log_prob(policy, chosen) - pseudo_log_prob(policy, rejected)  # 1.
    if reference_free:
        ref_gap = torch.zeros((), device=gap.device)
    else:
        if reference is None:
            raise ValueError("DPO needs the frozen base's latents (or dpo.reference_free)")
        ref = reference.detach()
        ref_gap = pseudo_log_prob(ref, chosen) - pseudo_log_prob(ref, rejected)  # 2.
    logit = beta * (gap - ref_gap)  # 3.
    loss = -F.logsigmoid(logit)
    stats = {"dpo/logit": float(logit.detach()), "dpo/policy_gap": float(gap.detach()), "dpo/ref_gap": float(ref_gap)}
    if ref_l2_weight > 0:
        l2 = (policy.float() - reference.detach().float()).pow(2).mean()
        loss = loss + ref_l2_weight * l2
        stats["dpo/ref_l2"] = float(l2.detach())
    return loss, stats

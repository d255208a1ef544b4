"""DRaFT-1 for a one-step generator: the reward's gradient through the VAE decode (Clark et al. 2023).

Official baseline (UGVly/DrPO ``baselines/draft/train_lora.py``), per prompt with K candidates::

    x_i   = G_θ(ε_i, c)                         policy latents, with grad        `[K, C, h, w]`
    I_i   = D(x_i)                              differentiable VAE decode       `[K, 3, H, W]`
    L_c   = −Σ_r w_r · mean_i R_r(I_i, c)  +  λ_L2 · mean (x_i − x_i^base)²

The reward model is differentiated (this is what DrPO avoids); with several rewards their raw scores
are weighted (a z-score has no useful gradient). Only the arithmetic lives here; the decode and the
reward calls are the caller's.
"""

from __future__ import annotations

import torch


def draft_loss(scores: dict[str, torch.Tensor], weights: dict[str, float], policy: torch.Tensor | None = None,
               reference: torch.Tensor | None = None, ref_l2_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one prompt group.

    Args:
        scores: reward label → differentiable scores `[K]` of the decoded policy samples.
        weights: reward label → w_r.
        policy / reference: policy latents with grad and detached frozen-base latents `[K, ...]`, used
            only when ``ref_l2_weight`` > 0.

    Steps:
        1. R̄_r = mean_i R_r (a NaN score is an error: it would poison the gradient).
        2. L_reward = −Σ_r w_r R̄_r.
        3. L = L_reward + λ_L2 · mse(policy, reference).
    """
    if not scores:
        raise ValueError("DRaFT needs at least one reward")
    loss_reward = torch.zeros(())
    stats: dict[str, float] = {}
    for label, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"reward {label!r} returned NaN for a DRaFT sample (its prompt names nothing it can score)")
        mean = s.float().mean()  # 1.
        loss_reward = loss_reward.to(mean.device) - weights[label] * mean  # 2.
        stats[f"draft/{label}/mean"] = float(mean.detach())
    loss = loss_reward
    if ref_l2_weight > 0:  # 3.
        if policy is None or reference is None:
            raise ValueError("ref_l2_weight > 0 needs the policy and frozen-base latents")
        l2 = (policy.float() - reference.detach().float()).pow(2).mean()
        loss = loss + ref_l2_weight * l2
        stats["draft/ref_l2"] = float(l2.detach())
    stats["loss/reward"] = float(loss_reward.detach())
    return loss, stats

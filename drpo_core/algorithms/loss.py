"""DrPO objective for one prompt group (algorithm lines 8–13, DrPO §1.6.1–1.6.3).

    L_c = Σ_keys L_pref,key + λ_ref Σ_keys L_ref,key + γ_feat Σ_keys MSE(φ_key(x), φ_key(x_base))

(Σ_keys is a mean over keys with ``key_aggregation: mean``, the official SDXL trainer's choice; the
learner adds β_l2·MSE(x, x_base) on the latents.)

L_pref regresses the K candidates' features onto sg(x/σ + V_pref) with V_pref the dipole field
(toward the top-M anchors A⁺, away from the bottom-M A⁻ and the batch itself); L_ref onto
sg(x/σ + V_ref) with V_ref the reference drift (toward the frozen base's features 𝓡, away from the
current features 𝓩). Patch vectors of all candidates of a key form one point set (the official code).
"""

from __future__ import annotations

import torch

from drpo_core.config import AlgoConfig
from drpo_core.algorithms.drift import drift_loss
from drpo_core.features.common import FeatureDict


def _points(x: torch.Tensor) -> torch.Tensor:
    """`[K, L, D] -> [K·L, D]`: pool the patch vectors of all candidates into one set."""
    return x.reshape(-1, x.shape[-1])


def drpo_group_loss(feats: FeatureDict, pos: FeatureDict, neg: FeatureDict, ref: FeatureDict | None,
                    cfg: AlgoConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one prompt group.

    Args:
        feats: current features with grad, ``key -> [K, L, D]``.
        pos / neg: detached features of the top-M / bottom-M candidates, ``key -> [M, L, D]``.
        ref: detached frozen-base features for the same noises, ``key -> [K, L, D]``, or None.
        cfg: radii, kernel, anchor weights, λ_ref, γ_feat and the key aggregation.
    """
    common = dict(radii=tuple(cfg.radii), kernel=cfg.kernel, field_form=cfg.field_form)
    loss_pref = loss_ref = loss_feat = torch.zeros((), device=next(iter(feats.values())).device)
    stats: dict[str, float] = {}
    for key, x in feats.items():
        gen = _points(x)
        part, s = drift_loss(gen, _points(pos[key]), _points(neg[key]), pos_weight=cfg.pos_weight,
                             neg_weight=cfg.neg_weight, **common)
        loss_pref = loss_pref + part
        stats[f"drift/{key}/pref_norm"] = s["drift_norm"]
        if ref is not None and cfg.lambda_ref > 0:
            part, s = drift_loss(gen, _points(ref[key]), gen.detach(), pos_weight=cfg.ref_weight,
                                 neg_weight=cfg.ref_neg_weight, mask_negative_self=True, **common)
            loss_ref = loss_ref + part
            stats[f"drift/{key}/ref_norm"] = s["drift_norm"]
        if ref is not None and cfg.feature_l2_weight > 0:
            loss_feat = loss_feat + (gen - _points(ref[key])).square().mean()
    if cfg.key_aggregation == "mean":
        loss_pref, loss_ref, loss_feat = (t / len(feats) for t in (loss_pref, loss_ref, loss_feat))
    loss = loss_pref + cfg.lambda_ref * loss_ref + cfg.feature_l2_weight * loss_feat
    stats.update({"loss/pref": float(loss_pref.detach()), "loss/ref": float(loss_ref.detach())})
    if cfg.feature_l2_weight > 0:
        stats["loss/feature_l2"] = float(loss_feat.detach())
    return loss, stats

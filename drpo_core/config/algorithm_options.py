"""Config sections of the objectives other than the default DrPO drift (hung under ``algo`` in schema.py).

``algo.kind`` picks the objective; everything else (generator, sampler, rewards, evaluation, runtime) is
shared, so a comparison differs only in the loss. Defaults follow the official baselines
(UGVly/DrPO ``scripts/train/{draft,dpo,grpo}.sh`` and ``src/drpo/methods/sdxl_drpo/trainer.py``);
learning rates stay in ``trainer.lr`` (the official scripts use 1e-5 for DRaFT/GRPO and 1e-4 for DPO
at real scale). See docs/baselines.md.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from drpo_core.config.sections import Section as _Section

AlgoKind = Literal["drpo", "drpo-awr", "drpo-awr-topk", "drpo-awr-hard", "drpo-awr-advsign", "draft", "dpo", "grpo", "raft"]
# kinds whose objective is a drift regression in feature space (they use the feature encoder φ)
DRIFT_KINDS = ("drpo", "drpo-awr", "drpo-awr-topk", "drpo-awr-hard", "drpo-awr-advsign")
# reward kinds whose scores are differentiable functions of the image tensor (DRaFT backpropagates them)
DIFFERENTIABLE_REWARD_KINDS = ("soft_hue",)




class DraftOptions(_Section):
    """DRaFT-1 (one-step): L = −Σ_r w_r · mean_i R_r(D(G_θ(ε_i, c))) + λ_L2 · mse(G_θ, G_base)."""

    ref_l2_weight: float = Field(0.0, ge=0, description="λ_L2, latent L2 to the frozen base (official default 0)")


class DpoOptions(_Section):
    """Online one-step DPO: top-M / bottom-M candidates as chosen / rejected, latent pseudo log-prob."""

    beta: float = Field(30.0, gt=0, description="β of the logistic loss (official dpo.sh: 30)")
    reference_free: bool = Field(False, description="drop the frozen base's margin (reference-free DPO)")
    ref_l2_weight: float = Field(0.0, ge=0, description="λ_L2, latent L2 to the frozen base (official default 0)")


class GrpoOptions(_Section):
    """Neighbor-GRPO (one step): correlated noises, softmax-over-distance surrogate policy, PPO clip."""

    neighbor_sigma: float = Field(0.3, gt=0, le=1, description="ε_i = √(1−σ²) ε_base + σ δ_i")
    num_anchors: int = Field(4, ge=1, description="trainable anchors per prompt (of the K candidates)")
    p_norm: float = Field(0.8, gt=0, le=2, description="quasi-norm p of the group advantages")
    temperature: float = Field(1.0, gt=0, description="distance temperature of the surrogate policy")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip")
    max_log_ratio: float = Field(10.0, gt=0)
    advantage_clip: float = Field(5.0, ge=0, description="0 = no clip")
    ref_l2_weight: float = Field(0.02, ge=0, description="latent L2 of the anchors to the frozen base (official 0.02)")


class RaftOptions(_Section):
    """RAFT / best-of-K regression: maximise the DPO baseline's pseudo log-likelihood of the top-M."""

    ref_l2_weight: float = Field(0.0, ge=0, description="latent L2 to the frozen base")


class AwrOptions(_Section):
    """Reward-weighted drifts of the official head (``--drifting_objective drpo-awr*``)."""

    alpha: float = Field(1.0, gt=0, description="anchor weights ∝ softmax(score / α) (drpo_awr_alpha)")
    logit_clip: float = Field(20.0, ge=0, description="clip of score/α after max-subtraction; 0 = none")
    top_fraction: float = Field(0.5, gt=0, le=1, description="drpo-awr-topk: fraction of candidates in each soft set")
    force_scale: float = Field(1.0, gt=0, description="drpo-awr-topk: multiplier of the RMS-normalised force")
    loss_weight: float = Field(1.0, gt=0)


class OfflineAnchorsOptions(_Section):
    """Anchors from a local preference dataset instead of online reward ranking (drpo-method.md §1.6.6).

    The file is JSON lines ``{"prompt": ..., "chosen": [paths], "rejected": [paths]}`` (a single path
    string is fine too); relative paths are relative to the file. Training prompts come from the file.
    """

    dataset: str | None = Field(None, description="jsonl of prompt + chosen/rejected image paths; None = online anchors")
    mode: Literal["images", "distance"] = Field(
        "images", description="images: the encoded chosen/rejected images are A⁺/A⁻; distance: rank the K "
        "candidates by d(rejected) − d(chosen) in feature space and use the top/bottom M")
    include_data_anchors: bool = Field(False, description="distance mode: add the data images to A⁺ / A⁻ too")

    @model_validator(mode="after")
    def _dataset_for_distance(self) -> "OfflineAnchorsOptions":
        if self.include_data_anchors and self.mode != "distance":
            raise ValueError("include_data_anchors is for mode 'distance'")
        return self

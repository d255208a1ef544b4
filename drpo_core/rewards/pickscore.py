"""PickScore: CLIP-H fine-tuned on Pick-a-Pic preferences (yuvalkirstain/PickScore_v1).

What it computes (the PickScore README / prior-art.md §3.3)::

    e_i = get_image_features(processor(image)) / ‖·‖     # [N, D]
    e_t = get_text_features(tokenize(prompt)) / ‖·‖      # [N, D]
    score = exp(logit_scale) · ⟨e_i, e_t⟩                 # ≈ 20–23 for typical images

The model folder (``path``) is PickScore_v1; its processor lives in a separate folder
(``processor_path``, laion/CLIP-ViT-H-14-laion2B-s32B-b79K) exactly as in the reference code.
flow_grpo divides the score by 26; DrPO ranks within a prompt group, where a constant factor changes
nothing, so the raw score is returned.
"""

from __future__ import annotations

import torch

from drpo_core.rewards.common import check_reward_inputs, unique_prompts
from drpo_core.rewards.hf_clip import HfClipEmbedder


class PickScoreReward:
    """``logit_scale · cos(image, prompt)`` with a transformers CLIPModel (see module docstring)."""

    model_id = "pickscore"

    def __init__(self, path: str, processor_path: str | None = None, version: str = "pickscore_v1",
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32):
        self.version = version
        self.clip = HfClipEmbedder(path, processor_path, kind="pickscore", device=device, dtype=dtype,
                                   batch_size=batch_size)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """`[N]` float32 scores on the CPU."""
        check_reward_inputs(images, prompts, metadata)
        texts, index = unique_prompts(prompts)
        text_emb = self.clip.embed_texts(texts)[index.to(self.clip.device)]  # [N, D]
        image_emb = self.clip.embed_images(images)  # [N, D]
        return (self.clip.logit_scale * (image_emb * text_emb).sum(-1)).float().cpu()

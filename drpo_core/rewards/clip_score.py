"""CLIP score: prompt–image agreement of a plain CLIP model (e.g. openai/clip-vit-large-patch14).

Definition used here (torchmetrics ``CLIPScore``)::

    score = scale · max(cos(e_image, e_text), 0)      scale = 100 by default

Hessel et al. (2021) define CLIPScore with scale 2.5 (``options.scale: 2.5`` gives that); both are the
same ranking. Which CLIP checkpoint produced a score matters (ViT-B/32 and ViT-L/14 scores are not
comparable), so ``version`` defaults to ``clip-score/<model folder name>``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from drpo_core.rewards.common import check_reward_inputs, unique_prompts
from drpo_core.rewards.hf_clip import HfClipEmbedder


class ClipScoreReward:
    """``scale · max(cos(image, prompt), 0)`` with a transformers CLIPModel from a local folder."""

    model_id = "clip-score"

    def __init__(self, path: str, processor_path: str | None = None, scale: float = 100.0, version: str | None = None,
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32):
        self.clip = HfClipEmbedder(path, processor_path, kind="clip", device=device, dtype=dtype, batch_size=batch_size)
        self.scale = float(scale)
        self.version = version or f"clip-score/{Path(path).expanduser().resolve().name}"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """`[N]` float32 scores in [0, scale] on the CPU."""
        check_reward_inputs(images, prompts, metadata)
        texts, index = unique_prompts(prompts)
        text_emb = self.clip.embed_texts(texts)[index.to(self.clip.device)]  # [N, D]
        image_emb = self.clip.embed_images(images)  # [N, D]
        return (self.scale * (image_emb * text_emb).sum(-1).clamp_min(0.0)).float().cpu()

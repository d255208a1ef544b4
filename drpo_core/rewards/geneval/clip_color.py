"""GenEval's colour classifier: CLIP zero-shot over the ten colours, one classifier per object class.

GenEval uses open_clip ViT-L-14 ``pretrained="openai"`` (= transformers ``openai/clip-vit-large-patch14``)
and clip_benchmark's ``zero_shot_classifier``: for each colour, embed the three templates below,
normalise, average, normalise again; a crop gets the colour with the largest cosine (×100 logits).
"""

from __future__ import annotations

from typing import Sequence

import torch

from drpo_core.rewards.hf_clip import HfClipEmbedder

GENEVAL_COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")


class ClipColorClassifier:
    """Zero-shot colour of object crops with a transformers CLIP model from a local folder."""

    def __init__(self, path: str, processor_path: str | None = None, device: str | None = None,
                 templates: Sequence[str] = GENEVAL_COLOR_TEMPLATES, batch_size: int = 16):
        self.clip = HfClipEmbedder(path, processor_path, kind="geneval", device=device, batch_size=batch_size,
                                   model_field="options.color_classifier_path",
                                   processor_field="options.color_processor_path")
        self.templates = tuple(templates)
        self._classifiers: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}

    def classifier(self, classname: str, colors: Sequence[str]) -> torch.Tensor:
        """`[C, D]` unit-norm class embeddings, one per colour (cached per object class)."""
        key = (classname, tuple(colors))
        if key not in self._classifiers:
            texts = [t.format(color=c, cls=classname) for c in colors for t in self.templates]
            emb = self.clip.embed_texts(texts).view(len(colors), len(self.templates), -1).mean(1)  # [C, D]
            self._classifiers[key] = emb / emb.norm(dim=-1, keepdim=True)
        return self._classifiers[key]

    def __call__(self, crops: list[torch.Tensor], classname: str, colors: Sequence[str]) -> list[str]:
        if not crops:
            return []
        logits = 100.0 * self.clip.embed_images(crops) @ self.classifier(classname, colors).T  # [n, C]
        return [colors[i] for i in logits.argmax(-1).tolist()]

"""A transformers ``CLIPModel`` read from local folders, producing unit-norm image and text embeddings.

Shared by PickScore, the CLIP score and GenEval's CLIP colour classifier. Preprocessing is the
checkpoint's own image processor (``preprocessor_config.json``: for CLIP-H/L, shortest side → 224
bicubic, centre crop 224, CLIP mean/std), fed float tensors in [0, 1] with ``do_rescale=False``, so the
only difference from the PIL path of the reference code is the missing 8-bit round trip.
"""

from __future__ import annotations

import torch

from drpo_core.rewards.common import autocast, micro_batches, require_local_path, resolve_device, resolve_dtype


def _pooled(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4.x and a ModelOutput (``pooler_output``) in 5.x."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HfClipEmbedder:
    """``CLIPModel`` + tokenizer + image processor from local folders (the hub is never contacted).

    ``model_path``: folder with ``config.json`` and weights. ``processor_path``: folder with the
    tokenizer and ``preprocessor_config.json`` (PickScore ships its processor separately, in
    laion/CLIP-ViT-H-14-laion2B-s32B-b79K); defaults to ``model_path``.
    """

    def __init__(self, model_path: str, processor_path: str | None = None, kind: str = "clip",
                 device: str | None = None, dtype: str | None = None, batch_size: int = 32,
                 model_field: str = "path", processor_field: str = "options.processor_path"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        model_dir = require_local_path(model_path, model_field, kind, want="dir")
        proc_dir = require_local_path(processor_path, processor_field, kind, want="dir") if processor_path else model_dir
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"reward {kind!r}: {model_field} {str(model_path)!r} has no config.json (not a saved CLIPModel)")
        for needed in ("preprocessor_config.json",):
            if not (proc_dir / needed).is_file():
                field = processor_field if processor_path else model_field
                raise ValueError(f"reward {kind!r}: {field} {str(proc_dir)!r} has no {needed} "
                                 "(point options.processor_path at the CLIP processor folder)")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype, kind)
        self.batch_size = batch_size
        try:
            self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(str(proc_dir), local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(str(proc_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward {kind!r}: cannot load CLIP from {str(model_dir)!r}: {str(e).splitlines()[0]}") from None
        self.model.to(self.device).eval().requires_grad_(False)
        self.max_length = min(int(self.model.config.text_config.max_position_embeddings), 77)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings `[T, D]` float32 (padding to the batch's longest text, truncation at 77)."""
        out = []
        for part in micro_batches(len(texts), self.batch_size):
            tokens = self.tokenizer(texts[part], padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            with autocast(self.device, self.dtype):
                emb = _pooled(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                           attention_mask=tokens["attention_mask"])).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Unit-norm image embeddings `[N, D]` float32 of `[N, 3, H, W]` (or a list of `[3, h, w]`) in [0, 1]."""
        items = list(images)
        out = []
        for part in micro_batches(len(items), self.batch_size):
            batch = [x.detach().float().clamp(0, 1).cpu() for x in items[part]]
            pixels = self.image_processor(images=batch, do_rescale=False, return_tensors="pt")["pixel_values"]
            with autocast(self.device, self.dtype):
                emb = _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device))).float()
            out.append(emb / emb.norm(dim=-1, keepdim=True))
        return torch.cat(out)

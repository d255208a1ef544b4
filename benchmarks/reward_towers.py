"""Differentiable reward towers of the real reward architectures, random-initialised, for timing only.

Cost does not depend on weight values, so a random tower of the right architecture times what a
trained reward model costs. ``vit``: an open_clip ViT image tower (ViT-H-14 = HPSv2 / PickScore size)
scored against one fixed text embedding. ``llama``: a Llama-architecture decoder (transformers
``LlamaModel``) over image-patch tokens plus fixed text tokens, the HPSv3 (Qwen2-VL-7B) stand-in of
docs/baselines.md: 448 px images in 28 px patches (256 visual tokens) + 64 text tokens.

Each tower maps images `[N, 3, H, W]` in [0, 1] to scores `[N]` and is differentiable, so DRaFT can
backpropagate it and DrPO can call it under ``torch.no_grad``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

# name → architecture; "tiny-*" are the CPU-sized versions of the same code paths
VIT_SPECS = {
    "vit-h-14": dict(open_clip="ViT-H-14"),
    "vit-tiny": dict(config={"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8,
                                                            "patch_size": 8},
                             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1}}),
}
# Qwen2-7B: hidden 3584, MLP 18944, 28 layers, 28 heads, 4 KV heads; the sweep scales the layer count
QWEN2_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, image_size=448, patch=28, text_tokens=64)
LLAMA_SPECS = {
    "llama-7b": QWEN2_7B,
    "llama-3.5b": {**QWEN2_7B, "num_hidden_layers": 14},
    "llama-1.8b": {**QWEN2_7B, "num_hidden_layers": 7},
    # CPU-sized steps of the sweep (64 px, 8 px patches: 64 visual + 8 text tokens)
    "llama-cpu-m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, image_size=64, patch=8, text_tokens=8),
    "llama-cpu-s": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, image_size=64, patch=8, text_tokens=8),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, image_size=32, patch=8, text_tokens=8),
}
TOWERS = [*VIT_SPECS, *LLAMA_SPECS]


class VitTower(torch.nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        import open_clip

        if "config" in spec:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "drpo-bench-tiny-vit.json"
                path.write_text(json.dumps(spec["config"]))
                open_clip.add_model_config(path)
            name = "drpo-bench-tiny-vit"
        else:
            name = spec["open_clip"]
        self.visual = open_clip.create_model(name, pretrained=None).visual  # the text tower is not timed
        self.size = self.visual.image_size[0] if isinstance(self.visual.image_size, tuple) else self.visual.image_size
        width = self.visual.output_dim
        self.register_buffer("text", F.normalize(torch.randn(width, generator=torch.Generator().manual_seed(0)), dim=0))
        self.register_buffer("mean", torch.tensor([0.4815, 0.4578, 0.4082]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2686, 0.2613, 0.2758]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = ((x - self.mean) / self.std).to(self.text.dtype if self.text.dtype != torch.float32 else x.dtype)
        emb = F.normalize(self.visual(x.to(next(self.visual.parameters()).dtype)).float(), dim=-1)
        return 100.0 * emb @ self.text.float()


class LlamaTower(torch.nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        spec = dict(spec)
        self.size, self.patch, text_tokens = spec.pop("image_size"), spec.pop("patch"), spec.pop("text_tokens")
        cfg = LlamaConfig(vocab_size=16, max_position_embeddings=1024, **spec)
        self.decoder = LlamaModel(cfg)
        self.decoder.embed_tokens = None  # inputs_embeds only
        self.patch_embed = torch.nn.Linear(3 * self.patch**2, cfg.hidden_size)
        self.text = torch.nn.Parameter(torch.randn(1, text_tokens, cfg.hidden_size) * 0.02, requires_grad=False)
        self.head = torch.nn.Linear(cfg.hidden_size, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False) * 2 - 1
        p = self.patch
        tokens = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], -1, 3 * p * p)
        dtype = self.patch_embed.weight.dtype
        seq = torch.cat([self.patch_embed(tokens.to(dtype)), self.text.to(dtype).expand(x.shape[0], -1, -1)], dim=1)
        hidden = self.decoder(inputs_embeds=seq).last_hidden_state
        return self.head(hidden[:, -1]).float().squeeze(-1)


def build_tower(name: str, device: str, dtype: torch.dtype, checkpointing: bool = False) -> torch.nn.Module:
    """The named tower on ``device`` in ``dtype``, frozen (requires_grad False: DRaFT differentiates through, not into it)."""
    if name in VIT_SPECS:
        tower = VitTower(VIT_SPECS[name])
    elif name in LLAMA_SPECS:
        tower = LlamaTower(LLAMA_SPECS[name])
        if checkpointing:
            enable = getattr(tower.decoder, "activation_checkpointing_enable", None) or tower.decoder.gradient_checkpointing_enable
            enable()
            tower.decoder.config.use_cache = False
    else:
        raise ValueError(f"unknown reward tower {name!r}; choose from {TOWERS}")
    tower = tower.to(device=device, dtype=dtype).requires_grad_(False)
    if checkpointing:
        tower.train()  # transformers checkpoints only in training mode (no dropout in these configs)
    else:
        tower.eval()
    return tower


def parameter_count(tower: torch.nn.Module) -> int:
    return sum(p.numel() for p in tower.parameters())

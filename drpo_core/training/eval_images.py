"""Images of an evaluation: every sample in GenEval's layout, and captioned grids a person can read.

GenEval layout (djghosh13/geneval ``generation/diffusers_generate.py``)::

    <out>/<index:05d>/metadata.jsonl        the prompt's metadata line (json.dump of one object)
    <out>/<index:05d>/samples/<k:05d>.png   sample k of that prompt (here: the k-th seed of --seeds)
    <out>/<index:05d>/grid.png              the prompt's samples in one row

A prompt without metadata gets ``{"prompt": ...}``. Captioned grids: one row per prompt, the prompt
written left of its images, each image marked with its score (a green frame for a GenEval pass, red for
a fail).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def write_geneval_layout(out: Path, images: torch.Tensor, prompts: list[str], metadata: list[dict | None]) -> Path:
    """``images`` `[P, S, 3, H, W]` in [0, 1] into ``out`` in GenEval's layout (module docstring)."""
    from torchvision.utils import make_grid

    for index, (prompt, meta) in enumerate(zip(prompts, metadata)):
        folder = out / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta if meta is not None else {"prompt": prompt}))
        for k, image in enumerate(images[index]):
            _to_pil(image).save(folder / "samples" / f"{k:05d}.png")
        _to_pil(make_grid(images[index], nrow=images.shape[1])).save(folder / "grid.png")
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def captioned_grid(path: Path, prompts: list[str], columns: list[tuple[str, torch.Tensor, torch.Tensor | None]],
                   scale: int = 3, caption_width: int = 260) -> Path:
    """One row per prompt; ``columns``: (heading, images `[P, S, 3, H, W]`, scores `[P, S]` or None) blocks
    side by side (e.g. base | policy). A score of exactly 0 or 1 draws a red / green frame, else its value."""
    P = len(prompts)
    H, W = columns[0][1].shape[-2:]
    cell_h, cell_w, pad, head = H * scale + 6, W * scale + 6, 12, 22
    widths = [caption_width] + [block.shape[1] * cell_w + pad for _, block, _ in columns]
    canvas = Image.new("RGB", (sum(widths), head + P * cell_h), (255, 255, 255))
    draw, font = ImageDraw.Draw(canvas), _font(12)
    for i, prompt in enumerate(prompts):
        draw.text((4, head + i * cell_h + cell_h // 2 - 7), prompt, fill=(0, 0, 0), font=font)
    x0 = caption_width
    for heading, block, scores in columns:
        draw.text((x0 + 3, 4), heading, fill=(0, 0, 0), font=font)
        for i in range(P):
            for j in range(block.shape[1]):
                x, y = x0 + j * cell_w, head + i * cell_h
                score = None if scores is None else float(scores[i, j])
                if score is not None and score in (0.0, 1.0):
                    draw.rectangle((x, y, x + cell_w - 2, y + cell_h - 2), fill=(40, 170, 60) if score == 1.0 else (210, 50, 50))
                canvas.paste(_to_pil(block[i, j], scale), (x + 2, y + 2))
                if score is not None and score not in (0.0, 1.0) and not np.isnan(score):
                    draw.text((x + 3, y + 2), f"{score:.2f}", fill=(0, 0, 0), font=font)
        x0 += block.shape[1] * cell_w + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path

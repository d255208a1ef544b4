"""Captioned, size-capped image grids: rows = prompts, columns = seeds (the sample grids and before/after).

    cells    [R·C, 3, H, W] in [0, 1]  →  nearest upscale only while a cell is under ``min_cell`` px
    grid     torchvision make_grid      →  a header band (one "seed s" per column) and a caption column (the prompt)
    cap      the cells are shrunk (area) so that the PNG is at most ``max_side`` px on its longer side; the text
             is drawn afterwards, at full size
    caption  the prompts and seeds are also stored as the PNG's "Description" text chunk, which the trackers
             (TensorBoard text, W&B captions) read back from the file on the driver

Pillow draws the text (its bundled font); no extra dependency.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

MIN_CELL = 96       # px: tiny 32 px images are shown at 3x, a 512 px run is never upscaled
MAX_SIDE = 2048     # px: longest side of any written grid
CAPTION_WIDTH = 200  # px of the prompt column (before the size cap)
HEADER = 22          # px of a text band


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _to_pil(images: torch.Tensor, cols: int) -> Image.Image:
    from torchvision.utils import make_grid

    side = images.shape[-1]
    if side < MIN_CELL:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=math.ceil(MIN_CELL / side), mode="nearest")
    grid = make_grid(images.clamp(0, 1), nrow=cols, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def _captioned(images: torch.Tensor, prompts: list[str], seeds: list[int], max_side: int, max_height: int | None = None) -> Image.Image:
    """The grid with a "seed s" header over each column and the prompt left of each row. The images are
    shrunk (area) before the text is drawn, so that the whole fits ``max_side`` × ``max_height`` with
    captions still at full size."""
    rows, cols = len(prompts), len(seeds)
    if images.shape[0] != rows * cols:
        raise ValueError(f"{images.shape[0]} images do not fill {rows} prompts x {cols} seeds")
    body = _to_pil(images, cols)
    room = (max_side - CAPTION_WIDTH, (max_height or max_side) - HEADER)
    scale = min(1.0, room[0] / body.width, room[1] / body.height)
    if scale < 1:
        body = body.resize((max(1, int(body.width * scale)), max(1, int(body.height * scale))), Image.Resampling.BOX)
    canvas = Image.new("RGB", (CAPTION_WIDTH + body.width, HEADER + body.height), "white")
    canvas.paste(body, (CAPTION_WIDTH, HEADER))
    draw, font = ImageDraw.Draw(canvas), _font()
    cell_w, cell_h = (body.width - 2) / cols, (body.height - 2) / rows
    for c, seed in enumerate(seeds):  # the longest label that fits the column; the PNG caption has every seed
        label = next((t for t in (f"seed {seed}", str(seed)) if draw.textlength(t, font=font) < cell_w - 6), f"seed #{c + 1}")
        draw.text((CAPTION_WIDTH + 4 + c * cell_w, 4), label, fill="black", font=font)
    chars = max(8, CAPTION_WIDTH // 7)
    for r, prompt in enumerate(prompts):
        lines = textwrap.wrap(prompt, chars)[: max(1, int(cell_h // 15))]
        draw.multiline_text((4, HEADER + 4 + r * cell_h), "\n".join(lines), fill="black", font=font, spacing=2)
    return canvas


def _band(width: int, label: str) -> Image.Image:
    band = Image.new("RGB", (width, HEADER), (235, 235, 235))
    ImageDraw.Draw(band).text((4, 4), label, fill="black", font=_font())
    return band


def _save(image: Image.Image, path: Path, description: str, max_side: int) -> Path:
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.Resampling.BOX)
    info = PngInfo()
    info.add_text("Description", description)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def describe(prompts: list[str], seeds: list[int]) -> str:
    rows = "; ".join(f"row {i + 1}: {p}" for i, p in enumerate(prompts))
    return f"{rows} | columns: " + ", ".join(f"#{i + 1} seed {s}" for i, s in enumerate(seeds))


def save_grid(images: torch.Tensor, prompts: list[str], seeds: list[int], path: Path, max_side: int = MAX_SIDE) -> Path:
    """Save ``[len(prompts)·len(seeds), 3, H, W]`` images in [0, 1] (prompt-major) as one captioned PNG."""
    return _save(_captioned(images, prompts, seeds, max_side), Path(path), describe(prompts, seeds), max_side)


def save_before_after(base: torch.Tensor, policy: torch.Tensor, prompts: list[str], seeds: list[int], path: Path,
                      max_side: int = MAX_SIDE) -> Path:
    """The base model's grid above the policy's (same prompts, same seeds), each under a label, with a divider."""
    divider = 6
    half = (max_side - 2 * HEADER - divider) // 2
    top, bottom = _captioned(base, prompts, seeds, max_side, half), _captioned(policy, prompts, seeds, max_side, half)
    canvas = Image.new("RGB", (top.width, 2 * HEADER + top.height + divider + bottom.height), "white")
    canvas.paste(_band(top.width, "before: base model"), (0, 0))
    canvas.paste(top, (0, HEADER))
    canvas.paste(Image.new("RGB", (top.width, divider), (40, 40, 40)), (0, HEADER + top.height))
    canvas.paste(_band(top.width, "after: DrPO policy"), (0, HEADER + top.height + divider))
    canvas.paste(bottom, (0, 2 * HEADER + top.height + divider))
    return _save(canvas, Path(path), "top: before (base model); bottom: after (DrPO policy) | " + describe(prompts, seeds), max_side)


def read_caption(path: Path) -> str:
    """The caption a grid was saved with ('' for a PNG without one)."""
    with Image.open(path) as image:
        return str(image.info.get("Description", ""))

"""The shapes world: scenes of 1–3 coloured shapes on a plain background, rendered with PIL.

The kinds are a circle, a **bar** (a wide rectangle, twice as wide as high) and a triangle (apex up). They differ
in coarse geometry (aspect ratio, top/bottom mass) that survives the blur of a one-step generator's 8×8 latent;
the first worlds had a square instead of the bar, and the generators drew squares as rounded blobs that no fill
rule could tell from circles (docs/toyworld.md).

A :class:`Scene` is a list of :class:`Shape` (kind, colour, box); :func:`render` draws it at 4× the
target size and box-filters down (anti-aliased edges, like a photo's), so a scene is an image `[3, H, W]`
in [0, 1]. :func:`sample_scene` draws a scene that satisfies a :class:`~drpo_core.toyworld.prompts.ToyPrompt`
(counts, colours, kinds, a relative position) from a seed: the same (prompt, seed) always gives the same
pixels. Shapes never overlap and keep a gap of :data:`GAP` pixels, so each one is its own connected
component of its colour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "bar", "triangle")
# Saturated, well-separated RGB values (GenEval colour names); the background is a light neutral grey.
PALETTE = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 75, 215), "yellow": (235, 200, 30)}
COLORS = tuple(PALETTE)
BACKGROUND = (205, 205, 205)
SIZE = 32  # image side, pixels
MIN_SIDE, MAX_SIDE = 8, 12  # shape bounding-box width, pixels (the height too, except a bar's)
GAP = 2  # minimum free pixels between two shapes' boxes
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    """One object: ``kind`` in :data:`SHAPES`, ``color`` in :data:`COLORS`, box ``(x1, y1, x2, y2)`` in
    pixels with x2/y2 exclusive (a side of ``x2 − x1`` pixels)."""

    kind: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


Scene = tuple[Shape, ...]


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, k: int) -> None:
    x1, y1, x2, y2 = (v * k for v in shape.box)
    fill = PALETTE[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape.kind == "bar":  # fills its box, which place() makes half as high as wide
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
    elif shape.kind == "triangle":  # apex up, base on the bottom edge of the box
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape.kind!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, size: int = SIZE) -> torch.Tensor:
    """The scene as an image `[3, size, size]` float32 in [0, 1] (drawn at 4×, box-filtered down)."""
    big = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for shape in scene:
        _draw(draw, shape, SUPERSAMPLE)
    small = big.resize((size, size), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def bar_height(width: int) -> int:
    """A bar is half as high as wide (rounded up)."""
    return (width + 1) // 2


def _separated(box, others, gap: int) -> bool:
    x1, y1, x2, y2 = box
    return all(x2 + gap <= o[0] or o[2] + gap <= x1 or y2 + gap <= o[1] or o[3] + gap <= y1 for o in others)


def place(kinds_colors: list[tuple[str, str]], rng: random.Random, size: int = SIZE,
          accept=None, tries: int = 2000) -> Scene:
    """Random non-overlapping boxes for ``(kind, colour)`` pairs; ``accept(scene)`` may reject a layout
    (e.g. a relative position). Raises RuntimeError if no layout is found in ``tries`` attempts."""
    for _ in range(tries):
        shapes: list[Shape] = []
        for kind, color in kinds_colors:
            for _ in range(100):
                side = rng.randint(MIN_SIDE, MAX_SIDE)
                height = bar_height(side) if kind == "bar" else side
                x1, y1 = rng.randint(1, size - side - 1), rng.randint(1, size - height - 1)
                box = (x1, y1, x1 + side, y1 + height)
                if _separated(box, [s.box for s in shapes], GAP):
                    shapes.append(Shape(kind, color, box))
                    break
            else:
                break
        if len(shapes) == len(kinds_colors) and (accept is None or accept(tuple(shapes))):
            return tuple(shapes)
    raise RuntimeError(f"no layout for {kinds_colors} in {tries} tries")

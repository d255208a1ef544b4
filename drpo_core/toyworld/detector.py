"""Classical-vision GenEval backends for the shapes world: a :class:`Detector` and a :class:`ColorClassifier`.

Detector steps, for an image `[3, H, W]` in [0, 1]:

1. **Colour segmentation** — each pixel takes the nearest of the palette colours and the background
   (Euclidean RGB); pixels nearer the background are background.
2. **Connected components** per colour (4-connectivity, ``scipy.ndimage.label``); components smaller than
   ``min_pixels`` are noise and dropped.
3. **Shape from geometry** of each component's mask inside its bounding box: a bar is wide (width ≥
   ``bar_aspect`` × height; 2 when rendered, circles and triangles 1); a triangle (apex up) has much less mass
   in its top half than its bottom half (ratio < ``triangle_ratio``); anything else is a circle. Both tests
   read coarse geometry, which survives blur; the square of the first worlds was told from a circle by the
   fill of its box, which a generator's rounded corners erased.

Every detection has score 1.0 (a rule-based detector has no confidence), so GenEval's thresholds keep
them all, and carries its mask (GenEval composites masked objects over grey before colour classification).
The colour classifier labels a crop by the majority palette colour among its non-background pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from drpo_core.rewards.geneval.detection import Detections
from drpo_core.rewards.geneval.rules import GREY_999
from drpo_core.toyworld.world import BACKGROUND, COLORS, PALETTE, SHAPES

_PALETTE = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 255  # [C, 3]
_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32) / 255


def color_labels(image: torch.Tensor, extra_background: Sequence[float] | None = None) -> torch.Tensor:
    """`[H, W]` long: index into :data:`COLORS` of each pixel's nearest colour, −1 where the background
    (or ``extra_background``, an RGB triple in [0, 1]) is nearer."""
    refs = [_PALETTE, _BACKGROUND[None]]
    if extra_background is not None:
        refs.append(torch.tensor(extra_background, dtype=torch.float32)[None])
    refs = torch.cat(refs)  # [C + 1 (+1), 3]
    pixels = image.float().permute(1, 2, 0)  # [H, W, 3]
    nearest = torch.cdist(pixels.reshape(-1, 3), refs).argmin(1).reshape(pixels.shape[:2])
    return torch.where(nearest < len(COLORS), nearest, torch.full_like(nearest, -1))


def classify_shape(mask: np.ndarray, triangle_ratio: float = 0.6, bar_aspect: float = 1.4) -> str:
    """Shape of one component ``mask`` `[h, w]` bool cropped to its bounding box."""
    h, w = mask.shape
    if w >= bar_aspect * h:
        return "bar"
    top, bottom = mask[: h // 2].sum(), mask[h - h // 2:].sum()
    return "triangle" if top < triangle_ratio * bottom else "circle"


class ShapeDetector:
    """GenEval :class:`~drpo_core.rewards.geneval.detection.Detector` for the shapes world (module docstring)."""

    model_id = "toy-shapes-classical-v2"

    def __init__(self, min_pixels: int = 12, triangle_ratio: float = 0.6, bar_aspect: float = 1.4):
        self.min_pixels, self.triangle_ratio, self.bar_aspect = min_pixels, triangle_ratio, bar_aspect

    def __call__(self, image: torch.Tensor, classes: Sequence[str] = SHAPES) -> Detections:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"ShapeDetector expects one image [3, H, W], got {tuple(image.shape)}")
        labels_map = color_labels(image).numpy()
        boxes, labels, masks = [], [], []
        for c in range(len(COLORS)):
            components, n = ndimage.label(labels_map == c)
            for index, window in enumerate(ndimage.find_objects(components), start=1):
                if window is None:
                    continue
                mask = components == index
                if mask.sum() < self.min_pixels:
                    continue
                ys, xs = window
                labels.append(classify_shape(mask[window], self.triangle_ratio, self.bar_aspect))
                boxes.append([xs.start, ys.start, xs.stop, ys.stop])  # x2, y2 exclusive, as the renderer's boxes
                masks.append(torch.from_numpy(mask))
        if not labels:
            return Detections.empty()
        return Detections(boxes=torch.tensor(boxes, dtype=torch.float32), labels=labels,
                          scores=torch.ones(len(labels)), masks=torch.stack(masks))


class PaletteColorClassifier:
    """GenEval :class:`~drpo_core.rewards.geneval.detection.ColorClassifier`: majority palette colour of a
    crop's object pixels (the #999 grey GenEval pastes around masked objects counts as background).
    Candidate colours outside the world's palette are never returned."""

    model_id = "toy-palette-v1"

    def __call__(self, crops: list[torch.Tensor], classname: str, colors: Sequence[str]) -> list[str]:
        out = []
        for crop in crops:
            labels = color_labels(crop, extra_background=(GREY_999,) * 3)
            counts = torch.bincount(labels[labels >= 0].flatten(), minlength=len(COLORS))
            allowed = torch.tensor([c in colors for c in COLORS])
            counts = torch.where(allowed, counts, torch.zeros_like(counts))
            out.append(COLORS[int(counts.argmax())] if counts.sum() > 0 else "none")
        return out


def toy_geneval_reward(mode: str = "geneval", **thresholds):
    """:class:`GenEvalReward` over the classical detector and palette classifier (``mode``: geneval,
    strict or partial)."""
    from drpo_core.rewards.geneval.reward import GenEvalReward

    return GenEvalReward(ShapeDetector(), PaletteColorClassifier(), mode=mode, **thresholds)

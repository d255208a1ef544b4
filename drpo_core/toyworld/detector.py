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

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from drpo_core.rewards.geneval.detection import Detections
from drpo_core.rewards.geneval.rules import GREY_999
from drpo_core.toyworld.world import BACKGROUND, COLORS, PALETTE, SHAPES

_PALETTE = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 255  # [C, 3]
_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32) / 255
_REFS = torch.cat([_PALETTE, _BACKGROUND[None]])  # [C + 1, 3]: the detector's references
_CROP_REFS = torch.cat([_REFS, torch.full((1, 3), GREY_999)])  # + GenEval's #999 canvas: the classifier's
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_FOUR_CONNECTED_PER_IMAGE = np.stack([np.zeros_like(_FOUR_CONNECTED), _FOUR_CONNECTED, np.zeros_like(_FOUR_CONNECTED)])


def color_labels(image: torch.Tensor, extra_background: Sequence[float] | None = None) -> torch.Tensor:
    """`[H, W]` long: index into :data:`COLORS` of each pixel's nearest colour, −1 where the background
    (or ``extra_background``, an RGB triple in [0, 1]) is nearer."""
    if extra_background is None:
        refs = _REFS
    elif tuple(extra_background) == (GREY_999,) * 3:
        refs = _CROP_REFS
    else:
        refs = torch.cat([_REFS, torch.tensor(extra_background, dtype=torch.float32)[None]])
    return _nearest(image, refs)


def _nearest(image: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
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


class _Memo:
    """A bounded map from an input's content (a digest of its bytes) to a pure function's answer: the demo's two
    GenEval rewards (partial credit and pass/fail) see the same images, so the second one detects nothing anew."""

    def __init__(self, size: int = 8192):
        self.size, self.items = size, OrderedDict()

    @staticmethod
    def key(tensor: torch.Tensor, *extra) -> tuple:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        return (str(array.dtype), array.shape, hashlib.blake2b(array.tobytes(), digest_size=16).digest(), *extra)

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self.items[key] = value
        while len(self.items) > self.size:
            self.items.popitem(last=False)


class ShapeDetector:
    """GenEval :class:`~drpo_core.rewards.geneval.detection.Detector` for the shapes world (module docstring)."""

    model_id = "toy-shapes-classical-v2"
    _memo = _Memo()  # shared by every detector: the key holds the thresholds

    def __init__(self, min_pixels: int = 12, triangle_ratio: float = 0.6, bar_aspect: float = 1.4):
        self.min_pixels, self.triangle_ratio, self.bar_aspect = min_pixels, triangle_ratio, bar_aspect

    def __call__(self, image: torch.Tensor, classes: Sequence[str] = SHAPES) -> Detections:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"ShapeDetector expects one image [3, H, W], got {tuple(image.shape)}")
        return self.detect_batch(image[None])[0]

    def detect_batch(self, images: torch.Tensor) -> list[Detections]:
        """:class:`Detections` of each image of ``images`` `[N, 3, H, W]` in [0, 1] (every class: the detector is
        closed-set); the same as one call per image, with one connected-component pass per colour for the batch."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"ShapeDetector expects images [N, 3, H, W], got {tuple(images.shape)}")
        params = (self.min_pixels, self.triangle_ratio, self.bar_aspect)
        keys = [_Memo.key(image, params) for image in images]
        found: list[Detections | None] = [self._memo.get(k) for k in keys]
        todo = [i for i, d in enumerate(found) if d is None]
        if todo:
            for i, dets in zip(todo, self._detect(images[todo])):
                found[i] = dets
                self._memo.put(keys[i], dets)
        return found

    def _detect(self, images: torch.Tensor) -> list[Detections]:
        labels_map = torch.stack([color_labels(image) for image in images]).numpy()  # [N, H, W]
        per_image: list[list[tuple]] = [[] for _ in range(len(images))]  # (label, box, mask) in colour, raster order
        for c in range(len(COLORS)):
            # components of colour c in every image at once: 4-connected within an image, never across images;
            # ndimage numbers them in raster order over (image, y, x), so per image in its own raster order
            components, n = ndimage.label(labels_map == c, structure=_FOUR_CONNECTED_PER_IMAGE)
            if not n:
                continue
            sizes = np.bincount(components.ravel(), minlength=n + 1)
            for index, window in enumerate(ndimage.find_objects(components), start=1):
                if window is None or sizes[index] < self.min_pixels:
                    continue
                batch, ys, xs = window
                b = batch.start
                mask = components[b] == index
                per_image[b].append((classify_shape(mask[ys, xs], self.triangle_ratio, self.bar_aspect),
                                     [xs.start, ys.start, xs.stop, ys.stop],  # x2, y2 exclusive, as the renderer's
                                     torch.from_numpy(mask)))
        out = []
        for found in per_image:
            if not found:
                out.append(Detections.empty())
                continue
            labels, boxes, masks = zip(*found)
            out.append(Detections(boxes=torch.tensor(boxes, dtype=torch.float32), labels=list(labels),
                                  scores=torch.ones(len(labels)), masks=torch.stack(masks)))
        return out


class PaletteColorClassifier:
    """GenEval :class:`~drpo_core.rewards.geneval.detection.ColorClassifier`: majority palette colour of a
    crop's object pixels (the #999 grey GenEval pastes around masked objects counts as background).
    Candidate colours outside the world's palette are never returned."""

    model_id = "toy-palette-v1"
    _memo = _Memo()

    def __call__(self, crops: list[torch.Tensor], classname: str, colors: Sequence[str]) -> list[str]:
        allowed = torch.tensor([c in colors for c in COLORS])
        out = []
        for crop in crops:
            key = _Memo.key(crop, tuple(allowed.tolist()))
            color = self._memo.get(key)
            if color is None:
                labels = color_labels(crop, extra_background=(GREY_999,) * 3)
                counts = torch.bincount(labels[labels >= 0].flatten(), minlength=len(COLORS))
                counts = torch.where(allowed, counts, torch.zeros_like(counts))
                color = COLORS[int(counts.argmax())] if counts.sum() > 0 else "none"
                self._memo.put(key, color)
            out.append(color)
        return out


def toy_geneval_reward(mode: str = "geneval", **thresholds):
    """:class:`GenEvalReward` over the classical detector and palette classifier (``mode``: geneval,
    strict or partial)."""
    from drpo_core.rewards.geneval.reward import GenEvalReward

    return GenEvalReward(ShapeDetector(), PaletteColorClassifier(), mode=mode, **thresholds)

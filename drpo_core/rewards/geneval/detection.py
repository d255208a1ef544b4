"""The detector side of GenEval: the interfaces a backend implements and GenEval's box post-processing.

A backend is anything with the :class:`Detector` signature, e.g. the transformers OWL-ViT/OWLv2
detector in :mod:`.owl`, or GenEval's own mmdetection Mask2Former (see docs/rewards-models.md and
:func:`detections_from_per_class`). Post-processing follows djghosh13/geneval
``evaluation/evaluate_images.py`` (prior-art.md §3.5): per class, sort by score, keep score >
threshold (0.9 for every class when the prompt's tag is ``counting``, else 0.3), cap at 16, and run a
greedy de-duplication only when the NMS threshold is below 1 (IoU with the ``+1`` pixel convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True)
class Detections:
    """Detector output for one image of size H×W.

    boxes: `[n, 4]` float32, (x1, y1, x2, y2) in pixels. labels: n class names. scores: `[n]` float32
    confidences. masks: `[n, H, W]` bool instance masks, or None for box-only detectors.
    """

    boxes: torch.Tensor
    labels: list[str]
    scores: torch.Tensor
    masks: torch.Tensor | None = None

    def __post_init__(self):
        n = len(self.labels)
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,):
            raise ValueError(f"Detections: {n} labels need boxes [n, 4] and scores [n], "
                             f"got {tuple(self.boxes.shape)} and {tuple(self.scores.shape)}")
        if self.masks is not None and (self.masks.ndim != 3 or self.masks.shape[0] != n):
            raise ValueError(f"Detections: masks must be [n, H, W] with n={n}, got {tuple(self.masks.shape)}")

    @classmethod
    def empty(cls) -> "Detections":
        return cls(boxes=torch.zeros(0, 4), labels=[], scores=torch.zeros(0))


class Detector(Protocol):
    """``(image [3, H, W] in [0, 1], classes) -> Detections``.

    ``classes`` are the class names the prompt's metadata mentions: an open-vocabulary detector
    queries exactly those; a closed-set detector (COCO Mask2Former) may ignore it and return all.
    """

    def __call__(self, image: torch.Tensor, classes: Sequence[str]) -> Detections: ...


class ColorClassifier(Protocol):
    """``(crops: list of [3, h, w] in [0, 1], class name, candidate colours) -> one colour per crop``."""

    def __call__(self, crops: list[torch.Tensor], classname: str, colors: Sequence[str]) -> list[str]: ...


@dataclass(frozen=True)
class Thresholds:
    """GenEval's post-processing constants (evaluate_images.py defaults)."""

    threshold: float = 0.3  # keep detections with score > threshold ...
    counting_threshold: float = 0.9  # ... or > this for every class when the tag is "counting"
    max_objects: int = 16  # per class, after sorting by score
    nms_threshold: float = 1.0  # 1.0 = no extra de-duplication (Mask2Former rarely duplicates)
    position_threshold: float = 0.1  # relative-position dead zone, fraction of the summed box sizes


@dataclass(frozen=True)
class Found:
    """A kept detection: box `[4]` xyxy px, its score, its `[H, W]` bool mask or None."""

    box: torch.Tensor
    score: float
    mask: torch.Tensor | None = None


def iou_plus_one(box_a: torch.Tensor, box_b: torch.Tensor) -> float:
    """GenEval's ``compute_iou``: areas count pixels inclusively, (x2 − x1 + 1)·(y2 − y1 + 1)."""
    def area(x1, y1, x2, y2):
        return max(float(x2 - x1) + 1, 0.0) * max(float(y2 - y1) + 1, 0.0)

    inter = area(max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    union = area(*box_a.tolist()) + area(*box_b.tolist()) - inter
    return inter / union if union else 0.0


def keep_detections(dets: Detections, tag: str, th: Thresholds = Thresholds()) -> dict[str, list[Found]]:
    """GenEval's per-class filtering: ``{class: [Found, ...] sorted by score desc}``; empty classes absent.

    Plain Python on the scores' values (a few detections per image: tensor ops cost more than they compute);
    ``tests/test_geneval.py`` keeps the tensor version as the oracle."""
    # compare in the scores' own dtype, as GenEval's numpy float32 arrays do (a float32 0.3 is not > 0.3): the
    # cutoff rounded to that dtype, compared exactly as Python floats (every float32 / float16 value is one)
    cutoff = torch.tensor(th.counting_threshold if tag == "counting" else th.threshold, dtype=dets.scores.dtype).item()
    scores = dets.scores.tolist()
    kept: dict[str, list[Found]] = {}
    for cls in dict.fromkeys(dets.labels):
        # above the cutoff (NaN never is), then by score descending, ties in detection order (a stable sort)
        order = sorted((i for i, label in enumerate(dets.labels) if label == cls and scores[i] > cutoff),
                       key=lambda i: -scores[i])[: th.max_objects]
        found: list[Found] = []
        while order:
            best = order.pop(0)
            found.append(Found(dets.boxes[best].float(), float(dets.scores[best]),
                               None if dets.masks is None else dets.masks[best].bool()))
            if th.nms_threshold < 1.0:
                order = [i for i in order if iou_plus_one(dets.boxes[best], dets.boxes[i]) < th.nms_threshold]
        if found:
            kept[cls] = found
    return kept


def greedy_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices kept by greedy NMS (plain IoU), highest score first. boxes `[n, 4]` xyxy, scores `[n]`."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if order.numel() == 0:
        return order
    x1, y1, x2, y2 = boxes.float().unbind(-1)
    area = (x2 - x1).clamp_min(0) * (y2 - y1).clamp_min(0)
    keep = []
    alive = torch.ones(len(order), dtype=torch.bool)
    for rank, i in enumerate(order.tolist()):
        if not alive[rank]:
            continue
        keep.append(i)
        rest = order[rank + 1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp_min(0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp_min(0)
        inter = w * h
        iou = inter / (area[i] + area[rest] - inter).clamp_min(1e-9)
        alive[rank + 1:] &= iou < iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def detections_from_per_class(bbox_results: Sequence, segm_results: Sequence | None,
                              classnames: Sequence[str]) -> Detections:
    """Convert mmdetection 2.x output (GenEval's Mask2Former) to :class:`Detections`.

    ``bbox_results[i]``: `[n_i, 5]` array (x1, y1, x2, y2, score) for class ``classnames[i]``;
    ``segm_results[i]``: n_i binary `[H, W]` masks (or None). Numpy arrays or tensors.
    """
    if len(bbox_results) != len(classnames):
        raise ValueError(f"{len(bbox_results)} per-class results for {len(classnames)} class names")
    boxes, scores, labels, masks = [], [], [], []
    for i, cls in enumerate(classnames):
        per_class = torch.as_tensor(bbox_results[i], dtype=torch.float32).reshape(-1, 5)
        boxes.append(per_class[:, :4])
        scores.append(per_class[:, 4])
        labels += [cls] * per_class.shape[0]
        if segm_results is not None:
            masks += [torch.as_tensor(m).bool() for m in segm_results[i]]
    return Detections(boxes=torch.cat(boxes), labels=labels, scores=torch.cat(scores),
                      masks=torch.stack(masks) if segm_results is not None and masks else None)

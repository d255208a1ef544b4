"""Closed-set COCO detector backend for GenEval: transformers Mask2Former (instance masks) from a local folder.

GenEval's detector is mmdetection 2.x Mask2Former Swin-S on COCO; transformers ships the same
architecture (e.g. facebook/mask2former-swin-small-coco-instance; different training run, so scores
are close, not identical). The post-processing below re-implements mmdetection's
``MaskFormerFusionHead.instance_postprocess`` rather than transformers' ``post_process_instance_segmentation``
(which resamples every mask through a fixed 384×384 grid, distorting non-square inputs)::

    masks  = logits upsampled to the padded input, cropped to the valid region, resized to H×W (bilinear)
    p      = softmax(class logits)[:, :-1]                  # [Q, C], "no object" dropped
    top-k  = the Q best (query, class) pairs of p           # mmdet max_per_image = 100 = Q for COCO
    binary = mask logit > 0;  mask score = mean sigmoid over the binary mask
    score  = p · mask score;  box = mask extents (x0, y0, x1 + 1, y1 + 1)   # mmdet mask2bbox

Class index i maps to GenEval's object_names.txt line i (:data:`COCO_CLASSES`) when the model has 80
classes, as GenEval does; otherwise the model's own ``id2label``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from drpo_core.rewards.common import require_local_path, resolve_device
from drpo_core.rewards.geneval.detection import Detections
from drpo_core.rewards.geneval.metadata import COCO_CLASSES


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdet ``mask2bbox``: `[n, H, W]` bool → `[n, 4]` (x0, y0, x1 + 1, y1 + 1); empty masks give zeros."""
    boxes = torch.zeros(masks.shape[0], 4)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # [n, W], [n, H]
    for i in range(masks.shape[0]):
        x, y = cols[i].nonzero().flatten(), rows[i].nonzero().flatten()
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


class Mask2FormerDetector:
    """``Mask2FormerForUniversalSegmentation`` + image processor; returns boxes, scores and instance masks.

    ``score_floor`` drops detections early (GenEval's 0.3 / 0.9 thresholds apply afterwards).
    """

    def __init__(self, path: str, device: str | None = None, score_floor: float = 0.05,
                 field: str = "options.detector_path"):
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        folder = require_local_path(path, field, "geneval", want="dir")
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(folder), local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"reward 'geneval': {field} {str(path)!r}: cannot load Mask2Former: "
                             f"{str(e).strip().splitlines()[0]}") from None
        self.device = resolve_device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        n = self.model.config.num_labels
        self.classnames = list(COCO_CLASSES) if n == len(COCO_CLASSES) else [self.model.config.id2label[i] for i in range(n)]
        self.model_id = f"mask2former/{folder.name}"
        self.score_floor = score_floor

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, classes: Sequence[str] = ()) -> Detections:
        """Instances in ``image`` `[3, H, W]`; only the ``classes`` asked for (all when empty)."""
        h, w = image.shape[-2:]
        inputs = self.processor(images=[image.detach().float().clamp(0, 1).cpu()], do_rescale=False, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device)
        out = self.model(pixel_values=pixels)
        logits = F.interpolate(out.masks_queries_logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        valid = inputs["pixel_mask"][0] if "pixel_mask" in inputs else torch.ones(pixels.shape[-2:], dtype=torch.long)
        vh, vw = int(valid.any(1).sum()), int(valid.any(0).sum())  # the resized image before padding
        logits = F.interpolate(logits[:, :, :vh, :vw], size=(h, w), mode="bilinear", align_corners=False)[0]  # [Q, H, W]
        probs = out.class_queries_logits[0].softmax(-1)[:, :-1]  # [Q, C]
        num_queries, num_classes = probs.shape
        top_scores, top = probs.flatten().topk(num_queries, sorted=False)
        labels, queries = top % num_classes, torch.div(top, num_classes, rounding_mode="floor")
        wanted = torch.ones_like(labels, dtype=torch.bool) if not classes else torch.tensor(
            [self.classnames[i] in set(classes) for i in labels.tolist()], dtype=torch.bool, device=labels.device)
        labels, queries, top_scores = labels[wanted], queries[wanted], top_scores[wanted]
        mask_logits = logits[queries]  # [k, H, W]
        binary = mask_logits > 0
        mask_scores = (mask_logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = (top_scores * mask_scores).float()
        keep = scores > self.score_floor
        binary = binary[keep].cpu()
        return Detections(boxes=mask_boxes(binary), labels=[self.classnames[i] for i in labels[keep].tolist()],
                          scores=scores[keep].cpu(), masks=binary)

"""Open-vocabulary detector backend for GenEval: transformers OWL-ViT / OWLv2 from a local folder.

GenEval's own detector is mmdetection 2.x Mask2Former (COCO, instance masks), which needs its own
torch-1.12 environment; OWLv2 runs in this one. Differences to keep in mind (docs/rewards-models.md):
OWL gives boxes only (colour crops are then unmasked boxes, as GenEval does for mask-less
detections), it often returns several overlapping boxes per object (so this backend runs
class-wise NMS, ``nms_iou``), and its sigmoid scores are calibrated differently from Mask2Former's,
so GenEval's 0.3 / 0.9 thresholds should be re-tuned (``threshold`` / ``counting_threshold``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from drpo_core.rewards.common import require_local_path, resolve_device
from drpo_core.rewards.geneval.detection import Detections, greedy_nms


class OwlDetector:
    """``Owlv2ForObjectDetection`` / ``OwlViTForObjectDetection`` + processor, queried with the metadata's classes.

    ``query_template`` turns a class name into a text query (OWL's convention "a photo of a {}").
    Detections below ``score_floor`` are dropped early (GenEval's thresholds apply afterwards).
    """

    def __init__(self, path: str, device: str | None = None, query_template: str = "a photo of a {}",
                 score_floor: float = 0.05, nms_iou: float = 0.3, field: str = "options.detector_path"):
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        folder = require_local_path(path, field, "geneval", want="dir")
        try:
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(str(folder), local_files_only=True)
            self.processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"reward 'geneval': {field} {str(path)!r}: cannot load an OWL detector: "
                             f"{str(e).splitlines()[0]}") from None
        if self.model.config.model_type not in ("owlv2", "owlvit"):
            raise ValueError(f"reward 'geneval': {field} {str(path)!r} is a {self.model.config.model_type!r} model, "
                             "not OWL-ViT/OWLv2")
        self.device = resolve_device(device)
        self.model.to(self.device).eval().requires_grad_(False)
        self.model_id = f"{self.model.config.model_type}/{folder.name}"
        self.query_template, self.score_floor, self.nms_iou = query_template, score_floor, nms_iou

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, classes: Sequence[str]) -> Detections:
        """Boxes of the queried ``classes`` in ``image`` `[3, H, W]` (pixels, clamped to the image)."""
        classes = list(dict.fromkeys(classes))
        if not classes:
            return Detections.empty()
        h, w = image.shape[-2:]
        queries = [self.query_template.format(c) for c in classes]
        inputs = self.processor(text=[queries], images=[image.detach().float().clamp(0, 1).cpu()],
                                do_rescale=False, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        # post-processing knows OWLv2's square padding (boxes scale by max(H, W)) vs OWL-ViT's stretch
        result = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.score_floor, target_sizes=[(h, w)])[0]
        boxes = result["boxes"].float().cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        scores, labels = result["scores"].float().cpu(), result["labels"].cpu()
        keep = []
        for q in labels.unique().tolist():  # class-wise NMS: OWL proposes several boxes per object
            idx = (labels == q).nonzero().flatten()
            keep.append(idx[greedy_nms(boxes[idx], scores[idx], self.nms_iou)])
        keep = torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)
        return Detections(boxes=boxes[keep], labels=[classes[i] for i in labels[keep].tolist()], scores=scores[keep])

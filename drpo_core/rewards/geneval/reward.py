"""GenEval as a reward: detect → keep (GenEval thresholds) → rules → one number per image.

Metadata arrives through the reward protocol's ``metadata`` argument: one GenEval metadata dict per
image (see :mod:`.metadata`). An image without metadata gets NaN (a missing score) and is counted
in ``pop_stats()["missing_metadata"]``; malformed metadata raises one ValueError line.

Modes: ``"geneval"`` — the benchmark rule, 0/1 (default); ``"strict"`` — flow_grpo's exact-count
rule, 0/1; ``"partial"`` — flow_grpo's partial credit (see :mod:`.rules`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import fields
from typing import Sequence

import torch

from drpo_core.rewards.common import check_reward_inputs
from drpo_core.rewards.geneval.detection import ColorClassifier, Detections, Detector, Thresholds, keep_detections
from drpo_core.rewards.geneval.metadata import COLORS, TASKS, parse_metadata
from drpo_core.rewards.geneval.rules import ImageVerdict, evaluate_exact, evaluate_geneval

MODES = ("geneval", "strict", "partial")


def check_options(mode: str, thresholds: dict) -> Thresholds:
    """Validate ``mode`` and threshold overrides (before any weights are loaded)."""
    if mode not in MODES:
        raise ValueError(f"reward 'geneval': mode {mode!r} is not one of {', '.join(MODES)}")
    known = {f.name for f in fields(Thresholds)}
    unknown = sorted(set(thresholds) - known)
    if unknown:
        raise ValueError(f"reward 'geneval': unknown option(s) {unknown}; thresholds are {sorted(known)}")
    return Thresholds(**thresholds)


def summarize(verdicts: Sequence[ImageVerdict]) -> dict[str, float]:
    """GenEval's summary: per-task accuracy, ``overall`` = unweighted mean of the task means present."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    for v in verdicts:
        by_task[v.tag].append(v.correct)
    out = {f"accuracy/{t}": sum(c) / len(c) for t, c in by_task.items()}
    if by_task:
        out["overall"] = sum(out.values()) / len(by_task)
        out["images_correct"] = sum(v.correct for v in verdicts) / len(verdicts)
    return out


class GenEvalReward:
    """GenEval correctness of each image for its metadata, over a pluggable :class:`Detector`.

    ``detector``: any ``(image [3, H, W], classes) -> Detections``. ``color_classifier``: any
    ``(crops, class, colours) -> colours``; needed only for prompts with colour clauses.
    Threshold keywords override :class:`Thresholds` (threshold, counting_threshold, max_objects,
    nms_threshold, position_threshold).
    """

    model_id = "geneval"

    def __init__(self, detector: Detector, color_classifier: ColorClassifier | None = None, mode: str = "geneval",
                 colors: Sequence[str] = COLORS, version: str | None = None, **thresholds):
        self.thresholds = check_options(mode, thresholds)
        self.detector, self.color_classifier, self.mode = detector, color_classifier, mode
        self.colors = tuple(colors)
        detector_id = getattr(detector, "model_id", type(detector).__name__)
        self.version = version or f"geneval-{mode}/{detector_id}"
        self.last_verdicts: list[ImageVerdict | None] = []
        self._seen: list[ImageVerdict] = []
        self._missing = 0

    def evaluate(self, image: torch.Tensor, metadata, detections: Detections | None = None) -> ImageVerdict:
        """Verdict for one image `[3, H, W]` in [0, 1] and its GenEval metadata (``detections``: the detector's
        answer for it, when already known)."""
        spec = parse_metadata(metadata)
        if detections is None:
            detections = self.detector(image, spec.classes)
        objects = keep_detections(detections, spec.tag, self.thresholds)
        rule = evaluate_geneval if self.mode == "geneval" else evaluate_exact
        return rule(image, objects, spec, self.color_classifier, self.thresholds, self.colors)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """`[N]` float32: 0/1 (geneval, strict) or partial credit; NaN where an image has no metadata."""
        check_reward_inputs(images, prompts, metadata)
        metadata = metadata if metadata is not None else [None] * images.shape[0]
        scores = torch.full((images.shape[0],), math.nan)
        self.last_verdicts = []
        images = images.float().clamp(0, 1)
        # a closed-set detector with a batch entry point (the shapes world's) detects every image in one pass
        batch = getattr(self.detector, "detect_batch", None)
        scored = [i for i, meta in enumerate(metadata) if meta is not None]
        detected = dict(zip(scored, batch(images[scored]))) if batch is not None and scored else {}
        for i, (image, meta) in enumerate(zip(images, metadata)):
            if meta is None:
                self._missing += 1
                self.last_verdicts.append(None)
                continue
            verdict = self.evaluate(image, meta, detected.get(i))
            scores[i] = verdict.score if self.mode == "partial" else float(verdict.correct)
            self.last_verdicts.append(verdict)
            self._seen.append(verdict)
        return scores

    def pop_stats(self) -> dict[str, float]:
        """Since the last call: per-task pass rate, GenEval overall, images scored, images without metadata."""
        stats = {k.replace("accuracy/", "pass/"): v for k, v in summarize(self._seen).items()}
        stats.update({f"n/{t}": float(sum(v.tag == t for v in self._seen)) for t in TASKS if any(v.tag == t for v in self._seen)})
        stats["missing_metadata"] = float(self._missing)
        self._seen, self._missing = [], 0
        return stats

"""GenEval (djghosh13/geneval) re-implemented over pluggable detector and colour-classifier interfaces.

Layout: :mod:`.metadata` (jsonl format, task tags, colours, COCO names), :mod:`.detection`
(Detector / ColorClassifier protocols, Detections, GenEval's box post-processing), :mod:`.rules`
(benchmark rule, flow_grpo exact/partial rule, relative position), the detector backends :mod:`.owl`
(OWL-ViT/OWLv2) and :mod:`.mask2former` (transformers Mask2Former), :mod:`.clip_color` (CLIP colour
classifier) and :mod:`.reward` (the reward class).
"""

from __future__ import annotations

from drpo_core.rewards.geneval.detection import (
    ColorClassifier, Detections, Detector, Found, Thresholds, detections_from_per_class, keep_detections,
)
from drpo_core.rewards.geneval.metadata import (
    COCO_CLASSES, COLORS, RELATIONS, TASKS, Clause, GenEvalSpec, load_metadata_jsonl, parse_metadata,
)
from drpo_core.rewards.geneval.reward import MODES, GenEvalReward, check_options, summarize
from drpo_core.rewards.geneval.rules import ImageVerdict, evaluate_exact, evaluate_geneval, relative_position


def load_detector(path: str, device: str | None = None, **options) -> Detector:
    """The detector backend for the model in ``path``, chosen by its config.json ``model_type``.

    owlv2 / owlvit → :class:`.owl.OwlDetector` (options: query_template, score_floor, nms_iou);
    mask2former → :class:`.mask2former.Mask2FormerDetector` (options: score_floor).
    """
    import inspect
    import json

    from drpo_core.rewards.common import require_local_path

    folder = require_local_path(path, "options.detector_path", "geneval", want="dir")
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise ValueError(f"reward 'geneval': options.detector_path {str(path)!r} has no readable config.json") from None
    if model_type in ("owlv2", "owlvit"):
        from drpo_core.rewards.geneval.owl import OwlDetector as backend
    elif model_type == "mask2former":
        from drpo_core.rewards.geneval.mask2former import Mask2FormerDetector as backend
    else:
        raise ValueError(f"reward 'geneval': options.detector_path {str(path)!r} is a {model_type!r} model; "
                         "supported detectors: owlv2, owlvit, mask2former")
    try:
        inspect.signature(backend).bind(path, device=device, **options)
    except TypeError as e:
        raise ValueError(f"reward 'geneval': {model_type} detector options: {e}") from None
    return backend(path, device=device, **options)


def build_geneval_reward(detector_path: str | None, color_classifier_path: str | None = None,
                         color_processor_path: str | None = None, mode: str = "geneval", device: str | None = None,
                         detector_options: dict | None = None, version: str | None = None,
                         **thresholds) -> GenEvalReward:
    """GenEvalReward with the in-environment backends: OWL-ViT/OWLv2 or Mask2Former + CLIP colour classifier.

    ``detector_options`` go to the detector backend (see :func:`load_detector`); ``thresholds`` override
    GenEval's constants. Without ``color_classifier_path``, prompts with colour clauses raise a
    ValueError when scored.
    """
    from drpo_core.rewards.geneval.clip_color import ClipColorClassifier

    check_options(mode, thresholds)  # fail before loading any weights
    detector = load_detector(detector_path, device=device, **(detector_options or {}))
    classifier = ClipColorClassifier(color_classifier_path, color_processor_path, device=device) \
        if color_classifier_path else None
    return GenEvalReward(detector, classifier, mode=mode, version=version, **thresholds)


__all__ = [
    "COCO_CLASSES", "COLORS", "MODES", "RELATIONS", "TASKS", "Clause", "ColorClassifier", "Detections", "Detector",
    "Found", "GenEvalReward", "GenEvalSpec", "ImageVerdict", "Thresholds", "build_geneval_reward", "load_detector",
    "detections_from_per_class", "evaluate_exact", "evaluate_geneval", "keep_detections", "load_metadata_jsonl",
    "parse_metadata", "relative_position", "summarize",
]

"""``build_reward`` for the in-process model rewards: kinds "hps", "pickscore", "clip", "geneval".

``RewardConfig.path`` is the model file/folder; ``options`` are the reward class's keyword arguments
(checked against its signature before any weights load, so a typo is one ValueError line).
For geneval, ``options.detector_path`` (or ``path``) is the OWL-ViT/OWLv2 folder and
``options.color_classifier_path`` the CLIP folder of the colour classifier; ``options.detector: toy-shapes``
instead selects the shapes world's classical detector and palette colour classifier (no weights).
"""

from __future__ import annotations

import inspect

from drpo_core.config import RewardConfig
from drpo_core.rewards.common import require_local_path

MODEL_KINDS = ("hps", "pickscore", "clip", "geneval")


def _checked(cfg: RewardConfig, factory, **kwargs):
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"rewards[{cfg.label}].options: {e}") from None
    return factory(**kwargs)


def build_model_reward(cfg: RewardConfig):
    """Construct the model reward named by ``cfg.kind`` from local weights."""
    options = dict(cfg.options)
    if cfg.kind == "geneval" and options.get("detector") == "toy-shapes":
        from drpo_core.toyworld.detector import toy_geneval_reward

        options.pop("detector")
        return _checked(cfg, toy_geneval_reward, **options)
    if cfg.kind == "geneval":
        from drpo_core.rewards.geneval import build_geneval_reward

        detector_path = options.pop("detector_path", None) or cfg.path
        require_local_path(detector_path, "path (or options.detector_path)", "geneval", want="dir")
        return _checked(cfg, build_geneval_reward, detector_path=detector_path, **options)
    options.setdefault("batch_size", cfg.batch_size)
    if cfg.kind == "hps":
        from drpo_core.rewards.hps import HpsStyleReward

        require_local_path(cfg.path, "path", "hps", want="file")
        return _checked(cfg, HpsStyleReward, path=cfg.path, **options)
    if cfg.kind == "pickscore":
        from drpo_core.rewards.pickscore import PickScoreReward

        require_local_path(cfg.path, "path", "pickscore", want="dir")
        return _checked(cfg, PickScoreReward, path=cfg.path, **options)
    if cfg.kind == "clip":
        from drpo_core.rewards.clip_score import ClipScoreReward

        require_local_path(cfg.path, "path", "clip", want="dir")
        return _checked(cfg, ClipScoreReward, path=cfg.path, **options)
    raise ValueError(f"not a model reward kind: {cfg.kind!r} (expected one of {', '.join(MODEL_KINDS)})")

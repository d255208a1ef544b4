"""``build_reward`` for the in-process model rewards: kinds "hps", "pickscore", "clip", "geneval".

``RewardConfig.path`` is the model file/folder or a hub id resolved through the Hugging Face cache
(drpo_core/models/hub.py, with ``revision``); ``options`` are the reward class's keyword arguments
(checked against its signature before any weights load, so a typo is one ValueError line).
For geneval, ``options.detector_path`` (or ``path``) is the OWL-ViT/OWLv2 folder and
``options.color_classifier_path`` the CLIP folder of the colour classifier; ``options.detector: toy-shapes``
instead selects the shapes world's classical detector and palette colour classifier (no weights).
"""

from __future__ import annotations

import inspect

from drpo_core.config import RewardConfig
from drpo_core.models.hub import resolve_pretrained

MODEL_KINDS = ("hps", "pickscore", "clip", "geneval")


def _checked(cfg: RewardConfig, factory, **kwargs):
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"rewards[{cfg.label}].options: {e}") from None
    return factory(**kwargs)


def _resolve(cfg: RewardConfig, path: str | None, field: str, want: str) -> str:
    try:
        return str(resolve_pretrained(path, field, want=want, revision=cfg.revision))
    except ValueError as e:
        raise ValueError(f"reward {cfg.kind!r}: {e}") from None


def build_model_reward(cfg: RewardConfig):
    """Construct the model reward named by ``cfg.kind`` from local weights or the Hugging Face cache."""
    options = dict(cfg.options)
    for key in ("processor_path", "color_classifier_path", "color_processor_path"):  # companion folders: local or hub ids too
        if options.get(key):
            options[key] = _resolve(cfg, options[key], f"options.{key}", "dir")
    if cfg.kind == "geneval" and options.get("detector") == "toy-shapes":
        from drpo_core.toyworld.detector import toy_geneval_reward

        options.pop("detector")
        return _checked(cfg, toy_geneval_reward, **options)
    if cfg.kind == "geneval":
        from drpo_core.rewards.geneval import build_geneval_reward

        detector_path = _resolve(cfg, options.pop("detector_path", None) or cfg.path, "path (or options.detector_path)", "dir")
        return _checked(cfg, build_geneval_reward, detector_path=detector_path, **options)
    options.setdefault("batch_size", cfg.batch_size)
    if cfg.kind == "hps":
        from drpo_core.rewards.hps import HpsStyleReward

        return _checked(cfg, HpsStyleReward, path=_resolve(cfg, cfg.path, "path", "file"), **options)
    if cfg.kind == "pickscore":
        from drpo_core.rewards.pickscore import PickScoreReward

        return _checked(cfg, PickScoreReward, path=_resolve(cfg, cfg.path, "path", "dir"), **options)
    if cfg.kind == "clip":
        from drpo_core.rewards.clip_score import ClipScoreReward

        return _checked(cfg, ClipScoreReward, path=_resolve(cfg, cfg.path, "path", "dir"), **options)
    raise ValueError(f"not a model reward kind: {cfg.kind!r} (expected one of {', '.join(MODEL_KINDS)})")

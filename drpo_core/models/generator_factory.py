"""``load_generator``: the one-step generator class for ``model.kind``.

The factory sits above both classes (``generator.OneStepGenerator`` and its subclass
``generator_sdxl.SdxlOneStepGenerator``), so neither imports it back.
"""

from __future__ import annotations

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.generator import OneStepGenerator
from drpo_core.models.generator_sdxl import SdxlOneStepGenerator

__all__ = ["load_generator"]


def load_generator(model_cfg: ModelConfig, lora_cfg: LoraConfig) -> OneStepGenerator:
    """The generator class for ``model_cfg.kind`` (sd-turbo → OneStepGenerator, sdxl-turbo → SdxlOneStepGenerator)."""
    if model_cfg.kind == "sdxl-turbo":
        return SdxlOneStepGenerator(model_cfg, lora_cfg)
    return OneStepGenerator(model_cfg, lora_cfg)

"""The one configuration tree of a DrPO job: ``from drpo_core.config import DrpoConfig, load_config``.

* ``schema.py``: the sections (model, lora, features, rewards, prompts, algo, trainer, output), ``DrpoConfig``,
  ``load_config`` / ``dump_config``;
* ``algorithm_options.py``: ``algo.<kind>`` options of the objectives other than the DrPO drift, offline anchors;
* ``runtime.py``: ``runtime:``, the Ray actor–learner roles;
* ``overrides.py``: YAML 1.2 parsing, ``a.b=c`` overrides, :class:`ConfigError`;
* ``sections.py``: the :class:`Section` base (unknown keys are errors, validated configs are frozen).
"""

from drpo_core.config.algorithm_options import (DIFFERENTIABLE_REWARD_KINDS, DRIFT_KINDS, AlgoKind, AwrOptions, DpoOptions,
                                                DraftOptions, GrpoOptions, OfflineAnchorsOptions, RaftOptions)
from drpo_core.config.overrides import ConfigError, parse_yaml
from drpo_core.config.runtime import (GeneratorRoleConfig, LearnerRoleConfig, NodeTypeConfig, RewardRoleConfig, RoleConfig,
                                      RuntimeConfig)
from drpo_core.config.schema import (AlgoConfig, DrpoConfig, FeaturesConfig, LoraConfig, ModelConfig, OutputConfig, PromptsConfig,
                                     RewardConfig, RewardKind, TrainerConfig, dump_config, format_validation_error, load_config)
from drpo_core.config.sections import Section

__all__ = [
    "AlgoConfig", "AlgoKind", "AwrOptions", "ConfigError", "DIFFERENTIABLE_REWARD_KINDS", "DRIFT_KINDS", "DpoOptions",
    "DraftOptions", "DrpoConfig", "FeaturesConfig", "GeneratorRoleConfig", "GrpoOptions", "LearnerRoleConfig", "LoraConfig",
    "ModelConfig", "NodeTypeConfig", "OfflineAnchorsOptions", "OutputConfig", "PromptsConfig", "RaftOptions", "RewardConfig",
    "RewardKind", "RewardRoleConfig", "RoleConfig", "RuntimeConfig", "Section", "TrainerConfig", "dump_config",
    "format_validation_error", "load_config", "parse_yaml",
]

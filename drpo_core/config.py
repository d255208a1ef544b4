"""The one configuration tree of a DrPO job (pydantic), validated once and serialised into the job.

Sections: ``model``, ``lora``, ``features``, ``rewards`` (a list), ``prompts``, ``algo``, ``trainer``,
``output``; later runtime sections hang off the same root. Unknown keys are errors. Load with
:func:`load_config` from YAML files (later files override earlier ones) and ``a.b=c`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    kind: Literal["sd-turbo"] = "sd-turbo"
    path: str = Field("tiny", description="hub id, local pipeline folder, or 'tiny' for the embedded random model")
    resolution: int = Field(32, gt=0, description="image side in pixels; the latent side is resolution / vae factor")
    timestep: int = Field(999, ge=0, le=999)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")


class LoraConfig(Section):
    enabled: bool = Field(True, description="false trains the full UNet (a frozen base copy is kept for the reference drift)")
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(["to_q", "to_k", "to_v", "to_out.0"], description="module names, or one regex string")


class FeaturesConfig(Section):
    kind: Literal["latent_resnet"] = "latent_resnet"
    width: int = Field(32, gt=0)
    stage_blocks: list[int] = Field([1, 1], min_length=1)
    downsample: bool = False
    groups: int = Field(8, gt=0)
    patch_sizes: list[int] = [2, 4]
    checkpoint: str | None = Field(None, description="safetensors state dict; None keeps the seeded random init")
    seed: int = 1234


RewardKind = Literal["hue_fraction", "hps", "pickscore", "clip", "geneval", "http", "grpc", "flow_grpo"]


class RewardConfig(Section):
    """One entry of ``rewards:``. In-process scorers use ``path``/``options``; remote ones ``url`` etc."""

    kind: RewardKind = "hue_fraction"
    name: str | None = Field(None, description="label in metrics; defaults to kind")
    weight: float = Field(1.0, description="weight of this reward's per-prompt z-score in the ensemble")
    path: str | None = Field(None, description="local model file or folder (hps, pickscore, clip, geneval)")
    url: str | None = Field(None, description="http: POST endpoint; grpc: host:port")
    token_env: str | None = Field(None, description="environment variable holding a bearer token")
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(3, ge=0)
    batch_size: int = Field(64, gt=0)
    max_concurrency: int = Field(4, gt=0)
    allow_unsafe_pickle: bool = Field(False, description="flow_grpo only: its protocol unpickles responses")
    options: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the reward class")

    @property
    def label(self) -> str:
        return self.name or self.kind

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "RewardConfig":
        if self.kind in ("http", "grpc", "flow_grpo") and not self.url:
            raise ValueError(f"reward kind {self.kind!r} needs 'url'")
        if self.kind == "flow_grpo" and not self.allow_unsafe_pickle:
            raise ValueError("reward kind 'flow_grpo' unpickles server responses; set allow_unsafe_pickle: true "
                             "only for a server on a trusted network")
        return self


class PromptsConfig(Section):
    colors: list[str] = ["red", "green", "blue", "purple"]
    objects: list[str] = ["car", "apple", "house", "flower", "bird", "cup", "chair", "boat"]
    eval_objects: list[str] = ["kite", "lamp", "shoe", "vase"]
    template: str = "a photo of a {color} {object}"
    file: str | None = Field(None, description="a text file with one training prompt per line (overrides colors/objects)")


class AlgoConfig(Section):
    num_candidates: int = Field(16, description="K, candidates sampled per prompt")
    num_anchors: int = Field(4, description="M, positives (top-M) and negatives (bottom-M) per prompt")
    radii: list[float] = Field([0.02, 0.05, 0.2], min_length=1)
    kernel: Literal["laplacian", "rbf", "cosine"] = "laplacian"
    field_form: Literal["mean_shift", "kernel_gradient"] = "mean_shift"
    pos_weight: float = Field(3000.0, gt=0)
    neg_weight: float = Field(3000.0, gt=0)
    ref_weight: float = Field(3000.0, gt=0)
    ref_neg_weight: float = Field(3000.0, gt=0)
    lambda_ref: float = Field(0.2, ge=0, description="λ_ref, weight of the reference drift toward the frozen base")
    binary_threshold: float | None = Field(None, description="binary reward: pass if score >= threshold")
    max_extra_rounds: int = Field(3, ge=0, description="binary reward: extra K-candidate rounds to find M passes and M fails")
    shuffle_rewards: bool = Field(False, description="control run: shuffle scores within each prompt group before ranking")

    @field_validator("radii")
    @classmethod
    def _positive_radii(cls, v: list[float]) -> list[float]:
        if any(r <= 0 for r in v):
            raise ValueError("every radius must be > 0")
        return v

    @field_validator("num_candidates")
    @classmethod
    def _k_at_least_two(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"K must be >= 2 to rank candidates (with K={v} every target equals the sample), got {v}")
        return v

    @field_validator("num_anchors")
    @classmethod
    def _m_positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"M must be >= 1, got {v}")
        return v

    @model_validator(mode="after")
    def _group_sizes(self) -> "AlgoConfig":
        if 2 * self.num_anchors > self.num_candidates:
            raise ValueError(f"2*num_anchors (2M={2 * self.num_anchors}) exceeds num_candidates (K={self.num_candidates}); "
                             "top-M and bottom-M must be disjoint")
        return self


class TrainerConfig(Section):
    steps: int = Field(300, ge=0, description="optimizer steps")
    prompts_per_step: int = Field(2, gt=0)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    seed: int = 42
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    log_every: int = Field(1, gt=0)
    sample_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    eval_seeds: int = Field(4, gt=0, description="held-out seeds per prompt for sample grids")


class OutputConfig(Section):
    dir: str = "runs/default"


class DrpoConfig(Section):
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    features: FeaturesConfig = FeaturesConfig()
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig()], min_length=1)
    prompts: PromptsConfig = PromptsConfig()
    algo: AlgoConfig = AlgoConfig()
    trainer: TrainerConfig = TrainerConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _unique_reward_labels(self) -> "DrpoConfig":
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"reward names must be unique, got {labels}; set 'name' on repeated kinds")
        return self


class ConfigError(ValueError):
    """A user error in the configuration; the message is one line naming the field and why."""


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _apply_override(tree: dict, assignment: str) -> dict:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, raw = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: dict = {}
    leaf = node
    for key in keys[:-1]:
        leaf[key] = {}
        leaf = leaf[key]
    leaf[keys[-1]] = value
    return _merge(tree, node)


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def load_config(files: list[str | Path] = (), overrides: list[str] = (), base: dict | None = None) -> DrpoConfig:
    """Merge YAML ``files`` in order, then ``key.path=value`` ``overrides``; validate once.

    Raises :class:`ConfigError` with a one-line message on any user error.
    """
    tree: dict = dict(base or {})
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = _merge(tree, loaded)
    for assignment in overrides:
        tree = _apply_override(tree, assignment)
    try:
        return DrpoConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

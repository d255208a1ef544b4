"""The one configuration tree of a DrPO job (pydantic), validated once and serialised into the job.

Sections: ``model``, ``lora``, ``features``, ``rewards`` (a list), ``prompts``, ``algo``, ``trainer``,
``output``; later runtime sections hang off the same root. Unknown keys are errors. Load with
:func:`load_config` from YAML files (later files override earlier ones) and ``a.b=c`` overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from drpo_core.sections import Section
from drpo_core.runtime_config import GeneratorRoleConfig, LearnerRoleConfig, RewardRoleConfig, RoleConfig, RuntimeConfig  # noqa: F401 (re-exported)
from drpo_core.overrides import ConfigError, _apply_override, _merge, parse_yaml  # noqa: F401 (re-exported)
from drpo_core.algorithm_options import (DIFFERENTIABLE_REWARD_KINDS, AlgoKind, AwrOptions, DpoOptions, DraftOptions,
                                         GrpoOptions, OfflineAnchorsOptions, RaftOptions)


class ModelConfig(Section):
    kind: Literal["sd-turbo", "sdxl-turbo"] = Field("sd-turbo", description="sd-turbo: SD 1.x/2.x UNet, one CLIP encoder; "
                                                    "sdxl-turbo: SDXL UNet, two CLIP encoders, pooled embeds + time ids")
    path: str = Field("tiny", description="hub id, local pipeline folder, or 'tiny' / 'tiny-sdxl' for the embedded random models")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub-id path")
    variant: str | None = Field(None, description="diffusers weight variant, e.g. 'fp16' (unet/diffusion_pytorch_model.fp16.safetensors)")
    resolution: int = Field(32, gt=0, description="image side in pixels; the latent side is resolution / vae factor")
    timestep: int = Field(999, ge=0, le=999)
    x0: Literal["pipeline", "official"] = Field("pipeline", description="clean-latent conversion: 'pipeline' = the stock "
                                                "one-step diffusers pipeline (x_t = √(1−ᾱ)ε, scheduler x0); 'official' = "
                                                "the official SD-Turbo code (UNet on ε, x0 = ((ε − 0.9977ε̂)/0.0683)·0.9996 + 0.0292ε̂)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("auto", description="'auto' picks cuda when available, else cpu")
    # speed / memory options (all off by default: on CPU they do not help)
    merge_lora_for_sampling: bool = Field(False, description="sample with the LoRA merged into the base weights "
                                          "(restored exactly afterwards); Ray generator actors stay merged between "
                                          "weight versions (one merge per version)")
    channels_last: bool = Field(False, description="UNet and VAE in channels-last memory format (faster convs on GPU)")
    attention: Literal["default", "sdpa", "classic"] = Field("default", description="attention processor: the library "
                                                              "default, torch SDPA, or the explicit softmax one")
    vae_tiling: bool = Field(False, description="decode large images tile by tile (less memory)")
    vae_slicing: bool = Field(False, description="decode one image at a time (less memory)")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward (learner memory)")

    @model_validator(mode="after")
    def _official_x0_is_sd_turbo_at_999(self) -> "ModelConfig":
        if self.x0 == "official" and (self.kind != "sd-turbo" or self.timestep != 999):
            raise ValueError("model.x0 'official' is SD-Turbo's one-step conversion at t=999 (its constants); "
                             f"kind {self.kind!r} at timestep {self.timestep} needs x0: pipeline")
        return self

    @model_validator(mode="after")
    def _tiny_path_matches_kind(self) -> "ModelConfig":
        expected = {"tiny": "sd-turbo", "tiny-sdxl": "sdxl-turbo"}.get(self.path)
        if expected and expected != self.kind:
            raise ValueError(f"model.path {self.path!r} is the embedded {expected} model; set model.kind: {expected}")
        return self


class LoraConfig(Section):
    enabled: bool = Field(True, description="false trains the full UNet (a frozen base copy is kept for the reference drift)")
    rank: int = Field(16, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = Field(["to_q", "to_k", "to_v", "to_out.0"], description="module names, or one regex string")
    init_from: str | None = Field(None, description="start from an existing UNet LoRA: a drpo run/checkpoint/export folder, a "
                                  "PEFT adapter or diffusers LoRA folder, local or a hub id (rank and targets must match)")
    init: Literal["default", "gaussian"] = Field("default", description="LoRA A init (B=0 either way): 'default' = peft's "
                                                 "Kaiming-uniform (the official code); 'gaussian' = N(0, 1/r)")


class FeaturesConfig(Section):
    """The frozen feature encoder φ (drpo-method.md §1.6.4). Fields apply to the kinds their descriptions name."""

    kind: Literal["latent_resnet", "latent_mae", "unet_hidden", "dinov2", "vit_mae", "random_pixel"] = Field(
        "latent_resnet", description="latent_resnet: our SiLU ResNet on latents (optionally norm-free; the tuned tiny "
        "default); latent_mae: the official latent-MAE encoder (ReLU, GroupNorm, official checkpoint layout); "
        "unet_hidden: frozen base-UNet hidden states; dinov2 / vit_mae: pixel ViT on VAE-decoded images; random_pixel: "
        "frozen random-conv statistics of VAE-decoded images (no weights; the shapes world)")
    width: int = Field(32, gt=0, description="latent_resnet / latent_mae without checkpoint: width C of the first stage")
    stage_blocks: list[int] = Field([1, 1], min_length=1, description="latent_resnet / latent_mae without checkpoint: "
                                    "blocks per stage ([3,4,6,3] = latent-MAE)")
    keys: list[str] | None = Field(None, description="latent_mae: feature keys (default: the SD-Turbo recipe's six "
                                   "layer4 keys _mean/_std/_mean_2/_std_2/_mean_4/_std_4); dinov2 / vit_mae: default the "
                                   "official layer{l}_patch_mean/_patch_std/_cls, or also layer{l}_patch_mean_p/_std_p")
    block_stride: int = Field(2, ge=0, description="latent_mae: layerN_blk{b} keys every block_stride blocks (0 = none)")
    include_norm_x: bool = Field(False, description="latent_mae: offer the input-RMS key norm_x")
    downsample: bool = Field(False, description="latent_resnet: stride 2 at the first block of every stage after the first")
    groups: int = Field(8, ge=0, description="latent_resnet: GroupNorm groups; 0 = no normalisation (random encoders)")
    patch_sizes: list[int] = Field([2, 4], description="p×p patch mean/std keys besides the global ones")
    checkpoint: str | None = Field(None, description="latent_resnet: safetensors state dict (a file, a folder with "
                                   "model.safetensors, or 'toy' = the shapes world's scene encoder); latent_mae: the official "
                                   ".pth (or .safetensors with its keys); None keeps the seeded random init")
    seed: int = Field(1234, description="latent_resnet / random_pixel: random init; unet_hidden: the fixed noise added to the latent")
    path: str | None = Field(None, description="dinov2 / vit_mae: hub id or local folder (default facebook/dinov2-base, "
                             "facebook/vit-mae-base)")
    layers: list[str] | list[int] | None = Field(None, description="unet_hidden: UNet module names (default: last down "
                                                 "block up to down_blocks.2, mid_block, up_blocks.0); dinov2 / vit_mae: "
                                                 "hidden-state indices (default: 4 evenly spaced / the last)")
    timestep: int = Field(100, ge=0, le=999, description="unet_hidden: UNet timestep")
    noise_scale: float = Field(0.1, ge=0, description="unet_hidden: input = latent + noise_scale · fixed noise")
    pool_grid: int = Field(4, gt=0, description="unet_hidden: pooled_points: pool to a pool_grid² grid; official: "
                           "pool_grid×pool_grid average-pool stride")
    unet_mode: Literal["pooled_points", "official"] = Field("pooled_points", description="unet_hidden: 'official' = the "
                                                            "official teacher-UNet φ (prompt-conditioned, fresh noise per "
                                                            "call, stride-pool_grid average pool flattened to one vector "
                                                            "per image and layer); 'pooled_points' = ours (empty prompt, "
                                                            "one fixed noise, pool_grid² points of dim C + mean/std keys)")

    @field_validator("patch_sizes")
    @classmethod
    def _positive_patches(cls, v: list[int]) -> list[int]:
        if any(p < 1 for p in v):
            raise ValueError("every patch size must be >= 1")
        return v

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> "FeaturesConfig":
        if self.checkpoint is not None and self.kind not in ("latent_resnet", "latent_mae"):
            raise ValueError(f"'checkpoint' is for kinds latent_resnet / latent_mae; kind {self.kind!r} loads weights from 'path'")
        if self.keys is not None and self.kind not in ("latent_mae", "dinov2", "vit_mae"):
            raise ValueError(f"'keys' is for kinds latent_mae / dinov2 / vit_mae, not {self.kind!r}")
        if self.path is not None and self.kind not in ("dinov2", "vit_mae"):
            raise ValueError(f"'path' is for kinds dinov2 / vit_mae, not {self.kind!r}")
        return self


RewardKind = Literal["hue_fraction", "soft_hue", "hps", "pickscore", "clip", "geneval", "http", "grpc", "flow_grpo"]


class RewardConfig(Section):
    """One entry of ``rewards:``. In-process scorers use ``path``/``options``; remote ones ``url`` etc."""

    kind: RewardKind = "hue_fraction"
    name: str | None = Field(None, description="label in metrics; defaults to kind")
    weight: float = Field(1.0, description="weight of this reward's per-prompt z-score in the ensemble")
    path: str | None = Field(None, description="model folder (pickscore, clip, geneval) or file (hps): a local path or a hub id "
                             "(org/name; hps: org/name/file) found in the Hugging Face cache")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of a hub-id path")
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
    file: str | None = Field(None, description="training prompts, one per line; or .jsonl with a 'prompt' key and per-prompt "
                             "metadata for the rewards (GenEval's format); overrides colors/objects")
    eval_file: str | None = Field(None, description="held-out prompts for `drpo eval` (same formats as file); "
                                  "default: the colours with eval_objects")


class AlgoConfig(Section):
    kind: AlgoKind = Field("drpo", description="objective: drpo (drift), drpo-awr / -topk / -hard / -advsign "
                           "(reward-weighted drifts), or a baseline: draft, dpo, grpo, raft (docs/baselines.md)")
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
    latent_l2_weight: float = Field(0.0, ge=0, description="β_l2: + β·MSE(policy latents, frozen-base latents) per prompt "
                                    "(official ref_model_l2_weight; 0 in the official DrPO scripts)")
    feature_l2_weight: float = Field(0.0, ge=0, description="γ_feat: + γ·Σ_keys MSE(φ(policy), φ(base)) per prompt "
                                     "(official frozen_feature_l2_weight; 0 in the official scripts)")
    key_aggregation: Literal["sum", "mean"] = Field("sum", description="combine the per-key losses by sum (the official "
                                                    "SD-Turbo recipe) or mean (the official SDXL trainer)")
    binary_threshold: float | None = Field(None, description="binary reward: pass if score >= threshold")
    max_extra_rounds: int = Field(3, ge=0, description="binary reward: extra K-candidate rounds to find M passes and M fails")
    binary_rule: Literal["pools", "first_k"] = Field("pools", description="binary reward: 'pools' = the official GenEval "
                                                     "rule (pass/fail pools capped at M by seeded random draws, random "
                                                     "anchors, only the positives regressed, skipped prompts count as "
                                                     "zero-loss slots of the prompt mean); 'first_k' = ours (best passes "
                                                     "/ worst fails, the first K candidates regressed, skipped prompts "
                                                     "leave the mean)")
    shuffle_rewards: bool = Field(False, description="control run: shuffle scores within each prompt group before ranking")
    stale_anchors: Literal["current", "sampled"] = Field(
        "current", description="anchors of a group sampled with older weights (the Ray runtime's overlap): 'current' = "
        "where the policy now maps their noises (a lagged step is the on-policy step with the older ranking); "
        "'sampled' = the scored latents as they were (a stale copy of each regressed point sits among the "
        "anchors; docs/ray.md 'Staleness')")
    # options of the other objectives and of offline anchors (drpo_core/algorithm_options.py)
    draft: DraftOptions = DraftOptions()
    dpo: DpoOptions = DpoOptions()
    grpo: GrpoOptions = GrpoOptions()
    raft: RaftOptions = RaftOptions()
    awr: AwrOptions = AwrOptions()
    offline: OfflineAnchorsOptions = OfflineAnchorsOptions()

    @property
    def needs_base(self) -> bool:
        """Whether the frozen base's outputs are needed (reference drift, β_l2 or γ_feat)."""
        return self.lambda_ref > 0 or self.latent_l2_weight > 0 or self.feature_l2_weight > 0

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
    micro_batch_prompts: int = Field(0, ge=0, description="prompts per forward/backward chunk (gradient accumulation); 0 = all")
    sample_threads: int = Field(1, ge=1, le=8, description="in-process trainer: threads that decode a step's prompt "
                                "groups (one VAE call per group, as sequentially) while the main thread runs the next "
                                "UNet calls; the same kernels on the same inputs, so results are unchanged")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.0, ge=0, lt=1, description="β of an exponential moving average of the trained weights "
                             "(0 = off); evaluation, the final grids and exports use it, sampling does not")
    seed: int = 42
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    log_every: int = Field(1, gt=0)
    sample_every: int = Field(100, gt=0)
    checkpoint_every: int = Field(100, gt=0)
    eval_seeds: int = Field(4, gt=0, description="held-out seeds per prompt for sample grids")
    heldout_eval_seeds: int = Field(16, ge=0, description="held-out seeds per held-out prompt for the final base-vs-policy eval (0 = off)")


class OutputConfig(Section):
    dir: str = Field("runs/default", description="run folder: config, metrics.jsonl, tensorboard/, samples/, checkpoints/")
    tracker: Literal["tensorboard", "wandb", "both", "none"] = Field(
        "tensorboard", description="live curves and sample grids: TensorBoard event files in <dir>/tensorboard, "
        "Weights & Biases (pip install wandb), both, or none (metrics.jsonl is always written)")
    run_name: str | None = Field(None, description="W&B run name (default: the run folder's name)")
    wandb_project: str = Field("drpo", description="W&B project")
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode; None lets WANDB_MODE / the login decide (offline: `wandb sync` later)")

    @field_validator("dir")
    @classmethod
    def _dir_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a folder (got an empty string)")
        return v


class DrpoConfig(Section):
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    features: FeaturesConfig = FeaturesConfig()
    rewards: list[RewardConfig] = Field(default_factory=lambda: [RewardConfig()], min_length=1)
    prompts: PromptsConfig = PromptsConfig()
    algo: AlgoConfig = AlgoConfig()
    trainer: TrainerConfig = TrainerConfig()
    output: OutputConfig = OutputConfig()
    runtime: RuntimeConfig = RuntimeConfig()

    @model_validator(mode="after")
    def _unique_reward_labels(self) -> "DrpoConfig":
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"reward names must be unique, got {labels}; set 'name' on repeated kinds")
        return self

    @model_validator(mode="after")
    def _objective_fits_rewards(self) -> "DrpoConfig":
        if self.algo.kind == "draft":
            for r in self.rewards:
                if r.kind not in DIFFERENTIABLE_REWARD_KINDS:
                    raise ValueError(f"algo.kind 'draft' backpropagates through the reward, but reward {r.label!r} "
                                     f"(kind {r.kind}) is not differentiable; use one of {list(DIFFERENTIABLE_REWARD_KINDS)}")
        if self.algo.grpo.num_anchors > self.algo.num_candidates:
            raise ValueError(f"algo.grpo.num_anchors ({self.algo.grpo.num_anchors}) exceeds num_candidates ({self.algo.num_candidates})")
        if self.model.dtype == "bfloat16" and self.runtime.weight_sync_dtype == "float16":
            raise ValueError("runtime.weight_sync_dtype float16 cannot hold the range of bfloat16 model weights; "
                             "use bfloat16 or auto")
        if self.algo.offline.dataset and self.algo.kind != "drpo":
            raise ValueError(f"algo.offline.dataset gives DrPO anchors; algo.kind {self.algo.kind!r} does not use them")
        return self


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
            loaded = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree = _merge(tree, loaded)
    defaults = DrpoConfig().model_dump(mode="json")  # lists the files did not set (rewards.0.weight=2) start from these
    for assignment in overrides:
        tree = _apply_override(tree, assignment, defaults)
    try:
        return DrpoConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

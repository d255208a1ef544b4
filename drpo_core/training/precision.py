"""Mixed precision of every role, from one setting: ``trainer.mixed_precision`` (auto | no | bf16 | fp16).

    auto  bf16 autocast on CUDA; fp32 elsewhere (CPU autocast is slower than fp32 for these small convs)
    no    fp32 everywhere (the weights stay in ``model.dtype``)
    bf16  bf16 autocast on any device, the CPU included (how the dtype paths are tested without a GPU)
    fp16  fp16 autocast on any device, with loss scaling (GradScaler) in the learner

What stays fp32 whatever the setting, and why:

- the trained weights (LoRA or full UNet) and AdamW's state: steps of ~lr·1e-3 vanish below half precision;
- the drift field and its regression (:func:`autocast_off`): distances between nearby features
  (‖a‖² + ‖b‖² − 2a·b) lose all their digits in a bf16 matmul, and the joint softmax masses with them;
- SDXL's VAE under fp16 (``force_upcast``): its activations overflow fp16's 65504;
- rewards: an in-process model reward (hps, pickscore, clip) scores in the run's half precision when
  ``mixed_precision`` is bf16 / fp16 and its ``options.dtype`` is unset; otherwise its own dtype (default fp32).
  Pixel rewards are fp32 statistics; remote rewards run on their server.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16"]
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
_AUTOCAST_DEVICES = ("cpu", "cuda")


def resolve_precision(device: torch.device | str, mixed_precision: str) -> Precision:
    """The compute precision ``trainer.mixed_precision`` means on ``device``."""
    device = torch.device(device)
    if mixed_precision in ("bf16", "fp16"):
        return mixed_precision
    if mixed_precision == "auto" and device.type == "cuda":
        return "bf16"
    return "fp32"


def autocast_context(device: torch.device | str, mixed_precision: str):
    """Autocast to the precision :func:`resolve_precision` gives (a no-op for fp32)."""
    precision = resolve_precision(device, mixed_precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=HALF[precision])


def needs_grad_scaler(device: torch.device | str, mixed_precision: str) -> bool:
    """Loss scaling against fp16 gradient underflow: exactly when the learner computes in fp16."""
    return resolve_precision(device, mixed_precision) == "fp16"


@contextlib.contextmanager
def autocast_off():
    """Autocast disabled on every device type that has it on (the tensors' own dtypes decide again)."""
    with contextlib.ExitStack() as stack:
        for device_type in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _fp32(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
        return value.float()  # differentiable: the gradient flows back in the caller's dtype
    return value


def full_precision(fn):
    """Decorator: ``fn`` runs with autocast off and its floating tensor arguments in fp32 (fp64 kept, for oracles)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*[_fp32(a) for a in args], **{k: _fp32(v) for k, v in kwargs.items()})

    return wrapper


def autocast_dtype() -> torch.dtype | None:
    """The half dtype an enclosing autocast applies (CPU or CUDA), or None outside autocast."""
    for device_type in _AUTOCAST_DEVICES:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return None


HALF_CAPABLE_REWARDS = ("hps", "pickscore", "clip")  # in-process model rewards with an autocast ``dtype`` option


def reward_at_run_precision(reward_cfg, mixed_precision: str):
    """``reward_cfg`` (a RewardConfig) with ``options.dtype`` = the run's half precision when the run asks for one
    explicitly (bf16 / fp16) and the reward sets none. ``auto`` leaves rewards at their own default (fp32): a
    reward's score is the measurement, so it changes precision only when asked."""
    if mixed_precision not in HALF or reward_cfg.kind not in HALF_CAPABLE_REWARDS or reward_cfg.options.get("dtype"):
        return reward_cfg
    return reward_cfg.model_copy(update={"options": {**reward_cfg.options, "dtype": mixed_precision}})


def _reward_precision(reward_cfg, mixed_precision: str) -> str:
    if reward_cfg.kind in ("http", "grpc", "flow_grpo"):
        return "remote (the server's own)"
    if reward_cfg.kind in ("hue_fraction", "soft_hue"):
        return "fp32 (pixel statistics)"
    dtype = reward_at_run_precision(reward_cfg, mixed_precision).options.get("dtype")
    return f"{dtype} autocast" if dtype else "fp32"


def precision_report(cfg, device: torch.device | str) -> dict[str, str]:
    """Per role, the precision a run of ``cfg`` (a DrpoConfig) computes in on ``device``: printed at start."""
    run = resolve_precision(device, cfg.trainer.mixed_precision)
    weights = cfg.model.dtype
    compute = f"{run} autocast" if run != "fp32" else "fp32"
    if run == "fp32" and weights != "float32":
        compute = f"{weights} (no autocast)"
    vae = ", VAE fp32 (force_upcast)" if cfg.model.kind == "sdxl-turbo" and run == "fp16" else ""
    scaler = "GradScaler on" if run == "fp16" else "no loss scaling"
    return {
        "sampler": f"{compute} over {weights} weights{vae}",
        "reward": ", ".join(f"{r.label} {_reward_precision(r, cfg.trainer.mixed_precision)}" for r in cfg.rewards),
        "learner": f"{compute}, fp32 trained weights and AdamW, drift in fp32, {scaler}",
        "features": f"{cfg.features.kind} {compute if run != 'fp32' else 'fp32'}",
    }


def format_precision(report: dict[str, str]) -> str:
    """One line: ``precision: sampler … · reward … · learner … · features …``."""
    return "precision: " + " · ".join(f"{role} {what}" for role, what in report.items())

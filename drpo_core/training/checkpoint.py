"""Checkpoints without pickle: safetensors for tensors, JSON for everything else.

Layout of ``checkpoints/step_<N>/``::

    pytorch_lora_weights.safetensors   LoRA in the diffusers layout (pipe.load_lora_weights loads it)
    unet/                              full fine-tuning only: the UNet (save_pretrained, safetensors)
    trainable.safetensors              the trained tensors in peft naming (exact resume)
    ema.safetensors                    trainer.ema_decay > 0: their moving average, same names; the LoRA file
                                       and unet/ above then hold the average too (what users load)
    optimizer.safetensors              optimizer state tensors + RNG states
    state.json                         step, weight version, sampler position, scheduler and
                                       optimizer hyper-parameters, base-model identity, the model
                                       and LoRA config (drpo export rebuilds the pipeline from them)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


EMA_FILE = "ema.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or from a different base model."""


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"opt.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, *, generator, learner, step: int, sampler_state: dict, extra: dict | None = None) -> Path:
    """Write a complete checkpoint atomically (a temp folder renamed into place)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainable = generator.trainable_state_dict()
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    ema = getattr(learner, "ema", None)
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / EMA_FILE))
    with ema.applied() if ema is not None else contextlib.nullcontext():  # the deployable files hold θ_ema
        if generator.lora_cfg.enabled:
            export_lora(generator, tmp)
        else:
            generator.unet.save_pretrained(tmp / "unet")
    learner_state = learner.state()
    opt_tensors, opt_meta = _flatten_optimizer(learner_state["optimizer"])
    opt_tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            opt_tensors[f"rng.cuda{i}"] = s
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "step": step,
        "version": learner_state["version"],
        "sampler": sampler_state,
        "scheduler": learner_state["scheduler"],
        "scaler": learner_state.get("scaler") or None,
        "optimizer": opt_meta,
        "base_model": model_identity(generator),
        "model": generator.cfg.model_dump(mode="json"),
        "lora": generator.lora_cfg.model_dump(mode="json"),
        "ema": None if ema is None else {"decay": ema.decay, "steps": ema.steps},
        **(extra or {}),
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=2, default=float))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def export_lora(generator, folder: Path) -> None:
    """LoRA weights in the diffusers layout (``pytorch_lora_weights.safetensors``) for the generator's
    pipeline class; the peft config (rank, alpha, targets) rides along as metadata, so
    ``pipe.load_lora_weights`` restores the scale α/r even when α ≠ r."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(generator.unet))
    metadata = generator.unet.peft_config["default"].to_dict()
    getattr(diffusers, generator.pipeline_class).save_lora_weights(
        folder, unet_lora_layers=layers, safe_serialization=True, unet_lora_adapter_metadata=metadata)


def model_identity(generator) -> dict:
    """What a checkpoint must match to be resumed: the base UNet architecture and LoRA shape."""
    cfg = generator.unet.config
    return {"kind": generator.KIND, "unet_class": type(generator.unet).__name__,
            "block_out_channels": list(cfg.block_out_channels), "cross_attention_dim": cfg.cross_attention_dim,
            "in_channels": cfg.in_channels, "addition_embed_type": cfg.get("addition_embed_type")}


def load_checkpoint(folder: Path, *, generator, learner) -> dict:
    """Restore weights, optimizer, scheduler, RNG and version; returns the JSON state (step, sampler...)."""
    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise CheckpointError(f"{folder} is not a drpo checkpoint (state.json missing)")
    state = json.loads(state_file.read_text())
    ours = model_identity(generator)
    if state["base_model"] != ours:
        diff = ", ".join(f"{k} {state['base_model'].get(k)!r} vs {ours.get(k)!r}" for k in sorted(set(ours) | set(state["base_model"]))
                         if state["base_model"].get(k) != ours.get(k))
        raise CheckpointError(f"checkpoint {folder} was trained on a different base model (checkpoint vs model.path "
                              f"{generator.cfg.path!r}: {diff})")
    if state["lora"]["enabled"] != generator.lora_cfg.enabled:
        raise CheckpointError(f"checkpoint {folder} has lora.enabled={state['lora']['enabled']}, config has {generator.lora_cfg.enabled}")
    if generator.lora_cfg.enabled:  # the shape-defining LoRA fields, named, instead of a state-dict size mismatch
        ours_lora = generator.lora_cfg.model_dump(mode="json")
        differ = [f"lora.{k}={state['lora'][k]!r} (config: {ours_lora[k]!r})" for k in ("rank", "target_modules")
                  if k in state["lora"] and state["lora"][k] != ours_lora[k]]
        if differ:
            raise CheckpointError(f"checkpoint {folder} was trained with {', '.join(differ)}; resume with the checkpoint's "
                                  "LoRA settings, or start a new run (lora.init_from starts from its weights)")
    trainable = load_file(str(folder / "trainable.safetensors"))
    try:
        generator.load_trainable_state_dict({k: v.to(generator.device) for k, v in trainable.items()})
    except (RuntimeError, ValueError) as e:
        detail = next((line.strip() for line in str(e).splitlines() if "mismatch" in line or "Missing" in line or "Unexpected" in line),
                      str(e).splitlines()[0])
        raise CheckpointError(f"checkpoint {folder} does not fit this model: {detail}") from None
    ema = getattr(learner, "ema", None)
    if ema is not None and (folder / EMA_FILE).is_file():
        ema.load_state_dict(load_file(str(folder / EMA_FILE)), (state.get("ema") or {}).get("steps", state["version"]))
    elif ema is not None:  # a checkpoint of a run without an average: average from here on
        ema.reset()
    tensors = load_file(str(folder / "optimizer.safetensors"))
    learner.load_state({"optimizer": _unflatten_optimizer(tensors, state["optimizer"]),
                        "scheduler": state["scheduler"], "version": state["version"], "scaler": state.get("scaler")})
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda")), key=lambda k: int(k[8:]))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state


def trained_weights_file(folder: Path, weights: str = "auto") -> Path:
    """The file of a checkpoint's trained tensors: ``ema`` (the moving average), ``raw`` (the optimizer's
    weights) or ``auto`` (the average when the run kept one). CheckpointError if ``ema`` is asked of a run without."""
    folder = Path(folder)
    if weights not in ("auto", "ema", "raw"):
        raise CheckpointError(f"weights {weights!r} is not one of auto, ema, raw")
    if weights == "ema" and not (folder / EMA_FILE).is_file():
        raise CheckpointError(f"checkpoint {folder} has no moving average ({EMA_FILE}): its run had trainer.ema_decay 0; "
                              "use the raw weights")
    if weights != "raw" and (folder / EMA_FILE).is_file():
        return folder / EMA_FILE
    return folder / "trainable.safetensors"


_STEP_FOLDER = re.compile(r"step_(\d+)")


def checkpoint_step(folder: Path) -> int | None:
    """N of a complete ``step_N`` checkpoint folder; None for anything else (``step_N.tmp`` left by a crash
    mid-save, stray files, a folder without ``state.json``)."""
    match = _STEP_FOLDER.fullmatch(Path(folder).name)
    return int(match.group(1)) if match and (Path(folder) / "state.json").is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder (torn ``*.tmp`` folders are ignored), or None."""
    folders = [p for p in (Path(run_dir) / "checkpoints").glob("step_*") if checkpoint_step(p) is not None]
    return max(folders, key=checkpoint_step) if folders else None

"""``drpo export``: a training checkpoint → files that stock diffusers loads with no drpo code.

    OUT/pytorch_lora_weights.safetensors   pipe.load_lora_weights(OUT) on the base pipeline (LoRA runs)
    OUT/model_index.json, unet/, vae/ ...  --full-pipeline: AutoPipelineForText2Image.from_pretrained(OUT),
                                           the LoRA fused into the UNet (or the fine-tuned full UNet)
    OUT/adapter_config.json, adapter_model.safetensors
                                           the same LoRA as a PEFT adapter: PeftModel.from_pretrained(pipe.unet, OUT)
    OUT/README.md                          a Hugging Face model card (base model, rewards, held-out eval, usage)
    OUT/drpo_export.json                   provenance: checkpoint, step, base model, how to sample

Both reproduce the trainer's one-step samples: ``pipe(prompt, num_inference_steps=1, guidance_scale=0,
latents=ε, height=R, width=R)`` with ε the candidate noise (see generator.py on why this is exact).
The base pipeline is rebuilt from the model config that the checkpoint's state.json records.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from drpo_core.training.checkpoint import EMA_FILE, latest_checkpoint
from drpo_core.models.generator import resolve_model_path
from drpo_core.models.model_arch import KIND_PIPELINE
from drpo_core.models.model_card import write_model_card, write_peft_adapter

LORA_FILE = "pytorch_lora_weights.safetensors"


class ExportError(ValueError):
    """The checkpoint cannot be exported as asked, or the output folder already holds an export."""


def _checkpoint_state(checkpoint: Path) -> tuple[Path, dict]:
    folder = latest_checkpoint(checkpoint) or checkpoint  # a run folder means its newest checkpoint
    if not (folder / "state.json").is_file():
        raise ExportError(f"--checkpoint {checkpoint}: not a drpo checkpoint or run folder (no state.json)")
    state = json.loads((folder / "state.json").read_text())
    if "model" not in state:
        raise ExportError(f"checkpoint {folder} does not record its model config (written by an older drpo); "
                          "re-save it with this version")
    return folder, state


def export_checkpoint(checkpoint: Path, out: Path, full_pipeline: bool = False) -> dict[str, str]:
    """Write the exports of ``checkpoint`` into ``out``; returns ``{what: path}``."""
    folder, state = _checkpoint_state(Path(checkpoint))
    model, lora = state["model"], state["lora"]
    out = Path(out)
    if out.exists() and any((out / name).exists() for name in (LORA_FILE, "model_index.json")):
        raise ExportError(f"--out {out} already holds an export; choose another folder (nothing was overwritten)")
    if not lora["enabled"] and not full_pipeline:
        raise ExportError(f"checkpoint {folder} fine-tuned the full UNet: it has no LoRA weights; pass --full-pipeline")
    base_path = resolve_model_path(model["path"], model.get("revision"))
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if lora["enabled"]:
        shutil.copy2(folder / LORA_FILE, out / LORA_FILE)
        written["lora"] = str(out / LORA_FILE)
        written["peft"] = str(write_peft_adapter(folder, state, out))
    if full_pipeline:
        import diffusers

        dtype = getattr(torch, model["dtype"])
        try:
            pipe = getattr(diffusers, KIND_PIPELINE[model["kind"]]).from_pretrained(base_path, dtype=dtype, variant=model.get("variant"))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot load the base model {model['path']!r} the checkpoint was trained on: "
                              f"{str(e).splitlines()[0]}") from None
        if lora["enabled"]:
            pipe.load_lora_weights(str(folder), weight_name=LORA_FILE)
            pipe.fuse_lora()
            pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter modules
        else:
            pipe.register_modules(unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype))
        pipe.save_pretrained(out)
        written["pipeline"] = str(out)
    provenance = {"checkpoint": str(folder.resolve()), "step": state["step"], "version": state["version"],
                  "base_model": model["path"], "kind": model["kind"], "resolution": model["resolution"],
                  "lora": lora, "weights": "ema" if (folder / EMA_FILE).is_file() else "raw",  # the moving average or θ
                  "sample_with": {"num_inference_steps": 1, "guidance_scale": 0.0,
                                  "height": model["resolution"], "width": model["resolution"]}}
    (out / "drpo_export.json").write_text(json.dumps(provenance, indent=2))
    written["provenance"] = str(out / "drpo_export.json")
    written["model_card"] = str(write_model_card(folder, state, out, full_pipeline))
    return written

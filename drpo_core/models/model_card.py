"""Hub conventions of an export: the LoRA as a PEFT adapter folder, and a model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path

PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the wrapped model's module names

USAGE_LORA = '''pipe = AutoPipelineForText2Image.from_pretrained("{base}")
pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors'''
USAGE_FULL = '''pipe = AutoPipelineForText2Image.from_pretrained("path/to/this/folder")  # LoRA fused into the UNet'''
PEFT_NOTE = '''
As a PEFT adapter on the UNet: `PeftModel.from_pretrained(pipe.unet, "path/to/this/folder")`
(adapter_config.json + adapter_model.safetensors).
'''


def write_peft_adapter(folder: Path, state: dict, out: Path) -> Path:
    """adapter_config.json + adapter_model.safetensors of checkpoint ``folder``, as ``PeftModel.save_pretrained`` writes them."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import load_file, save_file

    lora, model = state["lora"], state["model"]
    from drpo_core.training.checkpoint import trained_weights_file

    tensors = load_file(str(trained_weights_file(folder)))  # peft naming with the adapter name stripped; θ_ema when kept
    save_file({PEFT_PREFIX + k: v.contiguous() for k, v in tensors.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    PeftLoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
                   base_model_name_or_path=model["path"], revision=model.get("revision")).save_pretrained(str(out))
    return out / "adapter_config.json"


def write_model_card(folder: Path, state: dict, out: Path, full_pipeline: bool) -> Path:
    """README.md with the hub's card metadata (``huggingface_hub.ModelCard``): what was trained from what, with
    which rewards, the run's held-out result when it has one (eval.json beside checkpoints/), how to load it."""
    from huggingface_hub import ModelCard, ModelCardData

    model, lora, cfg = state["model"], state["lora"], state.get("config", {})
    rewards = ", ".join(f"{r.get('name') or r['kind']} (weight {r.get('weight', 1.0):g})" for r in cfg.get("rewards", []))
    data = ModelCardData(base_model=model["path"] if "/" in model["path"] else None, library_name="diffusers",
                         pipeline_tag="text-to-image",
                         tags=["text-to-image", "diffusers", "drpo", "lora" if lora["enabled"] else "full-fine-tune"])
    evaluation = ""
    eval_file = folder.parent.parent / "eval.json"
    if eval_file.is_file():
        e = json.loads(eval_file.read_text())["overall"]
        evaluation = (f"\n## Held-out evaluation (from the training run)\n\nFirst `rewards[]` entry on held-out prompts and seeds: "
                      f"base {e['base_mean']:.4f} → this model {e['policy_mean']:.4f}, paired gain {e['gain']:+.4f} ± "
                      f"{e['gain_se']:.4f} (standard error clustered by prompt; {e['n_prompts']} prompts, n={e['n']}).\n")
    usage = USAGE_FULL if full_pipeline else USAGE_LORA.format(base=model["path"])
    algo, trainer = cfg.get("algo", {}), cfg.get("trainer", {})
    what = f"LoRA rank {lora['rank']}" if lora["enabled"] else "full UNet"
    res = model["resolution"]
    text = "\n".join([
        "---", data.to_yaml(), "---", "",
        f"# {model['kind']} + DrPO ({what})", "",
        "A one-step text-to-image generator fine-tuned with Drifting Preference Optimization (DrPO, arXiv 2606.02521)",
        f"from `{model['path']}` for {state['step']} steps, exported by `drpo export`.", "",
        f"- rewards: {rewards or 'see drpo_export.json'}",
        f"- K={algo.get('num_candidates')} candidates and M={algo.get('num_anchors')} anchors per prompt, "
        f"λ_ref={algo.get('lambda_ref')}, lr {trainer.get('lr')}, {trainer.get('prompts_per_step')} prompts per step",
        f"- {what}" + (f", alpha {lora['alpha']}, target modules `{lora['target_modules']}`" if lora["enabled"] else ""),
        evaluation,
        "## Use", "", "```python", "from diffusers import AutoPipelineForText2Image", "", usage,
        f'image = pipe("a photo of a red car", num_inference_steps=1, guidance_scale=0.0, height={res}, width={res}).images[0]',
        "```", PEFT_NOTE if lora["enabled"] and not full_pipeline else "",
        "`drpo_export.json` records the checkpoint, step and sampling settings of this export.", ""])
    ModelCard(text).save(out / "README.md")
    return out / "README.md"


def read_lora(init_from: str, revision: str | None = None) -> dict:
    """LoRA tensors in peft naming (adapter name stripped) from any of the folders users have:

        a drpo run or checkpoint folder   ema.safetensors if the run kept a moving average, else
                                          trainable.safetensors (the newest checkpoint of a run)
        a PEFT adapter folder             adapter_model.safetensors (PeftModel.save_pretrained, drpo export)
        a diffusers LoRA folder           pytorch_lora_weights.safetensors (save_lora_weights, drpo export)

    each given as a local path or a hub id (through the Hugging Face cache). Raises ValueError, one line.
    """
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from drpo_core.models.hub import resolve_pretrained
    from drpo_core.training.checkpoint import latest_checkpoint, trained_weights_file

    folder = resolve_pretrained(init_from, "lora.init_from", want="dir", revision=revision)
    folder = latest_checkpoint(folder) or folder
    if (folder / "trainable.safetensors").is_file():
        return load_file(str(trained_weights_file(folder)))
    if (folder / "adapter_model.safetensors").is_file():
        return {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        layers = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        if any(not k.startswith("unet.") for k in layers):
            raise ValueError(f"lora.init_from {init_from!r}: the LoRA also adapts the text encoder; only UNet LoRAs are supported")
        return convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in layers.items()})
    raise ValueError(f"lora.init_from {init_from!r}: no trainable.safetensors, adapter_model.safetensors or "
                     "pytorch_lora_weights.safetensors in it")

"""Train 2 steps, export, load with plain diffusers calls only: the images equal the trainer's own."""

import json

import diffusers
import pytest
import torch
from safetensors.torch import load_file

from drpo_core.config import load_config
from drpo_core.models.export import ExportError, export_checkpoint
from drpo_core.models.tiny_models import tiny_sd_turbo_path, tiny_sdxl_path
from drpo_core.training.trainer import DrpoTrainer

# rank ≠ alpha so that a lost LoRA scale (α/r = 2) would show; a high lr so that 2 steps move the images
FAST = ["trainer.prompts_per_step=1", "algo.num_candidates=4", "algo.num_anchors=1", "trainer.lr=5e-2",
        "lora.rank=4", "lora.alpha=8", "trainer.heldout_eval_seeds=0"]
ARCHS = {"sd-turbo": ("tiny", tiny_sd_turbo_path, diffusers.StableDiffusionPipeline),
         "sdxl-turbo": ("tiny-sdxl", tiny_sdxl_path, diffusers.StableDiffusionXLPipeline)}
PROMPTS, SEEDS = ["a photo of a red car", "a photo of a green cup"], [101, 102]


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    trainer = DrpoTrainer(load_config([], [*FAST, f"model.kind={kind}", f"model.path={ARCHS[kind][0]}"]), output_dir=tmp / "run")
    for _ in range(2):
        trainer.train_step()
    return kind, trainer, trainer.save_checkpoint(), tmp


def one_step(pipe, latents):
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPTS, num_inference_steps=1, guidance_scale=0.0, latents=latents, output_type="pt",
                height=32, width=32).images


def test_checkpoint_records_model_config_and_nothing_pickled(trained):
    kind, trainer, ckpt, _ = trained
    state = json.loads((ckpt / "state.json").read_text())
    assert state["model"]["kind"] == kind and state["config"]["model"] == state["model"]
    assert state["base_model"]["kind"] == kind and state["step"] == 2 and state["version"] == 2
    assert {p.suffix for p in ckpt.iterdir()} == {".safetensors", ".json"}
    assert load_file(str(ckpt / "pytorch_lora_weights.safetensors"))  # readable without pickle


def test_exported_lora_and_fused_pipeline_reproduce_the_trainer(trained):
    kind, trainer, ckpt, tmp = trained
    out = tmp / "export"
    written = export_checkpoint(ckpt, out, full_pipeline=True)
    assert set(written) == {"lora", "peft", "pipeline", "provenance", "model_card"}
    gen = trainer.generator
    ours = gen.generate(PROMPTS, SEEDS)[1]
    base = gen.generate(PROMPTS, SEEDS, base=True)[1]
    assert (ours - base).abs().max() > 1e-2  # two steps really moved the policy
    latents = gen.noise(SEEDS)

    # (a) stock pipeline of the base model + load_lora_weights(OUT)
    _, base_path, pipeline_cls = ARCHS[kind]
    pipe = pipeline_cls.from_pretrained(base_path(), local_files_only=True)
    pipe.load_lora_weights(str(out))
    torch.testing.assert_close(one_step(pipe, latents), ours, atol=2e-5, rtol=0)

    # (b) the full pipeline folder, LoRA fused: AutoPipelineForText2Image.from_pretrained(OUT)
    full = diffusers.AutoPipelineForText2Image.from_pretrained(str(out), local_files_only=True)
    assert type(full) is pipeline_cls and not getattr(full.unet, "peft_config", None)  # fused: no adapter left
    torch.testing.assert_close(one_step(full, latents), ours, atol=2e-5, rtol=0)

    with pytest.raises(ExportError, match="already holds an export"):
        export_checkpoint(ckpt, out)

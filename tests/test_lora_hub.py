"""Hub conventions of a trained LoRA: a PEFT adapter folder and a model card on export, and lora.init_from
starting a run from any LoRA folder users have (drpo checkpoint, PEFT adapter, diffusers LoRA; local or hub id)."""

import json
import shutil

import pytest
import torch

from drpo_core.config import load_config
from drpo_core.models.export import export_checkpoint
from drpo_core.models.generator import ModelLoadError
from drpo_core.models.generator_factory import load_generator
from drpo_core.training.trainer import DrpoTrainer
from tests.test_hub import hf_cache, put_in_cache  # noqa: F401 (fixture)

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=5e-2", "lora.rank=4",
        "lora.alpha=8"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    trainer = DrpoTrainer(load_config([], FAST), output_dir=root / "run")
    trainer.train_step()
    checkpoint = trainer.save_checkpoint()
    (root / "run" / "eval.json").write_text(json.dumps({"overall": {"base_mean": 0.1, "policy_mean": 0.2, "gain": 0.1,
                                                                    "gain_se": 0.01, "n_prompts": 4, "n": 16}}))
    export_checkpoint(root / "run", root / "export")
    return root, checkpoint, trainer.generator.trainable_state_dict()


def test_export_writes_a_peft_adapter_and_a_model_card(exported):
    from huggingface_hub import ModelCard
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    root, _, trained = exported
    out = root / "export"
    config = PeftConfig.from_pretrained(str(out))
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (4, 8.0, "tiny")
    base = load_generator(load_config([], FAST).model, load_config([], ["lora.enabled=false"]).lora)
    peft_unet = PeftModel.from_pretrained(base.unet, str(out))  # stock peft, no drpo code
    loaded = get_peft_model_state_dict(peft_unet)
    assert set(loaded) == {f"base_model.model.{k}" for k in trained}
    assert all(torch.equal(loaded[f"base_model.model.{k}"].float(), v.float()) for k, v in trained.items())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # a trained (non-zero) adapter

    card = ModelCard.load(str(out / "README.md"))
    assert "drpo" in card.data.tags and card.data.library_name == "diffusers"
    assert "paired gain +0.1000 ± 0.0100" in card.text and "load_lora_weights" in card.text


@pytest.mark.parametrize("layout", ["checkpoint", "peft", "diffusers", "hub"])
def test_init_from_any_lora_folder_starts_from_its_weights(exported, layout, tmp_path, hf_cache):  # noqa: F811
    root, checkpoint, trained = exported
    source = {"checkpoint": checkpoint, "peft": tmp_path / "peft", "diffusers": tmp_path / "diffusers", "hub": "acme/drpo-lora"}[layout]
    if layout == "peft":
        source.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(root / "export" / name, source / name)
    if layout == "diffusers":
        source.mkdir()
        shutil.copy2(root / "export" / "pytorch_lora_weights.safetensors", source)
    if layout == "hub":
        put_in_cache(hf_cache, "acme/drpo-lora", root / "export", "e" * 40)
    cfg = load_config([], [*FAST, f"lora.init_from={source}"])
    started = load_generator(cfg.model, cfg.lora).trainable_state_dict()
    assert set(started) == set(trained)
    assert all(torch.allclose(started[k], trained[k].float(), atol=1e-6) for k in trained)


def test_init_from_a_lora_of_another_rank_is_one_line(exported):
    _, checkpoint, _ = exported
    cfg = load_config([], [*FAST, "lora.rank=8", f"lora.init_from={checkpoint}"])
    with pytest.raises(ModelLoadError, match=r"does not fit lora.rank=8.*size mismatch") as e:
        load_generator(cfg.model, cfg.lora)
    assert "\n" not in str(e.value)

"""Hub ids resolved through the Hugging Face cache (offline), with revision and variant, as diffusers users write them.

The cache is populated by the test in huggingface_hub's own layout (``models--org--name/refs/<rev>`` →
``snapshots/<commit>/...``), from tiny random models of the real architectures; nothing is downloaded.
"""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from drpo_core.config import LoraConfig, ModelConfig, RewardConfig
from drpo_core.models.generator import ModelLoadError, resolve_model_path
from drpo_core.models.generator_factory import load_generator
from drpo_core.models.tiny_models import tiny_sd_turbo_path
from drpo_core.rewards.model_factory import build_model_reward
from tests.tiny_reward_models import build_tiny_hf_clip


def put_in_cache(cache: Path, repo_id: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_generator_by_hub_id_revision_and_variant(hf_cache, tmp_path):
    tiny = tiny_sd_turbo_path()
    main = put_in_cache(hf_cache, "acme/tiny-turbo", tiny, "a" * 40)
    # revision "v2": the same pipeline plus fp16-variant files whose UNet conv_in is zero (a visible difference)
    v2_source = tmp_path / "v2"
    shutil.copytree(tiny, v2_source)
    for component, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        weights = load_file(str(v2_source / component / f"{stem}.safetensors"))
        if component == "unet":
            weights["conv_in.weight"] = torch.zeros_like(weights["conv_in.weight"])
        save_file(weights, str(v2_source / component / f"{stem}.fp16.safetensors"))
    v2 = put_in_cache(hf_cache, "acme/tiny-turbo", v2_source, "b" * 40, refs=("v2",))

    assert resolve_model_path("acme/tiny-turbo") == str(main)
    assert resolve_model_path("acme/tiny-turbo", revision="v2") == str(v2)
    assert resolve_model_path("acme/tiny-turbo", revision="b" * 40) == str(v2)  # a commit works as a revision

    plain = load_generator(ModelConfig(path="acme/tiny-turbo", revision="v2"), LoraConfig(enabled=False))
    variant = load_generator(ModelConfig(path="acme/tiny-turbo", revision="v2", variant="fp16"), LoraConfig(enabled=False))
    assert plain.unet.conv_in.weight.abs().sum() > 0
    assert variant.unet.conv_in.weight.abs().sum() == 0  # the fp16 variant files were the ones loaded

    with pytest.raises(ModelLoadError, match=r"acme/other-model is not in the Hugging Face cache \(offline"):
        resolve_model_path("acme/other-model")
    with pytest.raises(ModelLoadError, match="at revision 'v3'"):
        resolve_model_path("acme/tiny-turbo", revision="v3")


def test_reward_model_by_hub_id_from_the_cache(hf_cache, tmp_path):
    put_in_cache(hf_cache, "yuvalkirstain/PickScore_v1", build_tiny_hf_clip(tmp_path / "pick", seed=3), "c" * 40)
    processor = tmp_path / "processor"
    build_tiny_hf_clip(tmp_path / "clip-h", processor, seed=4)
    put_in_cache(hf_cache, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", processor, "d" * 40)
    cfg = RewardConfig(kind="pickscore", path="yuvalkirstain/PickScore_v1",
                       options={"processor_path": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "device": "cpu"})
    reward = build_model_reward(cfg)
    scores = reward(torch.rand(3, 3, 32, 32), ["a red car"] * 3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()

    with pytest.raises(ValueError, match=r"^reward 'pickscore': path 'yuvalkirstain/PickScore_v2': not a local path"):
        build_model_reward(RewardConfig(kind="pickscore", path="yuvalkirstain/PickScore_v2"))
    with pytest.raises(ValueError, match="name the file inside the repository"):
        build_model_reward(RewardConfig(kind="hps", path="xswu/HPSv2"))

"""Both architectures against stock diffusers: our one-step generator == the stock pipeline's one step."""

import diffusers
import pytest
import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.generator import ModelLoadError, OneStepGenerator
from drpo_core.models.generator_factory import load_generator
from drpo_core.models.generator_sdxl import SdxlCondition, SdxlOneStepGenerator
from drpo_core.models.tiny_models import tiny_sd_turbo_path, tiny_sdxl_path

ARCHS = {
    "sd-turbo": ("tiny", tiny_sd_turbo_path, diffusers.StableDiffusionPipeline),
    "sdxl-turbo": ("tiny-sdxl", tiny_sdxl_path, diffusers.StableDiffusionXLPipeline),
}
PROMPTS, SEEDS = ["a photo of a red car", "a photo of a green bird", "a photo of a red car"], [3, 4, 5]


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    kind = request.param
    alias, path_fn, pipeline_cls = ARCHS[kind]
    gen = load_generator(ModelConfig(kind=kind, path=alias), LoraConfig())
    pipe = pipeline_cls.from_pretrained(path_fn(), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return kind, gen, pipe


def pipeline_images(pipe, gen, prompts, seeds):
    return pipe(prompts, num_inference_steps=1, guidance_scale=0.0, latents=gen.noise(seeds), output_type="pt",
                height=gen.cfg.resolution, width=gen.cfg.resolution).images


def test_load_generator_picks_the_class(arch):
    kind, gen, _ = arch
    assert type(gen) is {"sd-turbo": OneStepGenerator, "sdxl-turbo": SdxlOneStepGenerator}[kind]
    assert gen.pipeline_class == type(arch[2]).__name__


def test_images_equal_stock_pipeline_one_step(arch):
    _, gen, pipe = arch
    _, ours = gen.generate(PROMPTS, SEEDS)
    theirs = pipeline_images(pipe, gen, PROMPTS, SEEDS)
    assert ours.shape == theirs.shape == (3, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)
    assert ours.std() > 0.05 and not torch.allclose(ours[0], ours[1], atol=1e-2)  # non-trivial images


def test_lora_policy_equals_stock_pipeline_with_the_same_lora(arch, tmp_path):
    """A moved adapter, saved in the diffusers layout, gives the same images in the stock pipeline."""
    from drpo_core.training.checkpoint import export_lora

    _, gen, pipe = arch
    state = gen.trainable_state_dict()
    try:
        with torch.no_grad():
            for p in gen.trainable_parameters():
                p.add_(0.03 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        _, ours = gen.generate(PROMPTS[:2], SEEDS[:2])
        _, base = gen.generate(PROMPTS[:2], SEEDS[:2], base=True)
        export_lora(gen, tmp_path)
        pipe.load_lora_weights(str(tmp_path))
        theirs = pipeline_images(pipe, gen, PROMPTS[:2], SEEDS[:2])
        pipe.unload_lora_weights()
    finally:
        gen.load_trainable_state_dict(state)
    assert (ours - base).abs().max() > 1e-2  # the adapter really changed the output
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["sdxl-turbo"], indirect=True)
def test_sdxl_condition_has_both_encoders_pooled_and_time_ids(arch):
    _, gen, _ = arch
    cond = gen.encode_prompts(["a red car", "a blue cup"])
    assert isinstance(cond, SdxlCondition) and len(cond) == 2
    e1, e2 = gen.text_encoder.config.hidden_size, gen.text_encoder_2.config.hidden_size
    assert cond.hidden.shape == (2, 77, e1 + e2) and cond.pooled.shape == (2, gen.text_encoder_2.config.projection_dim)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # (original H, W), crop (0, 0), (target H, W)
    assert not torch.equal(cond.hidden[0], cond.hidden[1]) and not torch.equal(cond.pooled[0], cond.pooled[1])


def test_sdxl_full_finetuning_keeps_a_frozen_base_and_fp32_master_weights():
    gen = load_generator(ModelConfig(kind="sdxl-turbo", path="tiny-sdxl", dtype="bfloat16"), LoraConfig(enabled=False))
    assert gen.base_unet is not None and not any(p.requires_grad for p in gen.base_unet.parameters())
    assert all(p.dtype == torch.float32 for p in gen.trainable_parameters())
    assert gen.base_unet.conv_in.weight.dtype == torch.bfloat16
    x = gen.predict_x0(gen.noise([1, 2]), gen.encode_prompts(["a", "b"]))
    x.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in gen.trainable_parameters()[:5])
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.mul_(1.1)
    policy = gen.generate(["a"], [1])[0]
    base = gen.generate(["a"], [1], base=True)[0]
    assert not torch.allclose(policy, base)


def test_wrong_architecture_is_named_before_loading():
    with pytest.raises(ModelLoadError, match="holds a sdxl-turbo pipeline.*set model.kind: sdxl-turbo"):
        load_generator(ModelConfig(kind="sd-turbo", path=str(tiny_sdxl_path())), LoraConfig())
    with pytest.raises(ModelLoadError, match="holds a sd-turbo pipeline.*set model.kind: sd-turbo"):
        load_generator(ModelConfig(kind="sdxl-turbo", path=str(tiny_sd_turbo_path())), LoraConfig())

"""Speed / memory options change nothing but speed and memory: merged LoRA, attention processors,
channels-last, VAE slicing and tiling, gradient checkpointing."""

import pytest
import torch

from drpo_core.config import LoraConfig, ModelConfig
from drpo_core.models.generator_factory import load_generator

PROMPTS, SEEDS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird"], [7, 8, 9]


def moved(gen, scale=0.05, seed=0):
    """Put the adapter somewhere non-trivial (LoRA B starts at zero)."""
    with torch.no_grad():
        for i, p in enumerate(gen.trainable_parameters()):
            p.copy_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)))
    return gen


@pytest.fixture(scope="module", params=["sd-turbo", "sdxl-turbo"])
def gen(request):
    path = {"sd-turbo": "tiny", "sdxl-turbo": "tiny-sdxl"}[request.param]
    return moved(load_generator(ModelConfig(kind=request.param, path=path), LoraConfig()))


def test_merged_sampling_equals_unmerged_and_restores_weights_exactly(gen):
    weights = {n: p.detach().clone() for n, p in gen.unet.named_parameters()}
    latents, images = gen.generate(PROMPTS, SEEDS)
    base = gen.generate(PROMPTS, SEEDS, base=True)[0]
    with gen.merged():
        merged_latents, merged_images = gen.generate(PROMPTS, SEEDS)
        merged_base = gen.generate(PROMPTS, SEEDS, base=True)[0]  # base while merged: W₀ comes back
        changed = [n for n, p in gen.unet.named_parameters() if not torch.equal(p, weights[n])]
    assert changed and all("base_layer" in n for n in changed)  # merging rewrote the adapted base weights
    assert (latents - base).abs().max() > 1e-2
    torch.testing.assert_close(merged_latents, latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged_images, images, atol=1e-5, rtol=0)
    assert torch.equal(merged_base, base)
    assert all(torch.equal(p, weights[n]) for n, p in gen.unet.named_parameters())  # bit-exact restore


def test_sampling_only_generator_stays_merged_across_weight_loads(gen):
    state = gen.trainable_state_dict()
    other = {k: v + 0.03 for k, v in state.items()}
    gen.merge_lora()
    try:
        gen.load_trainable_state_dict(other)  # restore W₀, load, merge the new adapter
        merged_images = gen.generate(PROMPTS, SEEDS)[1]
        with pytest.raises(RuntimeError, match="merged for sampling"):
            gen.predict_x0(gen.noise([1]), gen.encode_prompts(["a"]))  # a training forward would miss the LoRA
    finally:
        gen.unmerge_lora()
    unmerged_images = gen.generate(PROMPTS, SEEDS)[1]
    gen.load_trainable_state_dict(state)
    torch.testing.assert_close(merged_images, unmerged_images, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def reference():
    return moved(load_generator(ModelConfig(path="tiny"), LoraConfig()))


def images_and_grads(g):
    x = g.predict_x0(g.noise(SEEDS), g.encode_prompts(PROMPTS))
    x.pow(2).mean().backward()
    grads = [p.grad.clone() for p in g.trainable_parameters()]
    for p in g.trainable_parameters():
        p.grad = None
    return g.generate(PROMPTS, SEEDS)[1], grads


@pytest.mark.parametrize("options", [
    dict(attention="classic", channels_last=True, vae_slicing=True),
    dict(attention="sdpa", merge_lora_for_sampling=True, gradient_checkpointing=True),
], ids=["classic-channels_last-slicing", "sdpa-merge-checkpointing"])
def test_options_change_neither_images_nor_gradients(options, reference):
    variant = moved(load_generator(ModelConfig(path="tiny", **options), LoraConfig()))
    assert variant.unet.is_gradient_checkpointing == options.get("gradient_checkpointing", False)
    assert variant.vae.use_slicing == options.get("vae_slicing", False)
    images, grads = images_and_grads(variant)
    ref_images, ref_grads = images_and_grads(reference)
    torch.testing.assert_close(images, ref_images, atol=1e-5, rtol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert not variant._merger.merged  # merged only while sampling: the learner sees the adapter


def test_vae_tiling_decodes_large_images_close_to_untiled():
    tiled = load_generator(ModelConfig(path="tiny", resolution=64, vae_tiling=True), LoraConfig())
    assert tiled.vae.use_tiling  # tiles are 32 px (the VAE's sample_size), so 64 px images are tiled
    latents, images = tiled.generate(PROMPTS[:1], SEEDS[:1])
    tiled.vae.disable_tiling()
    untiled = tiled.decode(latents)
    assert images.shape == untiled.shape == (1, 3, 64, 64)
    assert not torch.equal(images, untiled) and (images - untiled).abs().mean() < 0.05  # blended seams: close, not equal

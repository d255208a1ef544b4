"""The official teacher-UNet φ (unet_hidden, unet_mode official) against a re-derivation written here from the
official ``SDXLTeacherUNetFeatureExtractor``: hooks on the frozen base UNet run on x + s·n (fresh n per call) at
t, conditioned on each image's prompt; each map average-pooled with a g×g window and stride g, flattened to one
vector per image. Also: the pixel ViT keys are the official three per layer."""

import pytest
import torch

from drpo_core.config import FeaturesConfig, LoraConfig, ModelConfig
from drpo_core.features import build_encoder
from drpo_core.models.generator_factory import load_generator
from drpo_core.models.tiny_models import tiny_pixel_encoder_path


@pytest.fixture(scope="module")
def sdxl():
    gen = load_generator(ModelConfig(kind="sdxl-turbo", path="tiny-sdxl"), LoraConfig())
    with torch.no_grad():  # the adapter off zero: φ must still see the base (adapter disabled)
        for p in gen.trainable_parameters():
            p.add_(0.05)
    return gen


def oracle(gen, latents, prompts, noise, layers, g, t=100, s=0.1):
    maps = {}
    hooks = [gen.unet.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: maps.__setitem__(n, (o[0] if isinstance(o, tuple) else o).float())) for n in layers]
    try:
        with gen.base_model(), torch.no_grad():
            gen.unet_forward(latents + s * noise, torch.full((len(prompts),), t, dtype=torch.long), gen.encode_prompts(prompts))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, fmap in maps.items():
        N, C, H, W = fmap.shape
        vec = torch.empty(N, C * (H // g) * (W // g))
        k = 0
        for c in range(C):  # torch.flatten(1) order: channel, then row, then column
            for i in range(H // g):
                for j in range(W // g):
                    vec[:, k] = fmap[:, c, i * g:(i + 1) * g, j * g:(j + 1) * g].mean(dim=(1, 2))
                    k += 1
        out[n] = vec[:, None]
    return out


def test_official_teacher_features_match_the_oracle(sdxl):
    layers = ["down_blocks.1", "mid_block", "up_blocks.0"]
    enc = build_encoder(FeaturesConfig(kind="unet_hidden", unet_mode="official", layers=layers, pool_grid=2, seed=5),
                        sdxl.latent_shape[0], sdxl.device, generator=sdxl)
    latents = torch.randn(3, *sdxl.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["a photo of a red car", "a photo of a blue cup", "a photo of a red car"]
    with torch.no_grad():
        got = enc(latents, prompts=prompts)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(5))  # the first call's fresh noise
    want = oracle(sdxl, latents, prompts, noise, layers, 2)
    assert list(got) == layers
    for n in layers:
        assert got[n].shape == want[n].shape and got[n].shape[1] == 1, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        again = enc(latents, prompts=prompts)  # fresh noise: a second call differs
        empty = oracle(sdxl, latents, ["", "", ""], noise, layers, 2)
    assert not torch.allclose(again["mid_block"], got["mid_block"])
    assert not torch.allclose(empty["mid_block"], want["mid_block"])  # the prompt matters
    with pytest.raises(ValueError, match="prompt"):
        enc(latents)


def test_learner_passes_prompts_to_the_official_teacher(sdxl, tmp_path):
    from drpo_core.config import load_config
    from drpo_core.training.trainer import DrpoTrainer

    cfg = load_config([], ["model.kind=sdxl-turbo", "model.path=tiny-sdxl", "features.kind=unet_hidden",
                           "features.unet_mode=official", "algo.num_candidates=4", "algo.num_anchors=1",
                           "trainer.prompts_per_step=1", "algo.key_aggregation=mean"])
    stats = DrpoTrainer(cfg, output_dir=tmp_path / "run").train_step()
    assert stats["update/applied"] == 1.0
    assert {k.split("/")[1] for k in stats if k.startswith("drift/")} == {"down_blocks.1", "mid_block", "up_blocks.0"}


@pytest.mark.parametrize("kind", ["dinov2", "vit_mae"])
def test_pixel_keys_are_the_official_three_per_layer(kind):
    gen = load_generator(ModelConfig(kind="sd-turbo", path="tiny"), LoraConfig())
    path = str(tiny_pixel_encoder_path(kind))
    enc = build_encoder(FeaturesConfig(kind=kind, path=path), gen.latent_shape[0], gen.device, generator=gen)
    x = torch.randn(2, *gen.latent_shape)
    feats = enc(x)
    want = [f"layer{l}_{s}" for l in enc.layers for s in ("patch_mean", "patch_std", "cls")]
    assert list(feats) == want
    asked = build_encoder(FeaturesConfig(kind=kind, path=path, keys=[f"layer{enc.layers[-1]}_patch_mean_2"]),
                          gen.latent_shape[0], gen.device, generator=gen)
    assert list(asked(x)) == [f"layer{enc.layers[-1]}_patch_mean_2"]
    with pytest.raises(ValueError, match="features.keys"):
        build_encoder(FeaturesConfig(kind=kind, path=path, keys=["layer99_cls"]), gen.latent_shape[0], gen.device, generator=gen)

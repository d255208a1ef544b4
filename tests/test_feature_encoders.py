"""Every features.kind: the same interface (key → [N, L, D]), gradients to the generator, frozen weights;
latent-MAE checkpoints are checked key by key."""

import pytest
import torch
from safetensors.torch import save_file

from drpo_core.config import FeaturesConfig, LoraConfig, ModelConfig
from drpo_core.features import LatentResNetEncoder, build_encoder
from drpo_core.models.generator_factory import load_generator
from drpo_core.features.latent_checkpoint import to_model_key
from drpo_core.models.tiny_models import tiny_pixel_encoder_path

KINDS = ["latent_resnet", "unet_hidden", "dinov2", "vit_mae", "random_pixel"]
EXPECTED_KEYS = {  # the multi-scale keys of each kind on the tiny models (32 px, 4×8×8 latents)
    "latent_resnet": {"layer2_mean", "layer2_std", "layer2_mean_2", "layer2_std_2", "layer2_mean_4", "layer2_std_4"},
    "unet_hidden": {"down1_pool4", "mid_pool4", "up0_pool4", "mid_mean", "mid_std", "up0_mean_2", "up0_std_4"},
    "dinov2": {"layer1_cls", "layer4_patch_mean", "layer4_patch_std"},  # official: 3 keys per layer
    "vit_mae": {"layer2_cls", "layer2_patch_mean", "layer2_patch_std"},
    "random_pixel": {"pix1_mean", "pix1_std_4", "pix2_mean_2", "pix3_mean", "pix3_std", "pix3_std_4"},
}


@pytest.fixture(scope="module")
def generator():
    gen = load_generator(ModelConfig(kind="sd-turbo", path="tiny"), LoraConfig())
    with torch.no_grad():  # move the adapter off zero so the policy differs from the base
        for p in gen.trainable_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return gen


@pytest.fixture(scope="module")
def sdxl_generator():
    return load_generator(ModelConfig(kind="sdxl-turbo", path="tiny-sdxl"), LoraConfig())


def encoder_of(kind, gen, **fields):
    path = str(tiny_pixel_encoder_path(kind)) if kind in ("dinov2", "vit_mae") else None
    return build_encoder(FeaturesConfig(kind=kind, path=path, **fields), gen.latent_shape[0], gen.device, generator=gen)


def frozen_weights(encoder, gen):
    if isinstance(encoder, torch.nn.Module):
        return [p for n, p in encoder.named_parameters()]
    return list(gen.unet.parameters())  # unet_hidden runs the generator's own (adapter-disabled) UNet


@pytest.mark.parametrize("kind", KINDS)
def test_interface_and_gradients_reach_the_generator(kind, generator):
    gen = generator
    encoder = encoder_of(kind, gen)
    seeds, prompts = [1, 2, 3], ["a photo of a red car"] * 3
    for p in gen.trainable_parameters():
        p.grad = None
    x = gen.predict_x0(gen.noise(seeds), gen.encode_prompts(prompts))
    feats = encoder(x)
    assert feats and all(v.ndim == 3 and v.shape[0] == 3 and v.dtype == torch.float32 for v in feats.values())
    assert all(torch.isfinite(v).all() for v in feats.values())
    assert EXPECTED_KEYS[kind] <= set(feats), sorted(feats)
    sum(v.pow(2).mean() for v in feats.values()).backward()
    grads = [p.grad for p in gen.trainable_parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    # φ is frozen: only the generator's trainable weights may receive gradients
    trainable = {id(p) for p in gen.trainable_parameters()}
    assert all(p.grad is None for p in frozen_weights(encoder, gen) if id(p) not in trainable)
    # deterministic and per-sample: a batch of one gives the same features as its row in a batch
    with torch.no_grad():
        again = encoder(x.detach()[1:2])
    for key, value in again.items():
        torch.testing.assert_close(value, feats[key][1:2].detach(), atol=1e-4, rtol=1e-4)


def test_unet_hidden_gradients_flow_through_the_input_latents_only(sdxl_generator):
    gen = sdxl_generator
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05)
    encoder = encoder_of("unet_hidden", gen)
    assert encoder.layers == ["down_blocks.1", "mid_block", "up_blocks.0"]  # down_blocks.2 absent in the tiny UNet
    latents = gen.generate(["a red car", "a blue cup"], [1, 2])[0].detach().requires_grad_(True)
    feats = encoder(latents)
    sum(v.sum() for v in feats.values()).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert all(p.grad is None for p in gen.unet.parameters())  # the adapter is disabled inside φ
    with gen.base_model():  # and φ really is the base: same features whatever the adapter holds
        base_feats = encoder(latents.detach())
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.sub_(0.05)
    torch.testing.assert_close(encoder(latents.detach())["mid_pool4"], base_feats["mid_pool4"])


def test_unet_hidden_with_gradient_checkpointing_matches(generator):
    gen = generator
    encoder = encoder_of("unet_hidden", gen)

    def grads():
        for p in gen.trainable_parameters():
            p.grad = None
        x = gen.predict_x0(gen.noise([4, 5]), gen.encode_prompts(["a", "b"]))
        sum(v.pow(2).mean() for v in encoder(x).values()).backward()
        return [p.grad.clone() for p in gen.trainable_parameters()]

    plain = grads()
    gen.unet.enable_gradient_checkpointing()
    try:
        checkpointed = grads()
    finally:
        gen.unet.disable_gradient_checkpointing()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def paper_named(state):
    """Our key names → the paper's stage names (layer{i}, layer{i}_norm), the other accepted spelling."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "stages":
            key = ".".join([f"layer{int(parts[1]) + 1}", *parts[2:]])
        elif parts[0] == "norms":
            key = ".".join([f"layer{int(parts[1]) + 1}_norm", *parts[2:]])
        renamed[key] = value
    assert all(to_model_key(k) in state for k in renamed)
    return renamed


def test_latent_mae_checkpoint_loads_and_gives_layer4_keys(tmp_path):
    layout = dict(in_channels=4, width=8, stage_blocks=(3, 4, 6, 3), downsample=True, groups=4)
    trained = LatentResNetEncoder.random_frozen(seed=7, **layout)
    save_file({k: v.contiguous() for k, v in paper_named(trained.state_dict()).items()}, str(tmp_path / "mae.safetensors"))
    cfg = FeaturesConfig(kind="latent_resnet", width=8, stage_blocks=[3, 4, 6, 3], downsample=True, groups=4,
                         checkpoint=str(tmp_path / "mae.safetensors"), seed=1)
    encoder = build_encoder(cfg, 4, torch.device("cpu"))
    for key, value in trained.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    feats = encoder(torch.randn(2, 4, 32, 32))  # 32x32 latents → layer4 is 4x4
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer4_mean": (2, 1, 64), "layer4_std": (2, 1, 64), "layer4_mean_2": (2, 4, 64),
        "layer4_std_2": (2, 4, 64), "layer4_mean_4": (2, 1, 64), "layer4_std_4": (2, 1, 64)}


def test_latent_mae_checkpoint_mismatch_names_the_problem(tmp_path):
    other = LatentResNetEncoder.random_frozen(seed=7, in_channels=4, width=16, stage_blocks=(3, 4, 6, 3), downsample=True, groups=4)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(tmp_path / "wide.safetensors"))
    cfg = FeaturesConfig(kind="latent_resnet", width=8, stage_blocks=[3, 4, 6, 3], downsample=True, groups=4,
                         checkpoint=str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatches.*looks like in_channels=4, width=16, stage_blocks=\[3, 4, 6, 3\]"):
        build_encoder(cfg, 4, torch.device("cpu"))
    short = cfg.model_copy(update={"stage_blocks": [3, 4, 6, 4], "width": 16})
    with pytest.raises(ValueError, match=r"6 missing keys \(e.g. stages.3.3.conv1.weight\)"):
        build_encoder(short, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="does not exist"):
        build_encoder(cfg.model_copy(update={"checkpoint": str(tmp_path / "nope.safetensors")}), 4, torch.device("cpu"))
    (tmp_path / "mae.pth").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        build_encoder(cfg.model_copy(update={"checkpoint": str(tmp_path / "mae.pth")}), 4, torch.device("cpu"))


def test_bad_encoder_settings_fail_clearly(generator):
    with pytest.raises(ValueError, match="not modules of the UNet"):
        encoder_of("unet_hidden", generator, layers=["down_blocks.7"])
    with pytest.raises(ValueError, match="out of range"):
        encoder_of("vit_mae", generator, layers=[3])
    with pytest.raises(ValueError, match="cannot load a Dinov2Model"):
        build_encoder(FeaturesConfig(kind="dinov2", path="/nonexistent/dinov2"), 4, generator.device, generator=generator)
    with pytest.raises(ValueError, match="pass generator="):
        build_encoder(FeaturesConfig(kind="unet_hidden"), 4, generator.device)

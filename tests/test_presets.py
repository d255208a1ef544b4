"""Every YAML under deploy/configs validates; the paper presets carry the paper's numbers; the tiny
presets differ from them only where size or offline use forces it."""

from pathlib import Path

import pytest

from drpo_core.config import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "configs"


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_validates(path):
    load_config([path])


def test_there_are_presets_for_both_architectures():
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"sd-turbo.yaml", "sdxl-turbo.yaml", "tiny-sd-turbo-arch.yaml", "tiny-sdxl.yaml"} <= names


@pytest.mark.parametrize("name, kind, lr, steps, dtype, precision, K, M, weights, lam, prompts", [
    # scripts/train/drpo.sh (SD-Turbo, removed from the official head) and the two SDXL scripts at the head
    ("sd-turbo", "sd-turbo", 1e-4, 1000, "float16", "fp16", 24, 8, (3000, 3000, 3000, 3000), 0.2, 32),
    ("sdxl-turbo", "sdxl-turbo", 1e-5, 5000, "bfloat16", "bf16", 16, 8, (3000, 2000, 3500, 5000), 0.25, 32),
    ("sdxl-turbo-mae", "sdxl-turbo", 1e-5, 5000, "bfloat16", "bf16", 16, 8, (3000, 3000, 3000, 3000), 0.2, 64),
])
def test_paper_hyperparameters(name, kind, lr, steps, dtype, precision, K, M, weights, lam, prompts):
    cfg = load_config([CONFIGS / f"{name}.yaml"])
    hub = "stabilityai/sd-turbo" if kind == "sd-turbo" else "stabilityai/sdxl-turbo"
    assert (cfg.model.kind, cfg.model.path, cfg.model.resolution, cfg.model.dtype) == (kind, hub, 512, dtype)
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init) == (True, 16, 16.0, 0.0, "default")
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    a = cfg.algo
    assert (a.num_candidates, a.num_anchors, a.radii, a.lambda_ref, a.kernel) == (K, M, [0.02, 0.05, 0.2], lam, "laplacian")
    assert (a.pos_weight, a.neg_weight, a.ref_weight, a.ref_neg_weight) == weights
    assert (a.latent_l2_weight, a.feature_l2_weight) == (0.0, 0.0)
    assert a.key_aggregation == ("sum" if kind == "sd-turbo" else "mean")
    assert cfg.model.x0 == ("official" if kind == "sd-turbo" else "pipeline")
    t = cfg.trainer
    assert (t.lr, t.steps, t.weight_decay, t.grad_clip, t.warmup_steps, t.mixed_precision) == (lr, steps, 1e-2, 1.0, 0, precision)
    assert (t.betas, t.eps, t.prompts_per_step, t.micro_batch_prompts) == ((0.9, 0.999), 1e-8, prompts, 1)
    assert cfg.model.gradient_checkpointing


def test_sdxl_presets_use_the_official_feature_backends():
    teacher = load_config([CONFIGS / "sdxl-turbo.yaml"]).features
    assert (teacher.kind, teacher.unet_mode, teacher.timestep, teacher.noise_scale, teacher.pool_grid) == ("unet_hidden", "official", 100, 0.1, 4)
    mae = load_config([CONFIGS / "sdxl-turbo-mae.yaml"]).features
    assert (mae.kind, mae.path, mae.layers, mae.keys) == ("vit_mae", "facebook/vit-mae-base", [12], None)


def test_sd_turbo_preset_uses_the_latent_mae_layout():
    f = load_config([CONFIGS / "sd-turbo.yaml"]).features
    assert (f.kind, f.stage_blocks, f.patch_sizes, f.keys) == ("latent_mae", [3, 4, 6, 3], [2, 4], None)
    assert f.checkpoint and f.checkpoint.endswith("mae_latent_256_torch.pth")  # the official file, loaded as is


@pytest.mark.parametrize("real, tiny, allowed", [
    ("sd-turbo", "tiny-sd-turbo-arch", {"model.path", "model.resolution", "features.width", "features.checkpoint", "rewards"}),
    ("sdxl-turbo", "tiny-sdxl", {"model.path", "model.resolution", "rewards"}),
])
def test_tiny_presets_differ_only_in_size_and_downloads(real, tiny, allowed):
    a = flat(load_config([CONFIGS / f"{real}.yaml"]).model_dump(mode="json"))
    b = flat(load_config([CONFIGS / f"{tiny}.yaml"]).model_dump(mode="json"))
    differing = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not k.startswith("output.")}
    assert differing == allowed
    assert b["model.path"] in ("tiny", "tiny-sdxl") and b["rewards"] == [dict(a["rewards"][0], kind="hue_fraction", path=None, options={})]

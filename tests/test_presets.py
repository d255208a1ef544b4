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


@pytest.mark.parametrize("name, kind, hub, lr, steps, dtype, precision", [
    ("sd-turbo", "sd-turbo", "stabilityai/sd-turbo", 1e-4, 1000, "float16", "fp16"),
    ("sdxl-turbo", "sdxl-turbo", "stabilityai/sdxl-turbo", 1e-5, 5000, "bfloat16", "bf16"),
])
def test_paper_hyperparameters(name, kind, hub, lr, steps, dtype, precision):
    cfg = load_config([CONFIGS / f"{name}.yaml"])
    assert (cfg.model.kind, cfg.model.path, cfg.model.resolution, cfg.model.dtype) == (kind, hub, 512, dtype)
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (True, 16, 16.0, 0.0)
    assert cfg.lora.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    a = cfg.algo
    assert (a.num_candidates, a.num_anchors, a.radii, a.lambda_ref, a.kernel) == (24, 8, [0.02, 0.05, 0.2], 0.2, "laplacian")
    assert (a.pos_weight, a.neg_weight, a.ref_weight, a.ref_neg_weight) == (3000, 3000, 3000, 3000)
    t = cfg.trainer
    assert (t.lr, t.steps, t.weight_decay, t.grad_clip, t.warmup_steps, t.mixed_precision) == (lr, steps, 1e-2, 1.0, 0, precision)
    assert (t.betas, t.eps, t.prompts_per_step) == ((0.9, 0.999), 1e-8, 32)


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

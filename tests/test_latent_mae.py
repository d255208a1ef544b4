"""The official latent-MAE φ (kind latent_mae) against an independent re-derivation of the official forward.

The oracle below is written from reading the official ``FrozenMAELatentFeatureExtractor`` (UGVly/DrPO,
src/drpo/features.py at its head): it works on the raw official-layout state dict, converts kernels itself,
computes GroupNorm from its definition and the patch statistics with explicit loops over patches.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from drpo_core.config import FeaturesConfig
from drpo_core.features import build_encoder
from drpo_core.features.latent_mae import random_official_state

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [3, 4, 6, 3]
WIDTH = 12  # channels 12/24/48/96 → GN groups 12/24/24/32: the divisor search matters


# -- the oracle -----------------------------------------------------------------------------------------
def o_kernel(state, prefix, c_in):
    k = state.get(prefix + ".kernel", state.get(prefix + ".weight"))
    if k.shape[2] == c_in:  # Flax [kh, kw, in, out]
        return k.permute(3, 2, 0, 1)
    assert k.shape[1] == c_in
    return k


def o_gn(state, prefix, x):
    C = x.shape[1]
    groups = next(g for g in range(min(32, C), 0, -1) if C % g == 0)
    scale = state.get(prefix + ".scale", state.get(prefix + ".weight"))
    out = torch.empty_like(x)
    per = C // groups
    for n in range(x.shape[0]):
        for g in range(groups):
            block = x[n, g * per:(g + 1) * per]
            mu, var = block.mean(), ((block - block.mean()) ** 2).mean()
            out[n, g * per:(g + 1) * per] = (block - mu) / torch.sqrt(var + 1e-5)
    return out * scale[None, :, None, None] + state[prefix + ".bias"][None, :, None, None]


def o_maps(state, x):
    conv = lambda h, p, s=1, pad=1: F.conv2d(h, o_kernel(state, p, h.shape[1]).to(h.dtype), stride=s, padding=pad)
    h = torch.relu(o_gn(state, "encoder.gn1", conv(x, "encoder.conv1")))
    maps = {"conv1": h}
    for s, n in enumerate(LAYERS):
        for b in range(n):
            p, st = f"encoder.stages_{s}.layers_{b}", (2 if s > 0 and b == 0 else 1)
            y = torch.relu(o_gn(state, p + ".gn1", conv(h, p + ".conv1", st)))
            y = o_gn(state, p + ".gn2", conv(y, p + ".conv2"))
            r = h if h.shape == y.shape else o_gn(state, p + ".proj_gn", conv(h, p + ".proj_conv", st, 0))
            h = torch.relu(r + y)
            if (b + 1) % 2 == 0 and b + 1 < n:
                maps[f"layer{s + 1}_blk{b + 1}"] = h
        h = o_gn(state, f"encoder.layer{s + 1}_norm", h)
        maps[f"layer{s + 1}"] = h
    return maps


def o_std(vectors):  # [L, C] → [C]
    return torch.sqrt(((vectors - vectors.mean(0)) ** 2).mean(0) + 1e-6)


def o_features(state, x):
    out = {"norm_x": torch.sqrt((x ** 2).mean(dim=(2, 3)))[:, None]}
    for name, m in o_maps(state, x).items():
        N, C, H, W = m.shape
        flat = m.flatten(2).transpose(1, 2)  # [N, HW, C]
        out[f"{name}_mean"] = flat.mean(1, keepdim=True)
        out[f"{name}_std"] = torch.stack([o_std(flat[n]) for n in range(N)])[:, None]
        for p in (2, 4):
            if H % p or W % p:
                continue
            means, stds = [], []
            for n in range(N):
                mn, sd = [], []
                for i in range(0, H, p):
                    for j in range(0, W, p):
                        patch = m[n, :, i:i + p, j:j + p].reshape(C, -1).T  # [p², C]
                        mn.append(patch.mean(0))
                        sd.append(o_std(patch))
                means.append(torch.stack(mn))
                stds.append(torch.stack(sd))
            out[f"{name}_mean_{p}"], out[f"{name}_std_{p}"] = torch.stack(means), torch.stack(stds)
    return out


# -- helpers ----------------------------------------------------------------------------------------------
def write_official(path, flax: bool, wrapper: str = "state_dict", metadata: bool = True, prefix: str = "", weight_names=False):
    state = random_official_state(4, WIDTH, LAYERS, seed=3, flax=flax)
    if weight_names:  # torch-style names: .weight for kernels and GN scales
        state = {k.replace(".kernel", ".weight").replace(".scale", ".weight"): v for k, v in state.items()}
    state = {prefix + k: v for k, v in state.items()}
    state["decoder.head.kernel"] = torch.zeros(3)  # the MAE's decoder is in the file too; φ ignores it
    obj = {wrapper: state}
    if metadata:
        obj["metadata"] = {"model_config": {"layers": LAYERS, "in_channels": 4}, "step": 1000}
    torch.save(obj, path)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def all_keys():
    enc = build_encoder(FeaturesConfig(kind="latent_mae", width=WIDTH, stage_blocks=LAYERS, include_norm_x=True), 4, torch.device("cpu"))
    return enc.available_keys()


@pytest.mark.parametrize("flax,wrapper,metadata,prefix,weight_names", [
    (True, "state_dict", True, "", False),            # the official file: Flax kernels, metadata
    (False, "model_state_dict", False, "module.", True),  # torch kernels, .weight names, DDP prefix, no metadata
])
def test_features_match_the_oracle_on_an_official_layout_checkpoint(tmp_path, flax, wrapper, metadata, prefix, weight_names):
    raw = write_official(tmp_path / "mae_latent_256_torch.pth", flax, wrapper, metadata, prefix, weight_names)
    keys = all_keys()
    cfg = FeaturesConfig(kind="latent_mae", checkpoint=str(tmp_path / "mae_latent_256_torch.pth"), keys=keys,
                         include_norm_x=True, width=999, stage_blocks=[1])  # width/blocks ignored: the file decides
    encoder = build_encoder(cfg, 4, torch.device("cpu"))
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = encoder.double()(x)  # float64 on both sides: the comparison sees the computation, not fp32 rounding
    want = o_features({k: v.double() for k, v in raw.items()}, x)
    assert set(got) == set(keys)
    assert {"layer1_blk2", "layer3_blk4", "layer4_blk2"} <= {k.rsplit("_", 1)[0] for k in keys}
    assert "conv1_mean" in keys and "layer4_std_4" in keys
    for k in keys:
        assert got[k].shape == want[k].shape, k
        assert (got[k] - want[k]).abs().max() <= 1e-5, (k, float((got[k] - want[k]).abs().max()))


def test_default_keys_are_the_sd_turbo_recipe_and_gradients_flow(tmp_path):
    write_official(tmp_path / "m.pth", flax=True)
    encoder = build_encoder(FeaturesConfig(kind="latent_mae", checkpoint=str(tmp_path / "m.pth")), 4, torch.device("cpu"))
    x = torch.randn(2, 4, 64, 64, requires_grad=True)  # the real 512 px latent: layer4 is 8x8
    feats = encoder(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "layer4_mean": (2, 1, 96), "layer4_std": (2, 1, 96), "layer4_mean_2": (2, 16, 96),
        "layer4_std_2": (2, 16, 96), "layer4_mean_4": (2, 4, 96), "layer4_std_4": (2, 4, 96)}
    sum(v.sum() for v in feats.values()).backward()
    assert x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in encoder.parameters())


def _broken(tmp_path, drop=None, reshape=None):
    state = random_official_state(4, WIDTH, LAYERS, seed=3, flax=True)
    if drop:
        del state[drop]
    if reshape:
        key, dim = reshape
        state[key] = state[key].narrow(dim, 0, state[key].shape[dim] - 1)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": state, "metadata": {"model_config": {"layers": LAYERS, "in_channels": 4}}}, path)
    return path


@pytest.mark.parametrize("drop,reshape,needle", [
    ("encoder.stages_2.layers_0.proj_conv.kernel", None, "missing key encoder.stages_2.layers_0.proj_conv.kernel"),
    ("encoder.layer3_norm.scale", None, "missing key encoder.layer3_norm.scale"),
    (None, ("encoder.stages_1.layers_2.gn2.bias", 0), "key encoder.stages_1.layers_2.gn2.bias has shape (23,), expected (24,)"),
    (None, ("encoder.stages_3.layers_1.conv1.kernel", 2), "key encoder.stages_3.layers_1.conv1.kernel has shape (3, 3, 95, 96), "
     "expected a 3x3 kernel with 96 input channels"),
])
def test_missing_or_misshapen_key_is_named(tmp_path, drop, reshape, needle):
    path = _broken(tmp_path, drop, reshape)
    with pytest.raises(ValueError, match=re.escape(needle)):
        build_encoder(FeaturesConfig(kind="latent_mae", checkpoint=str(path)), 4, torch.device("cpu"))


def test_a_training_run_loads_the_official_file_and_a_broken_one_exits_2(tmp_path):
    torch.save({"state_dict": random_official_state(4, 8, [1, 1], seed=3, flax=True),
                "metadata": {"model_config": {"layers": [1, 1], "in_channels": 4}}}, tmp_path / "mae.pth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    common = [sys.executable, "-m", "services.cli", "train", "--local", "--config", "deploy/configs/tiny.yaml",
              "--set", "trainer.steps=1", "--set", "trainer.prompts_per_step=1", "--set", "algo.num_candidates=4",
              "--set", "algo.num_anchors=1", "--set", "trainer.heldout_eval_seeds=1", "--set", "features.kind=latent_mae"]
    ok = subprocess.run([*common, "--set", f"features.checkpoint={tmp_path / 'mae.pth'}", "--output-dir", str(tmp_path / "run")],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    broken = _broken(tmp_path, drop="encoder.stages_1.layers_0.gn1.scale")
    bad = subprocess.run([*common, "--set", f"features.checkpoint={broken}", "--output-dir", str(tmp_path / "bad")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing key encoder.stages_1.layers_0.gn1.scale" in lines[0], bad.stderr[-1000:]


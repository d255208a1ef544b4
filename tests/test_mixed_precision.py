"""bf16 / fp16 on the CPU (``trainer.mixed_precision``), at tiny size: what a GPU user's dtype paths do, tested here.

Each behaviour has a planted bug that one of these tests caught (docs/testing.md, planted-bug table).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from drpo_core.algorithms.drift import drift_field, drift_loss
from drpo_core.algorithms.weighted_drift import (awr_advsign_drift_loss, awr_hard_drift_loss, awr_kernel_drift_loss,
                                                 awr_topk_drift_loss)
from drpo_core.config import LoraConfig, ModelConfig, load_config
from drpo_core.models.generator_factory import load_generator
from drpo_core.training.precision import format_precision, resolve_precision
from drpo_core.training.trainer import DrpoTrainer, build_rewards

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# eps = 1 makes AdamW's first step ≈ lr·g (linear in the gradient): the weight change compares the gradients
FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2", "trainer.eps=1.0"]
# Relative L2 error of one update against fp32. A half-precision matmul rounds to 2^-8 (bf16) / 2^-11 (fp16)
# relative; the UNet, the LoRA and φ chain ~10 of them forward and backward, so the gradient carries a few units
# of that: measured 1.7 % (bf16) and 0.2 % (fp16) on this model. The bounds leave ~3x / ~5x headroom and stay
# far below what a real dtype bug gives (fp16 clipping the scaled gradient before unscaling it: 99 %).
UPDATE_TOL = {"bf16": 0.05, "fp16": 0.01}


def trainer(tmp_path, precision: str, *extra: str, name: str | None = None) -> DrpoTrainer:
    return DrpoTrainer(load_config([], [*FAST, f"trainer.mixed_precision={precision}", *extra]),
                       output_dir=tmp_path / (name or precision))


def finite(x) -> bool:
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x.float()).all())
    return math.isfinite(float(x))


class DtypeSpy:
    """Records the output dtype of ``module`` on every forward."""

    def __init__(self, module: torch.nn.Module):
        self.seen: list[torch.dtype] = []
        self.handle = module.register_forward_hook(lambda _m, _i, out: self.seen.append(
            (out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", out)).dtype))

    def close(self) -> list[torch.dtype]:
        self.handle.remove()
        return self.seen


@pytest.fixture(scope="module")
def fp32_groups(tmp_path_factory):
    """One step's scored groups, sampled in fp32: every precision's learner updates on the very same anchors."""
    t = trainer(tmp_path_factory.mktemp("groups"), "no")
    groups, _ = t.collect(0, t.prompts.next(2))
    return groups


def test_auto_stays_fp32_on_cpu_and_bf16_fp16_autocast_on_cpu_when_asked():
    assert [resolve_precision("cpu", p) for p in ("auto", "no", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    assert [resolve_precision("cuda", p) for p in ("auto", "no", "bf16", "fp16")] == ["bf16", "fp32", "bf16", "fp16"]


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_candidates_are_sampled_in_the_run_precision(tmp_path, precision):
    t = trainer(tmp_path, precision)
    spy = DtypeSpy(t.generator.unet.conv_in)
    groups, _ = t.collect(0, ["a photo of a red car"])
    want = HALF.get(precision, torch.float32)
    assert set(spy.close()) == {want}  # policy and base forwards alike
    assert groups[0].latents.dtype == torch.float32 and finite(groups[0].latents) and finite(groups[0].scores)
    if precision != "auto":  # the same candidates as fp32, to the half type's rounding
        ref = trainer(tmp_path, "no", name="ref").collect(0, ["a photo of a red car"])[0][0].latents
        assert float((groups[0].latents - ref).norm() / ref.norm()) < {"bf16": 2e-2, "fp16": 3e-3}[precision]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_one_update_is_close_to_fp32_and_finite_everywhere(tmp_path, fp32_groups, precision):
    results = {}
    for p in ("no", precision):
        t = trainer(tmp_path, p)
        before = t.generator.trainable_state_dict()
        phi_conv = next(m for m in t.encoder.modules() if isinstance(m, torch.nn.Conv2d))
        unet_spy, phi_spy = DtypeSpy(t.generator.unet.conv_in), DtypeSpy(phi_conv)
        stats = t.learner.update(copy.deepcopy(fp32_groups))
        unet_seen, phi_seen = unet_spy.close(), phi_spy.close()
        after = t.generator.trainable_state_dict()
        grads = [q.grad for q in t.generator.trainable_parameters()]
        assert stats["update/applied"] == 1.0 and finite(stats) and finite(after) and all(finite(g) for g in grads)
        assert all(v.dtype == torch.float32 for v in after.values())  # fp32 master weights whatever the autocast
        results[p] = stats, {k: after[k] - before[k] for k in before}, set(unet_seen) | set(phi_seen)
    (s32, d32, _), (sh, dh, seen) = results["no"], results[precision]
    assert seen == {HALF[precision]}  # the learner's UNet and φ (policy, anchors, base) ran in half precision
    error = math.sqrt(sum(float((dh[k] - d32[k]).square().sum()) for k in d32)) / math.sqrt(sum(float(v.square().sum()) for v in d32.values()))
    assert 0 < error < UPDATE_TOL[precision], error
    assert sh["update/grad_norm"] == pytest.approx(s32["update/grad_norm"], rel=UPDATE_TOL[precision])
    assert sh["loss"] == pytest.approx(s32["loss"], rel=1e-3)  # V is RMS-normalised per radius: the loss barely moves


# -- the drift: fp32 whatever the autocast ------------------------------------------------------------
def _close_points(n: int, d: int, seed: int) -> torch.Tensor:
    """Points 1e-2 apart around a common offset of 10: bf16 (8 mantissa bits) cannot tell their distances apart."""
    g = torch.Generator().manual_seed(seed)
    return 10 + 1e-2 * torch.randn(n, d, generator=g)


DRIFTS = {
    "drift_field": lambda a, b, c, s: drift_field(a, b, c).V,
    "drift_loss": lambda a, b, c, s: drift_loss(a, b, c)[0],
    "awr_kernel": lambda a, b, c, s: awr_kernel_drift_loss(a.reshape(6, 2, -1), b[:12].reshape(6, 2, -1), s)[0],
    "awr_topk": lambda a, b, c, s: awr_topk_drift_loss(a.reshape(6, 2, -1), b[:12].reshape(6, 2, -1), s)[0],
    "awr_hard": lambda a, b, c, s: awr_hard_drift_loss(a.reshape(6, 2, -1), s)[0],
    "awr_advsign": lambda a, b, c, s: awr_advsign_drift_loss(a.reshape(6, 2, -1), s)[0],
}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("name", list(DRIFTS))
def test_the_drift_is_computed_in_fp32_under_autocast(name, precision):
    gen, pos, neg = _close_points(12, 16, 0), _close_points(12, 16, 1), _close_points(4, 16, 2)
    scores = torch.arange(6.0)
    want = DRIFTS[name](gen, pos, neg, scores)
    with torch.autocast("cpu", dtype=HALF[precision]):
        got = DRIFTS[name](gen, pos, neg, scores)
        # half-precision features (what φ returns under autocast) are drifted as their fp32 values
        from_half = DRIFTS[name](gen.to(HALF[precision]), pos.to(HALF[precision]), neg.to(HALF[precision]), scores)
    assert got.dtype == torch.float32 and from_half.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(from_half, DRIFTS[name](*(t.to(HALF[precision]).float() for t in (gen, pos, neg)), scores),
                               rtol=1e-5, atol=1e-6)


# -- SDXL's VAE under fp16 --------------------------------------------------------------------------
def test_sdxl_vae_decodes_in_fp32_under_fp16_autocast_where_fp16_overflows():
    gen = load_generator(ModelConfig(kind="sdxl-turbo", path="tiny-sdxl"), LoraConfig())
    assert gen.vae.config.force_upcast
    # latents that fp16 holds (|x| < 9.5e3 < 65504) but whose decode overflows it: the VAE reads x / 0.13025, up to
    # 9.4e4, at its first convolution; fp32 decodes them (the GroupNorms bring the activations back to O(1))
    latents = 3000 * torch.randn(2, *gen.latent_shape, generator=torch.Generator().manual_seed(0))
    assert finite(latents.half())
    with torch.no_grad():
        want = gen.vae_decode(latents)
        with torch.autocast("cpu", dtype=torch.float16):
            raw = gen.vae.decode(latents / gen.vae.config.scaling_factor).sample  # the VAE itself, in fp16
            got = gen.vae_decode(latents)
    assert not finite(raw), "precondition: this input must overflow the VAE in fp16"
    assert finite(got) and finite(want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# -- GradScaler: exactly for fp16 -------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["auto", "no", "bf16", "fp16"])
def test_grad_scaler_is_on_exactly_for_fp16_and_a_skipped_step_is_counted(tmp_path, fp32_groups, precision):
    t = trainer(tmp_path, precision)
    assert t.learner.scaler.is_enabled() == (precision == "fp16")
    stats = t.learner.update(copy.deepcopy(fp32_groups))
    assert stats["update/applied"] == 1.0
    assert ("update/skipped_nonfinite" in stats) == (precision == "fp16")
    if precision != "fp16":
        return
    assert stats["update/skipped_nonfinite"] == 0.0 and stats["update/loss_scale"] == 2.0**16
    t.learner.scaler.update(new_scale=2.0**120)  # a scale whose fp16 gradients overflow: the step must be skipped
    before = t.generator.trainable_state_dict()
    stats = t.learner.update(copy.deepcopy(fp32_groups))
    after = t.generator.trainable_state_dict()
    assert stats["update/skipped_nonfinite"] == 1.0 and stats["update/applied"] == 0.0
    assert stats["update/loss_scale"] == 2.0**119 and t.learner.version == 2  # the version counts steps, applied or not
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- model rewards score in the run's half precision -------------------------------------------------
@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from tests.tiny_reward_models import build_tiny_hf_clip

    root = tmp_path_factory.mktemp("clip")
    build_tiny_hf_clip(root / "model", root / "processor", seed=3)
    return root / "model", root / "processor"


@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_a_model_reward_scores_in_half_precision_when_the_run_asks(clip_dirs, precision):
    model, processor = clip_dirs
    reward = f"rewards=[{{kind: pickscore, path: '{model}', options: {{processor_path: '{processor}', device: cpu}}}}]"
    cfg = load_config([], [f"trainer.mixed_precision={precision}", reward])
    fn = build_rewards(cfg)["pickscore"][0]
    spy = DtypeSpy(fn.clip.model.vision_model.encoder.layers[0].mlp.fc1)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = fn(images, ["a photo of a red car"] * 4)
    assert set(spy.close()) == {HALF.get(precision, torch.float32)}  # auto: a reward keeps its own default, fp32
    want = build_rewards(load_config([], [reward]))["pickscore"][0](images, ["a photo of a red car"] * 4)
    assert scores.dtype == torch.float32 and finite(scores)
    torch.testing.assert_close(scores, want, rtol=0, atol={"auto": 0, "bf16": 0.5, "fp16": 0.05}[precision])


# -- a whole run says which precision it used ----------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_half_precision_run_reports_its_precision_per_role_and_stays_finite(tmp_path, precision):
    t = trainer(tmp_path, precision, "trainer.steps=2", "trainer.heldout_eval_seeds=0", "trainer.eval_seeds=1")
    said = []
    t.run(on_start=said.append)
    line = format_precision(said[0])
    assert set(said[0]) == {"sampler", "reward", "learner", "features"}
    assert f"sampler {precision} autocast" in line and f"learner {precision} autocast" in line and "drift in fp32" in line
    assert ("GradScaler on" in line) == (precision == "fp16")
    rows = [json.loads(r) for r in (tmp_path / precision / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(finite({k: v for k, v in r.items() if isinstance(v, (int, float))}) for r in rows)

"""The comparison script and the matched-batch compute benchmark run end to end at their smallest settings."""

import json

import pytest
import torch

from benchmarks import compare_methods, compute_matched_batch

SMALL = ["--set", "trainer.prompts_per_step=1", "--set", "algo.num_candidates=4", "--set", "algo.num_anchors=1",
         "--set", "prompts.eval_objects=[kite]", "--set", "trainer.eval_seeds=1"]


def test_compare_methods_writes_table_plot_and_results(tmp_path):
    out = tmp_path / "compare"
    summary = compare_methods.main(["--steps", "2", "--seeds", "1", "--eval-seeds", "2", "--out", str(out), *SMALL])
    assert list(summary) == compare_methods.METHODS
    table = (out / "table.md").read_text()
    for name in ["base", *compare_methods.METHODS]:
        assert f"| {name} |" in table
    assert (out / "reward_vs_distance.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == len(compare_methods.METHODS)
    for s in summary.values():
        assert s["gain"] == pytest.approx(s["policy_mean"] - s["base_mean"], abs=1e-9)
        assert s["distance"] > 0  # two updates moved every method off the base
        assert s["n_prompts"] == 4  # 4 colours × 1 held-out object: the clusters of the standard error


def test_feature_distance_is_zero_for_the_untrained_policy():
    from drpo_core.config import load_config
    from drpo_core.features import build_encoder
    from drpo_core.models.generator_factory import load_generator

    cfg = load_config(["deploy/configs/tiny.yaml"])
    gen = load_generator(cfg.model, cfg.lora)  # peft starts the LoRA at B = 0: policy == base
    enc = build_encoder(cfg.features, gen.latent_shape[0], gen.device)
    d = compare_methods.feature_distance(gen, enc, ["a photo of a red kite"], [1, 2])
    assert d.shape == (1, 2) and float(d.abs().max()) == 0.0
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05)
    assert float(compare_methods.feature_distance(gen, enc, ["a photo of a red kite"], [1, 2]).min()) > 0


def test_compute_benchmark_times_every_stage_at_the_smallest_settings(tmp_path):
    rows = compute_matched_batch.main(["--rewards", "llama-tiny", "--prompts", "1", "--candidates", "4", "--repeats", "1",
                                       "--pipeline", "--json", str(tmp_path / "b.json")])
    (row,) = rows
    stages = row["stages_s"]
    assert {"reward_bwd", "decode_bwd", "unet_bwd"} <= stages["draft"].keys()
    assert "reward_bwd" not in stages["drpo_ref_on"] and "base_fwd" in stages["drpo_ref_on"]
    assert "base_fwd" not in stages["drpo_ref_off"]
    assert all(v >= 0 for s in stages.values() for v in s.values())
    assert row["ratio_draft_over_drpo"]["on"] > 0 and row["ratio_draft_over_pipeline"]["off"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["reward"] == "llama-tiny"


def test_compare_lr_sweep_scores_on_training_prompts_and_reruns_reuse_every_finished_run(tmp_path):
    out = tmp_path / "sweep"
    argv = ["--methods", "drpo", "dpo", "--steps", "1", "--seeds", "1", "--eval-seeds", "1", "--lr-grid", "1e-4", "3e-2",
            "--sweep-steps", "1", "--sweep-eval-seeds", "1", "--method-set", "dpo:algo.dpo.beta=10", "--out", str(out),
            *SMALL, "--set", "prompts.objects=[car]"]
    compare_methods.main(argv)
    sweep = {p.name: torch.load(p, weights_only=False) for p in (out / "sweep" / "results").glob("*.pt")}
    assert len(sweep) == 4  # 2 methods × 2 learning rates, one training seed
    for r in sweep.values():
        assert r["base"].shape == (4, 1)  # the 4 *training* prompts (4 colours × car), never the held-out kite
        assert r["prompts"] == [f"a photo of a {c} car" for c in ("red", "green", "blue", "purple")]
        assert r["steps"] == 1 and r["seed"] == 0
    assert all("algo.dpo.beta=10" in r["overrides"] for r in sweep.values() if r["method"] == "dpo")
    chosen = {}
    for m in ("drpo", "dpo"):
        mine = [r for r in sweep.values() if r["method"] == m]
        chosen[m] = max(mine, key=lambda r: (r["gain"], -r["lr"]))["lr"]
    results = json.loads((out / "results.json").read_text())
    assert results["lr"] == chosen  # each method's table runs use its best validation lr
    assert {r["method"]: r["lr"] for r in results["runs"]} == chosen
    assert all("kite" in p for r in results["runs"] for p in r["prompts"])  # the table: held-out prompts only
    assert f"| {chosen['drpo']:g} |" in (out / "sweep.md").read_text()

    # a rerun with the same arguments trains nothing: every result and checkpoint is reused as it is
    saved = sorted(out.rglob("*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in saved}
    lost = next(iter((out / "results").glob("drpo_*.pt")))
    lost.unlink()  # a run whose evaluation never finished: resumed from its checkpoint, not retrained
    checkpoints = sorted(p.name for p in (out / "runs").rglob("step_*"))
    compare_methods.main(argv)
    assert {p: p.stat().st_mtime_ns for p in saved if p != lost} == {p: t for p, t in stamps.items() if p != lost}
    assert lost.is_file() and sorted(p.name for p in (out / "runs").rglob("step_*")) == checkpoints


def test_compare_refuses_a_per_method_override_for_a_method_not_compared(capsys):
    with pytest.raises(SystemExit) as e:
        compare_methods.main(["--methods", "drpo", "--method-set", "grpo:trainer.lr=1e-3"])
    assert e.value.code == 2
    assert "'grpo' is not one of --methods drpo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        compare_methods.main(["--methods", "drpo", "--method-set", "drpo:trainer.lr=banana"])
    assert e.value.code == 2 and "trainer.lr" in capsys.readouterr().err


@pytest.mark.parametrize("real", [False, True])
def test_fused_drpo_anchor_features_are_a_slice_of_the_candidates_features(real):
    """The fused update takes the anchors' φ from the candidates' own φ forward instead of a second one:
    exact because φ is per sample (GroupNorm or none, no batch statistics), for both benchmark encoders."""
    from drpo_core.config import FeaturesConfig
    from drpo_core.features import build_encoder

    cfg = FeaturesConfig(kind="latent_resnet", width=16 if real else 32, stage_blocks=[1, 1, 1, 1] if real else [1, 1],
                         downsample=real, groups=8 if real else 0)
    torch.manual_seed(0)
    enc = build_encoder(cfg, 4, torch.device("cpu"))
    x = torch.randn(8, 4, 64 if real else 8, 64 if real else 8)
    idx = torch.tensor([5, 0, 7, 2])
    sliced, recomputed = enc(x), enc(x[idx])
    assert sliced.keys() == recomputed.keys()
    for k in sliced:
        torch.testing.assert_close(sliced[k][idx], recomputed[k], rtol=1e-5, atol=1e-6)

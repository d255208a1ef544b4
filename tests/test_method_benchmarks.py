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
    from drpo_core.models.generator import load_generator

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

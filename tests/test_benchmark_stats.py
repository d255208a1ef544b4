"""The statistics the benchmark scripts publish: spread over training seeds and paired alternating timing."""

import pytest

from benchmarks.demo_benchmark import over_seeds, seed_table
from benchmarks.paired_timing import alternating_schedule, summarize_pairs


def result(gain, gain_se=0.01, base=0.1):
    return {"overall": {"gain": gain, "gain_se": gain_se, "base_mean": base, "policy_mean": base + gain,
                        "z": gain / gain_se, "n": 256, "n_prompts": 16}}


def test_over_seeds_is_the_spread_of_each_runs_gain_not_a_pooled_error():
    runs = {42: {"default": result(0.05, 0.010), "shuffled control": result(0.00)},
            43: {"default": result(0.03, 0.012), "shuffled control": result(0.01)},
            44: {"default": result(0.07, 0.009), "shuffled control": result(-0.01)}}
    summary = over_seeds(runs)
    assert list(summary) == ["default", "shuffled control"]
    g = summary["default"]["gain"]
    assert g["n"] == 3 and g["mean"] == pytest.approx(0.05) and g["std"] == pytest.approx(0.02)  # sample std of .03,.05,.07
    assert (g["min"], g["max"]) == (pytest.approx(0.03), pytest.approx(0.07))
    assert summary["default"]["max_gain_se"] == 0.012 and summary["default"]["seeds"] == [42, 43, 44]
    lines = seed_table(summary)
    assert "| default | 3 (42, 43, 44) |" in lines[2] and "+0.0500 ± 0.0200 (+0.0300 – +0.0700)" in lines[2]


def test_one_seed_has_no_spread_and_says_so():
    summary = over_seeds({42: {"default": result(0.05)}})
    assert "± n/a" in seed_table(summary)[2]


def test_pairs_alternate_which_runtime_goes_first():
    assert alternating_schedule(5) == [("local", "ray"), ("ray", "local"), ("local", "ray"), ("ray", "local"), ("local", "ray")]


def test_paired_summary_is_the_median_of_per_pair_ratios():
    walls = [{"local": 100, "ray": 110}, {"local": 90, "ray": 81}, {"local": 100, "ray": 122},
             {"local": 120, "ray": 132}, {"local": 100, "ray": 100}]
    s = summarize_pairs(walls)
    assert s["ratios"] == pytest.approx([1.1, 0.9, 1.22, 1.1, 1.0])
    assert s["median_ratio"] == pytest.approx(1.1) and (s["min_ratio"], s["max_ratio"]) == (pytest.approx(0.9), pytest.approx(1.22))
    assert (s["ray_faster"], s["local_faster"]) == (1, 3)
    # the median of per-pair ratios (2, 0.5, 3, 1/3 → 1.25), not the ratio of the medians (6 / 6 = 1)
    crossed = [{"local": 1, "ray": 2}, {"local": 2, "ray": 1}, {"local": 10, "ray": 30}, {"local": 30, "ray": 10}]
    assert summarize_pairs(crossed)["median_ratio"] == pytest.approx(1.25)

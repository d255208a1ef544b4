"""Prompt-clustered standard errors: against a slow loop oracle, and the property that matters (seeds nested
in prompts do not count as independent evidence)."""

import math
import random

import pytest
import torch

from drpo_core.training.evaluation import paired_gain
from drpo_core.training.statistics import clustered_mean, spread_over_runs


def loop_clustered_se(table: list[list[float]]) -> tuple[float, float]:
    """CR1 cluster-robust SE of the mean, written cell by cell (NaN cells skipped)."""
    cells = [(i, v) for i, row in enumerate(table) for v in row if not math.isnan(v)]
    n = len(cells)
    mean = sum(v for _, v in cells) / n
    totals = {}
    for i, v in cells:
        totals[i] = totals.get(i, 0.0) + (v - mean)
    g = len(totals)
    return mean, math.sqrt(g / (g - 1) * sum(r * r for r in totals.values())) / n


@pytest.mark.parametrize("prompts,seeds,nan_rate", [(7, 3, 0.0), (5, 4, 0.2), (2, 9, 0.1), (13, 1, 0.0)])
def test_clustered_mean_matches_the_loop_oracle(prompts, seeds, nan_rate):
    rng = random.Random(prompts * 100 + seeds)
    table = [[rng.gauss(i * 0.3, 1.0) if rng.random() >= nan_rate else math.nan for _ in range(seeds)] for i in range(prompts)]
    table[0][0] = 0.5  # at least one valid cell in two prompts
    table[1][0] = -0.5
    got = clustered_mean(torch.tensor(table, dtype=torch.float64))
    mean, se = loop_clustered_se(table)
    assert got.mean == pytest.approx(mean, abs=1e-12) and got.se == pytest.approx(se, rel=1e-10)
    assert got.n_cells == sum(not math.isnan(v) for row in table for v in row)


def test_balanced_table_equals_the_standard_error_of_prompt_means():
    x = torch.randn(9, 5, dtype=torch.float64) + torch.arange(9.0, dtype=torch.float64)[:, None]
    prompt_means = x.mean(dim=1)
    assert clustered_mean(x).se == pytest.approx(float(prompt_means.std(unbiased=True) / 3.0), rel=1e-12)


def test_repeating_seeds_within_prompts_does_not_shrink_the_error():
    """Copies of the same cells within a prompt are no new evidence: a cell-level SE would shrink by sqrt(4)."""
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    repeated = x.repeat(1, 4)
    assert clustered_mean(repeated).se == pytest.approx(clustered_mean(x).se, rel=1e-12)

    def cell_se(t):
        return float(t.flatten().std() / math.sqrt(t.numel()))

    assert cell_se(repeated) < 0.55 * cell_se(x)  # what the naive, cell-level error would claim


def test_paired_gain_drops_a_cell_missing_on_either_side_and_reports_clusters():
    base = torch.tensor([[0.1, 0.2], [0.3, float("nan")], [0.0, 0.4]])
    policy = torch.tensor([[0.2, float("nan")], [0.5, 0.9], [0.1, 0.6]])
    r = paired_gain(base, policy)
    assert r.n == 4 and r.n_prompts == 3
    assert r.gain == pytest.approx((0.1 + 0.2 + 0.1 + 0.2) / 4)
    assert r.base_mean == pytest.approx((0.1 + 0.3 + 0.0 + 0.4) / 4)


def test_single_prompt_has_no_clustered_error_and_empty_table_raises():
    assert math.isnan(clustered_mean(torch.tensor([[1.0, 2.0, 3.0]])).se)
    with pytest.raises(ValueError, match="no valid score"):
        clustered_mean(torch.full((2, 2), float("nan")))


def test_spread_over_runs():
    s = spread_over_runs([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}

import math

import torch

from drpo_core.algorithms.normalizer import RunningStats


def test_running_stats_match_batch_statistics_and_round_trip():
    values = torch.tensor([0.1, 0.5, float("nan"), 0.3, 0.9, 0.2])
    stats = RunningStats()
    stats.update(values[:3])
    stats.update(values[3:])
    valid = values[~torch.isnan(values)].double()
    assert stats.count == 5
    assert math.isclose(stats.mean, float(valid.mean()), rel_tol=1e-12)
    assert math.isclose(stats.std, float(valid.std()), rel_tol=1e-12)
    assert math.isclose(stats.normalize(float(valid.mean()) + stats.std), 1.0, rel_tol=1e-9)
    again = RunningStats()
    again.load_state(stats.state())
    assert again.state() == stats.state()


def test_normalize_without_history_is_nan():
    assert math.isnan(RunningStats().normalize(0.3))

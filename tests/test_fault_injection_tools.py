"""The fault-injection benchmark's own parts: the misbehaving reward server does what its table says, and the
lost / duplicated / skipped counts are read correctly from metrics rows (the benchmark itself is not a test)."""

import math

import pytest
import torch

from benchmarks.fault_injection import count_groups
from benchmarks.fault_server import FAULTS, RETRIED, FaultyRewardServer
from drpo_core.rewards.http import HttpReward
from drpo_core.rewards.hue import HueFractionReward
from tests.reward_servers import exact_images, uvicorn_server

PROMPTS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird"]


@pytest.fixture(scope="module")
def faulty():
    server = FaultyRewardServer(hang_s=2.0)
    with uvicorn_server(server.app) as url:
        yield server, url


@pytest.mark.parametrize("fault", FAULTS)
def test_each_injected_fault_has_the_documented_effect_on_the_client(faulty, fault):
    server, url = faulty
    images = exact_images(3, seed=4)
    expected = HueFractionReward()(images, PROMPTS)
    server.arm(fault)
    before = server.fired[fault]
    with HttpReward(f"{url}/score", timeout_s=1.0, max_retries=2, backoff_s=0.01, max_backoff_s=1.5) as reward:
        scores = reward(images, PROMPTS)
        stats = reward.pop_stats()
    assert server.fired[fault] == before + 1 and not server.armed
    if fault in RETRIED:  # only a delay: the scores are those of a healthy server
        torch.testing.assert_close(scores, expected)
        assert stats["retries"] == 1 and stats["errors"] == 0
    elif fault == "nan":
        assert math.isnan(scores[0]) and torch.allclose(scores[1:], expected[1:])
    else:
        assert torch.isnan(scores).all() and stats["retries"] == 0 and stats["errors"] == 1


def row(step, groups=2, kept=2, **skipped):
    return {"step": step, "update/groups": groups, "update/kept_groups": kept, **{f"skipped/{k}": v for k, v in skipped.items()}}


def test_counts_read_from_metrics_rows():
    # a clean run
    assert count_groups([row(1), row(2), row(3)], 3, 2, stopped=False)[:2] == (0, 0)
    # a skipped group with its reason is not lost; one that vanished is
    lost, dup, skipped, _ = count_groups([row(1, kept=1, too_few_valid=1), row(2, kept=1), row(3)], 3, 2, stopped=False)
    assert (lost, dup, dict(skipped)) == (1, 0, {"too_few_valid": 1})
    # a step redone after a learner rollback counts once (its last row); an update that saw 3 groups duplicated one
    assert count_groups([row(1), row(2, groups=3, kept=3), row(2), row(3)], 3, 2, stopped=False)[:2] == (0, 0)
    assert count_groups([row(1), row(2, groups=3, kept=3), row(3)], 3, 2, stopped=False)[:2] == (0, 1)
    # a missing step: lost, unless the run stopped with an error (then nothing was silently lost)
    assert count_groups([row(1)], 3, 2, stopped=False)[0] == 4
    assert count_groups([row(1)], 3, 2, stopped=True)[0] == 0

"""ReplicaPool on the shared cluster: re-queue on death, hedging past a deadline, duplicate drops,
replacement of dead replicas, resizing, bounded attempts. Real actors, real ray.kill."""

import time

import pytest
import torch

from drpo_core.config import load_config
from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.training.scoring import RewardScorer
from drpo_core.training.trainer import build_rewards

ray = pytest.importorskip("ray")

from services.runtime.actors import RewardActor  # noqa: E402
from services.runtime.replica_pool import HEALTH_GROUP, PoolExhaustedError, ReplicaPool  # noqa: E402

CFG = load_config([], ["algo.num_candidates=6", "algo.num_anchors=2"])


class Sleeper:
    """A workload for the pool: sleeps, then returns its tag and pid (or raises when asked to)."""

    def work(self, seconds: float, tag: str):
        time.sleep(seconds)
        if tag == "fail":
            raise ValueError("asked to fail")
        import os

        return tag, os.getpid()

    def ping(self):
        import os

        return {"pid": os.getpid()}


def sleeper_pool(size, max_restarts=0, **kw) -> ReplicaPool:
    cls = ray.remote(concurrency_groups=HEALTH_GROUP)(Sleeper)
    kw = {"health_interval_s": 0.2, "health_timeout_s": 20, "start_timeout_s": 60, **kw}
    pool = ReplicaPool("sleeper", lambda i: cls.options(num_cpus=0.01, max_restarts=max_restarts).remote(), size, **kw)
    pool.wait_ready(60)
    return pool


def drain(pool: ReplicaPool, ids, timeout_s=120.0) -> dict:
    """Poll until every id completed; fails on a second completion of the same id."""
    done, deadline = {}, time.monotonic() + timeout_s
    while set(done) != set(ids):
        assert time.monotonic() < deadline, f"pool did not finish: {sorted(set(ids) - set(done))}"
        for c in pool.poll(0.05):
            assert c.request_id not in done, f"{c.request_id} delivered twice"
            done[c.request_id] = c
    return done


def poll_until(pool, condition, timeout_s=90.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached: {describe(pool)}"
        pool.poll(0.05)


def describe(pool) -> str:
    return (f"stats {dict(pool.stats)}, queue {len(pool.queue)}, calls {len(pool.calls)}, replicas "
            f"{[(r.index, r.state, r.pid, r.ping_ref is not None, r.last_error) for r in pool.replicas]}")


def random_groups(n):
    gen = torch.Generator().manual_seed(0)
    prompts = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird"]
    return [CandidateGroup(f"0:{i}", prompts[i % 3], list(range(6)), torch.zeros(6, 4, 8, 8),
                           torch.rand(6, 3, 32, 32, generator=gen), version=0) for i in range(n)]


def test_reward_pool_scores_like_the_scorer_and_requeues_work_of_a_killed_replica(ray_cluster):
    cls = ray.remote(concurrency_groups=HEALTH_GROUP)(RewardActor)
    pool = ReplicaPool("reward", lambda i: cls.options(num_cpus=0.05, max_restarts=1).remote(CFG.model_dump_json()), 2,
                       max_in_flight=2, health_interval_s=0.5, health_timeout_s=60, start_timeout_s=120)
    try:
        pool.wait_ready(120)
        groups = random_groups(8)
        for g in groups:
            pool.submit(g.group_id, "score", g)
        victim = pool.replicas[0]
        assert victim.in_flight
        ray.kill(victim.handle, no_restart=False)  # Ray restarts it; its running calls fail
        done = drain(pool, [g.group_id for g in groups])
        assert pool.stats["requeued"] >= 1
        expected = RewardScorer(build_rewards(CFG)).score(random_groups(8))
        for g in expected:
            torch.testing.assert_close(done[g.group_id].info.scores, g.scores, equal_nan=True)
            torch.testing.assert_close(done[g.group_id].info.rewards["hue_fraction"], g.rewards["hue_fraction"], equal_nan=True)
        poll_until(pool, lambda: pool.stats["restarts"] >= 1)  # the restart is noticed (new pid)
        assert pool.size == 2
    finally:
        pool.shutdown()


def test_a_late_call_is_hedged_and_its_duplicate_dropped(ray_cluster):
    pool = sleeper_pool(2, request_timeout_s=0.3, stuck_after_s=60, max_in_flight=1, max_attempts=2)
    try:
        pool.submit("slow", "work", 1.0, "slow")
        done = drain(pool, ["slow"])
        assert done["slow"].info[0] == "slow" and pool.stats["requeued"] == 1  # one hedge on the other replica
        poll_until(pool, lambda: pool.stats["duplicates_dropped"] == 1, 30)  # the hedge finished too, and was dropped
        assert {r.state for r in pool.replicas} == {"up"}  # slow is not dead: both answered their pings
    finally:
        pool.shutdown()


def test_a_call_slower_than_the_latency_quantile_is_hedged_long_before_the_fixed_deadline(ray_cluster):
    """p90 × 2 of 5 fast calls (~0.05 s) instead of request_timeout_s=60: the slow call gets its second copy in
    well under a second, and its replica is not suspected (slow is not sick)."""
    pool = sleeper_pool(2, request_timeout_s=60, hedge_quantile=0.9, hedge_factor=2.0, hedge_min_samples=5, max_in_flight=1)
    try:
        for i in range(5):
            pool.submit(f"fast{i}", "work", 0.05, "fast")
        drain(pool, [f"fast{i}" for i in range(5)])
        assert pool.hedge_after("work") < 2.0 and pool.hedge_after("other") == 60
        t0 = time.monotonic()
        pool.submit("slow", "work", 3.0, "slow")
        poll_until(pool, lambda: pool.stats["requeued"] == 1, 10)
        assert time.monotonic() - t0 < 2.5  # hedged before the first copy could finish, 60 s deadline or not
        assert pool.stats["timeouts"] == 1 and {r.state for r in pool.replicas} == {"up"}
    finally:
        pool.shutdown()


def test_dead_replicas_are_replaced_within_budget_and_the_pool_resizes(ray_cluster):
    pool = sleeper_pool(1, restart_budget=1, health_timeout_s=10)
    try:
        ray.kill(pool.replicas[0].handle, no_restart=True)
        poll_until(pool, lambda: pool.stats["replacements"] == 1 and pool.replicas[0].state == "up")
        pool.resize(3)
        poll_until(pool, lambda: sum(r.state == "up" for r in pool.replicas) == 3)
        for i in range(6):
            pool.submit(f"r{i}", "work", 0.05, f"r{i}")
        pids = {c.info[1] for c in drain(pool, [f"r{i}" for i in range(6)]).values()}
        assert len(pids) >= 2  # the work was spread
        pool.resize(1)
        poll_until(pool, lambda: len(pool.replicas) == 1)
        ray.kill(pool.replicas[0].handle, no_restart=True)  # budget spent: the next request fails with a clear error
        poll_until(pool, lambda: pool.replicas[0].state == "dead")  # noticed by its health ping
        with pytest.raises(PoolExhaustedError, match="restart budget"):
            pool.submit("x", "work", 0, "x")
    finally:
        pool.shutdown()


def test_a_failing_request_completes_with_its_error_after_max_attempts(ray_cluster):
    pool = sleeper_pool(2, max_attempts=2)
    try:
        pool.submit("bad", "work", 0.0, "fail")
        done = drain(pool, ["bad"])
        assert "ValueError: asked to fail" in done["bad"].error and "failed 2 times" in done["bad"].error
        assert pool.stats["requeued"] == 1 and pool.stats["failed_requests"] == 1
    finally:
        pool.shutdown()

"""One retry budget for a score request across the layers that may repeat it (drpo_core/rewards/budget.py):
the HTTP client's retries, the pool's re-issues and hedges, Ray task retries (off for pooled calls).

A real JSON reward server on 127.0.0.1 counts the tries of each prompt group; it answers 503 after a pause,
so every layer wants to try again: the client (503 is transient), the pool (the call outlives the hedge
time; a replica is killed mid-call). Whatever happens, one group's tries stay within runtime.max_attempts,
and every request completes."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import pytest
import torch
from fastapi import FastAPI, Request, Response

from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.config import ConfigError, load_config
from drpo_core.rewards.budget import CallBudget
from drpo_core.rewards.http import HttpReward
from tests.reward_servers import exact_images, uvicorn_server


class BusyServer:
    """Every /score try waits ``pause_s`` and answers 503 (Retry-After: 0); tries are counted per first prompt."""

    def __init__(self, pause_s: float):
        self.pause_s, self.tries = pause_s, Counter()
        self.app = FastAPI()

        @self.app.post("/score")
        async def score(request: Request):
            self.tries[json.loads(await request.body())["prompts"][0]] += 1
            await asyncio.sleep(self.pause_s)
            return Response("busy", status_code=503, headers={"retry-after": "0"})


@pytest.fixture(scope="module")
def busy():
    server = BusyServer(pause_s=0.4)
    with uvicorn_server(server.app) as url:
        yield server, f"{url}/score"


def test_the_client_tries_at_most_its_budget_and_starts_nothing_after_the_deadline(busy):
    server, url = busy
    reward = HttpReward(url, max_retries=6, backoff_s=0.01, timeout_s=10)
    images = exact_images(2)
    with reward.budgeted(CallBudget(2)):
        assert torch.isnan(reward(images, ["two tries", "two tries"])).all()
    assert server.tries["two tries"] == 2 and reward.last_attempts == 2
    t0 = time.monotonic()
    with reward.budgeted(CallBudget(6, deadline=time.time() + 1.0)):  # 0.4 s per try: the third ends the time
        reward(images, ["by time", "by time"])
    assert server.tries["by time"] == 3 and time.monotonic() - t0 < 2.0
    with reward.budgeted(CallBudget(6, deadline=time.time() - 1)):
        reward(images, ["late", "late"])
    assert server.tries["late"] == 0
    reward(images, ["no budget", "no budget"])  # outside the runtime: the client's own max_retries
    assert server.tries["no budget"] == 7
    reward.close()


def test_ray_task_retries_are_refused_for_pooled_roles():
    for role in ("reward", "generator"):
        with pytest.raises(ConfigError, match=f"runtime.{role}.max_task_retries: the replica pool retries"):
            load_config([], [f"runtime.{role}.max_task_retries=1"])


ray = pytest.importorskip("ray")

from services.runtime.actors import RewardActor  # noqa: E402
from services.runtime.replica_pool import HEALTH_GROUP, ReplicaPool  # noqa: E402
from services.runtime.roles import ResourcePlan, Role  # noqa: E402


def groups(n: int, tag: str) -> list[CandidateGroup]:
    return [CandidateGroup(f"0:{i}", f"{tag} {i}", list(range(4)), torch.zeros(4, 4, 8, 8), exact_images(4, seed=i), version=0)
            for i in range(n)]


def reward_pool(url: str, max_attempts: int, request_timeout_s: float, deadline_s: float | None = None) -> ReplicaPool:
    cfg = load_config([], ["algo.num_candidates=4", "algo.num_anchors=1", "runtime.reward.max_restarts=1",
                           f'rewards=[{{kind: http, url: "{url}", max_retries: 6, timeout_s: 10, '
                           'options: {backoff_s: 0.01}}]'])
    options = ResourcePlan.from_config(cfg.runtime).actor_options(Role.REWARD)
    assert options["max_task_retries"] == 0  # the pool owns the retries of its calls
    cls = ray.remote(concurrency_groups=HEALTH_GROUP)(RewardActor)
    options.update(num_cpus=0.05)
    pool = ReplicaPool("reward", lambda i: cls.options(**options).remote(cfg.model_dump_json()), 2, max_in_flight=1,
                       request_timeout_s=request_timeout_s, max_attempts=max_attempts, health_interval_s=0.5,
                       health_timeout_s=60, start_timeout_s=120, stuck_after_s=60, call_budget=True, deadline_s=deadline_s)
    pool.wait_ready(120)
    return pool


def drain(pool: ReplicaPool, ids: set, on_poll=lambda: None, timeout_s: float = 90.0) -> dict:
    done, deadline = {}, time.monotonic() + timeout_s
    while set(done) != ids:
        assert time.monotonic() < deadline, f"not finished: {ids - set(done)}; stats {dict(pool.stats)}"
        on_poll()
        for c in pool.poll(0.05):
            assert c.request_id not in done
            done[c.request_id] = c
    return done


def test_hedges_a_killed_replica_and_client_retries_share_one_budget(ray_cluster, busy):
    server, url = busy
    # the hedge time (0.5 s) passes during the first call's retries; replica 0 is killed mid-call once
    pool = reward_pool(url, max_attempts=4, request_timeout_s=0.5)
    try:
        todo = groups(2, "shared")
        for g in todo:
            pool.submit(g.group_id, "score", g)
        killed = []

        def kill_once():
            if not killed and server.tries["shared 0"] >= 1:
                ray.kill(pool.replicas[0].handle, no_restart=False)  # Ray restarts the actor, never re-runs the call
                killed.append(1)

        done = drain(pool, {g.group_id for g in todo}, kill_once)
        assert killed and set(server.tries) >= {"shared 0", "shared 1"}, (server.tries, {k: c.error for k, c in done.items()})
        # without the shared budget: client 7 tries × (first call + hedge + re-issue after the kill) + Ray's retry
        shared = {k: n for k, n in server.tries.items() if k.startswith("shared")}
        assert all(1 <= n <= 4 for n in shared.values()), shared
        assert pool.stats["timeouts"] >= 1  # hedged
        for c in done.values():  # finished: scores missing (the learner skips such a group), never a hang
            assert c.error is not None or torch.isnan(c.info.scores).all()
    finally:
        pool.shutdown()


def test_the_request_deadline_ends_every_layer(ray_cluster, busy):
    server, url = busy
    pool = reward_pool(url, max_attempts=10, request_timeout_s=0.3, deadline_s=1.5)
    try:
        warm = groups(2, "warm-up")  # the first call of a replica imports its encoder: not part of the deadline
        ray.get([r.handle.score.remote(g, budget=CallBudget(1)) for r, g in zip(pool.replicas, warm)], timeout=60)
        t0 = time.monotonic()
        pool.submit("0:0", "score", groups(1, "deadline")[0])
        done = drain(pool, {"0:0"})
        assert time.monotonic() - t0 < 1.5 + 1.0
        assert "passed its deadline" in (done["0:0"].error or "") or torch.isnan(done["0:0"].info.scores).all()
        time.sleep(2.5)  # long enough for more tries, had the client not been told the deadline
        # 10 tries allowed, 0.4 s each: the deadline, not the count, ended it: the first call's tries that start
        # within 1.5 s (at most 4) + the hedge's one (at 0.3 s, with the last try the first call left over)
        assert 2 <= server.tries["deadline 0"] <= 5, server.tries
    finally:
        pool.shutdown()


class StubbornServer:
    """Answers 503 to the first ``failures`` tries of each distinct request body, then scores it (hue)."""

    def __init__(self, failures: int):
        import hashlib

        from tests.reward_servers import FaultyServer

        self.failures, self.tries, self.scorer = failures, Counter(), FaultyServer()
        self.app = FastAPI()

        @self.app.post("/score")
        async def score(request: Request):
            body = await request.body()
            key = hashlib.sha256(body).hexdigest()
            self.tries[key] += 1
            if self.tries[key] <= self.failures:
                return Response("busy", status_code=503, headers={"retry-after": "0"})
            return self.scorer.score(json.loads(body))


def test_a_training_run_through_a_stubborn_reward_spends_the_budget_and_finishes(ray_cluster, tmp_path):
    """The real runtime (RayRuntime + Controller): the reward server refuses each request 3 times; the client
    alone would try a 4th time and succeed, but the request's budget (max_attempts 3, the pool keeps one back)
    lets the call make 2 tries: the groups' scores are missing, the learner skips them, the run finishes."""
    from pathlib import Path

    from drpo_core.training.reporting import read_metrics
    from services.runtime.controller import Controller
    from services.runtime.cluster import RayRuntime

    server = StubbornServer(failures=3)
    with uvicorn_server(server.app) as url:
        cfg = load_config([], [
            "trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.steps=2",
            "trainer.heldout_eval_seeds=0", "trainer.eval_seeds=2", "runtime.max_staleness=0",
            "runtime.generator.num_cpus=0.3", "runtime.reward.num_cpus=0.1", "runtime.learner.num_cpus=0.5",
            "runtime.start_timeout_s=240", "runtime.request_timeout_s=120", "runtime.max_attempts=3",
            f'rewards=[{{kind: http, url: "{url}/score", max_retries: 5, timeout_s: 30, options: {{backoff_s: 0.01}}}}]',
            f"output.dir={tmp_path / 'run'}"])
        rt = RayRuntime.start(cfg, Path(cfg.output.dir))
        try:
            Controller(cfg, rt).run()
        finally:
            rt.shutdown()
    rows = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] or [r["step"] for r in rows] == [0, 1]
    assert server.tries and set(server.tries.values()) == {2}, server.tries  # each training request: 2 of its 3 tries

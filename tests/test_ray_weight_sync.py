"""Collective weight sync for full fine-tuning (runtime.weight_sync: collective): real Ray actors, gloo on CPU.

The learner (rank 0) broadcasts its full tiny UNet in float16 to generator actors; each generator must end up
with exactly the float16 cast of what the object-store path would have given it, report the right version,
and a generator killed (and restarted by Ray) between or during publishes must neither stall a publish nor
sample with wrong weights: it fetches the missed version from the learner, and the next publish re-forms the
group (a new epoch).
"""

import time
from pathlib import Path

import pytest
import torch

from drpo_core.algorithms.groups import candidate_seed
from drpo_core.config import load_config
from drpo_core.training.reporting import read_metrics

ray = pytest.importorskip("ray")

from services.runtime.actors import GeneratorActor, GroupRequest, LearnerActor  # noqa: E402
from services.runtime.controller import Controller  # noqa: E402
from services.runtime.replica_pool import HEALTH_GROUP  # noqa: E402
from services.runtime.cluster import RayRuntime  # noqa: E402
from services.runtime.weight_sync import WEIGHTS_GROUP, CollectivePublisher, sync_mode  # noqa: E402
from services.runtime.weights import WeightsHandle, unpack_state  # noqa: E402

FULL = ["lora.enabled=false", "trainer.prompts_per_step=2", "algo.num_candidates=4", "algo.num_anchors=1",
        "runtime.weight_sync_timeout_s=20", "runtime.request_timeout_s=60", "runtime.start_timeout_s=240",
        "runtime.health_check_interval_s=1", "runtime.generator.num_cpus=0.25", "runtime.reward.num_cpus=0.1",
        "runtime.learner.num_cpus=0.4", "trainer.heldout_eval_seeds=0", "trainer.eval_seeds=2", "trainer.lr=1e-3",
        "runtime.weight_sync_dtype=float16"]  # half the bytes; auto (the model's fp32) is exact: tests/test_ray_parity.py


def remote(cls, **options):
    return ray.remote(concurrency_groups={**HEALTH_GROUP, **WEIGHTS_GROUP})(cls).options(**options)


def unet_state(actor) -> dict[str, torch.Tensor]:
    """An actor's sampling (generator) or training (learner) UNet weights, fetched from its process."""
    return ray.get(actor.__ray_call__.remote(
        lambda self: {k: v.clone() for k, v in (self.sampler if hasattr(self, "sampler") else self.trainer).generator.unet.state_dict().items()}),
        timeout=120)


def move_learner(learner, version: int, seed: int) -> None:
    """Stand-in for an update: move every weight by noise the fp16 cast cannot represent exactly."""
    def step(self):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.trainer.generator.unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 1e-2)
        self.trainer.learner.version = version
    ray.get(learner.__ray_call__.remote(step), timeout=120)


def wait_restarted(actor, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=30)
            return
        except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
            assert time.monotonic() < deadline, "the killed generator was not restarted"
            time.sleep(1)


def sample(generator, handle: WeightsHandle, step: int):
    request = GroupRequest(f"{step}:0", step, 0, "a red cube", [candidate_seed(0, step, 0, i) for i in range(4)])
    return ray.get(generator.generate.options(num_returns=3).remote(handle, request)[2], timeout=120)


def test_broadcast_equals_the_fp16_cast_of_the_object_store_weights_and_survives_a_killed_generator(ray_cluster, tmp_path):
    cfg = load_config([], [*FULL, f"output.dir={tmp_path}"])
    assert sync_mode(cfg) == "collective" and sync_mode(load_config([], [])) == "object_store"  # auto
    cfg_json = cfg.model_dump_json()
    learner = remote(LearnerActor, num_cpus=0.3).remote(cfg_json, str(tmp_path))
    gens = [remote(GeneratorActor, num_cpus=0.2, max_restarts=1).remote(cfg_json) for _ in range(2)]
    ray.get([learner.ping.remote(), *[g.ping.remote() for g in gens]], timeout=240)
    keys = [0, 1]
    publisher = CollectivePublisher(20.0, lambda: list(zip(keys, gens)))
    wait = lambda ref, timeout: ray.get(ref, timeout=timeout)  # noqa: E731

    # 1. version 0 (learner moved away from the generators' identical init) reaches both generators
    move_learner(learner, 0, seed=1)
    report = publisher.publish(learner, 1, 0, wait)
    assert report["ok"] and report["version"] == 0 and publisher.counters == {"epochs": 1, "failures": 0}
    handle = WeightsHandle(0, None, 1, learner)
    infos = [sample(g, handle, 0) for g in gens]
    assert [i.version for i in infos] == [0, 0]
    # the object-store path's payload (the learner's fp32 state) cast to fp16 is what each generator holds
    payload = ray.get(learner.publish_weights.options(num_returns=2).remote()[0], timeout=120)
    want = {k: v.half().float() for k, v in unpack_state(payload).items()}
    for g in gens:
        got = unet_state(g)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert [ray.get(g.sync_stats.remote())["fallback_pulls"] for g in gens] == [0, 0]
    assert [ray.get(g.sync_stats.remote())["received"] for g in gens] == [1, 1]

    # 2. generator 1 is killed (Ray restarts it); publishing version 1 to the old group must not stall
    ray.kill(gens[1], no_restart=False)
    move_learner(learner, 1, seed=2)
    t0 = time.monotonic()
    report = publisher.publish(learner, 2, 1, wait)
    assert time.monotonic() - t0 < 60  # bounded by weight_sync_timeout_s, not a hang
    assert publisher.counters["failures"] == 1 and publisher.broken
    wait_restarted(gens[1])
    handle = WeightsHandle(1, None, 2, learner)
    infos = [sample(g, handle, 1) for g in gens]
    assert [i.version for i in infos] == [1, 1]
    restarted = ray.get(gens[1].sync_stats.remote(), timeout=60)
    assert restarted["received"] == 0 and restarted["fallback_pulls"] == 1  # a new process: the learner's kept copy
    payload = ray.get(learner.publish_weights.options(num_returns=2).remote()[0], timeout=120)
    want = {k: v.half().float() for k, v in unpack_state(payload).items()}
    for g in gens:
        got = unet_state(g)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # an older request after the newer weights: served with what the generator holds (never goes back)
    assert sample(gens[0], WeightsHandle(0, None, 1, learner), 2).version == 1

    # 3. the restarted generator has a new key: the next publish forms a new group and reaches everyone
    keys[1] = 2
    move_learner(learner, 2, seed=3)
    report = publisher.publish(learner, 3, 2, wait)
    assert report["ok"] and publisher.counters == {"epochs": 2, "failures": 1}
    assert [sample(g, WeightsHandle(2, None, 3, learner), 3).version for g in gens] == [2, 2]
    assert ray.get(gens[1].sync_stats.remote())["received"] == 1
    for a in [learner, *gens]:
        ray.kill(a)


def test_a_full_fine_tuning_run_with_two_learner_workers_and_a_generator_killed_mid_run_finishes(ray_cluster, tmp_path):
    steps = 4
    # a data-parallel learner: its rank 0 holds the gradient group (default) and the broadcast group side by side
    cfg = load_config([], [*FULL, f"trainer.steps={steps}", f"output.dir={tmp_path / 'run'}", "runtime.generator.replicas=2",
                           "runtime.learner.replicas=2", "runtime.learner.num_cpus=0.3",
                           "runtime.max_staleness=1", "trainer.sample_every=100", "trainer.checkpoint_every=100"])
    rt = RayRuntime.start(cfg, Path(cfg.output.dir))
    killed = []

    def kill_one(stats):
        if stats["step"] == 2:
            killed.append(rt.generators.replicas[0].pid)
            ray.kill(rt.generators.replicas[0].handle, no_restart=False)

    try:
        t0 = time.monotonic()
        Controller(cfg, rt).run(on_step=kill_one)
        assert time.monotonic() - t0 < 420  # a hung publish would never return; a failed one costs ≤ weight_sync_timeout_s
    finally:
        rt.shutdown()
    rows = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and killed
    assert all(r["update/groups"] == 2 for r in rows)
    assert [r["version"] for r in rows] == list(range(1, steps + 1))  # one new version per step, all learned from
    assert all(0 <= lag <= 1 for r in rows for lag in r["lag/groups"])
    assert rows[0]["runtime/weight_sync_epochs"] == 1
    assert rows[-1]["runtime/weight_sync_epochs"] >= 2  # the restarted generator rejoined in a new group

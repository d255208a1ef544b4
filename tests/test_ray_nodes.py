"""A worker node dies mid-run (ray.cluster_utils nodes added to the shared cluster): the job finishes and
every step still learns from exactly its B prompt groups.

The generators and the reward replica start on one added worker node (the only one with "gen_node").
After step 2 a spare node joins and the first is removed: running calls are re-issued, and groups of the
coming step that were already made there lose their only copy and are made again from the same seeds.

The second test makes that claim checkable: synchronous (max_staleness 0), the node dies after a step's
groups were made and scored but before the learner read them, and the final weights must equal DrpoTrainer's
with the same config (a group made again from other seeds, or with other weights, would change them)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpo_core.config import load_config
from drpo_core.training.reporting import read_metrics
from drpo_core.training.trainer import DrpoTrainer

ray = pytest.importorskip("ray")

from services.runtime.controller import Controller  # noqa: E402
from services.runtime.cluster import RayRuntime  # noqa: E402

MB = 1024 * 1024
CONFIG = [
    # K=16 at 64 px makes both views of a group (rewards': uint8 images, ~200 kB; learner's: latents + base latents,
    # ~130 kB) larger than Ray's 100 kB inline limit, so they live in the node's object store (smaller results
    # travel inline to the driver and survive any worker node)
    "trainer.prompts_per_step=2", "algo.num_candidates=16", "algo.num_anchors=4", "trainer.steps=4", "model.resolution=64",
    "trainer.heldout_eval_seeds=2", "trainer.eval_seeds=2",
    "runtime.generator.replicas=2", "runtime.generator.num_cpus=0.2", "runtime.generator.resources={gen_node: 0.3}",
    "runtime.reward.num_cpus=0.1", "runtime.reward.resources={gen_node: 0.3}", "runtime.learner.num_cpus=0.5",
    # max_staleness 0 with a tiny wait: each step falls back to sampling the next one during the update with the
    # weights at hand (recorded as policy lag), so the next step's groups are being made when the node dies
    "runtime.max_staleness=0", "runtime.staleness_timeout_s=0.01",
    "runtime.start_timeout_s=240", "runtime.request_timeout_s=60", "runtime.health_check_interval_s=1"]


def test_a_dead_worker_node_costs_no_prompt_group(ray_cluster, tmp_path):
    cfg = load_config([], [*CONFIG, f"output.dir={tmp_path / 'run'}"])
    worker = ray_cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB)
    nodes, removed = [worker], []

    def replace_the_worker_node_after_step_2(stats):
        if stats["step"] == 2 and not removed:
            nodes.append(ray_cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB))
            ray_cluster.wait_for_nodes()  # meanwhile the generators finish groups of step 3 on the old node
            ray_cluster.remove_node(worker, allow_graceful=False)
            removed.append(worker)

    try:
        ray_cluster.wait_for_nodes()
        rt = RayRuntime.start(cfg, Path(cfg.output.dir))
        try:
            assert {r.node for r in rt.generators.replicas + rt.rewards.replicas} == {worker.node_id}
            Controller(cfg, rt).run(on_step=replace_the_worker_node_after_step_2)
        finally:
            rt.shutdown()
    finally:
        for n in nodes:
            if n not in removed:
                ray_cluster.remove_node(n)
    rows = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
    assert removed
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["update/groups"] for r in rows] == [2.0] * 4  # none lost, none counted twice
    last = rows[-1]
    assert last["runtime/groups_regenerated"] >= 1  # their data died with the node: made again from the same seeds
    assert last["runtime/staleness_fallbacks"] >= 1 and max(r["lag/max"] for r in rows) >= 1


SYNC = [c for c in CONFIG if not c.startswith(("runtime.max_staleness", "runtime.staleness_timeout_s", "trainer.steps"))]
SYNC += ["runtime.max_staleness=0", "trainer.steps=2"]


def test_groups_lost_with_a_node_are_made_again_from_the_same_seeds_and_weights(ray_cluster, tmp_path, monkeypatch):
    cfg = load_config([], [*SYNC, f"output.dir={tmp_path / 'run'}"])
    worker = ray_cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB)
    nodes, removed = [worker], []
    learn = Controller.learn

    def node_dies_before_the_step_2_update(self, t, groups):
        # step 2's groups exist only in the worker node's object store (made and scored there): remove the node
        if t == 1 and not removed:
            nodes.append(ray_cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB))
            ray_cluster.wait_for_nodes()
            ray_cluster.remove_node(worker, allow_graceful=False)
            removed.append(worker)
        return learn(self, t, groups)

    monkeypatch.setattr(Controller, "learn", node_dies_before_the_step_2_update)
    try:
        ray_cluster.wait_for_nodes()
        rt = RayRuntime.start(cfg, Path(cfg.output.dir))
        try:
            result = Controller(cfg, rt).run()
        finally:
            rt.shutdown()
    finally:
        for n in nodes:
            if n not in removed:
                ray_cluster.remove_node(n)
    rows = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
    assert removed and [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["runtime/groups_regenerated"] >= 1 and all(r["lag/groups"] == [0, 0] for r in rows)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    try:
        trainer = DrpoTrainer(load_config([], [*SYNC, f"output.dir={tmp_path / 'local'}"]))
        local = [trainer.train_step() for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    for row, want in zip(rows, local):
        assert row["reward/mean"] == pytest.approx(want["reward/mean"], rel=1e-5), row["step"]
    got = load_file(str(Path(result["checkpoint"]) / "trainable.safetensors"))
    want = trainer.generator.trainable_state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)

"""A worker node dies mid-run (ray.cluster_utils nodes added to the shared cluster): the job finishes and
every step still learns from exactly its B prompt groups.

The generators and the reward replica start on one added worker node (the only one with "gen_node").
After step 2 a spare node joins and the first is removed: running calls are re-issued, and groups of the
coming step that were already made there lose their only copy and are made again from the same seeds."""

from pathlib import Path

import pytest

from drpo_core.config import load_config
from drpo_core.training.reporting import read_metrics

ray = pytest.importorskip("ray")

from services.controller import Controller  # noqa: E402
from services.runtime import RayRuntime  # noqa: E402

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

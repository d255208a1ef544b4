"""A worker node dies mid-run (ray.cluster_utils nodes added to the shared cluster): the job finishes and
every step still learns from exactly its B prompt groups.

Generators and the reward replica live on two added worker nodes. The node removed is the one holding a
scored group of a coming step whose every copy is there (made and scored on that node): its data dies,
so the group must be made again, and the calls running there are re-issued."""

import threading
import time
from pathlib import Path

import pytest

from drpo_core.config import load_config
from drpo_core.reporting import read_metrics

ray = pytest.importorskip("ray")

from services.controller import Controller  # noqa: E402
from services.runtime import RayRuntime  # noqa: E402

MB = 1024 * 1024
CONFIG = [
    # K=12 makes a group ~150 kB: above Ray's 100 kB inline limit, so it lives in the node's object store
    # (smaller results travel inline to the driver and survive any worker node)
    "trainer.prompts_per_step=2", "algo.num_candidates=12", "algo.num_anchors=3", "trainer.steps=5",
    "trainer.heldout_eval_seeds=2", "trainer.eval_seeds=2",
    # generators and the reward need "gen_node", which only the added nodes have; SPREAD: a generator on each
    "runtime.generator.replicas=2", "runtime.generator.num_cpus=0.2", "runtime.generator.resources={gen_node: 0.3}",
    "runtime.generator.scheduling=SPREAD", "runtime.reward.num_cpus=0.1", "runtime.reward.resources={gen_node: 0.3}",
    "runtime.learner.num_cpus=0.5",
    # max_staleness 0 with a tiny wait: every step falls back to sampling ahead with the weights at hand
    # (recorded as policy lag), so scored groups of coming steps wait in the object store
    "runtime.max_staleness=0", "runtime.staleness_timeout_s=0.01",
    "runtime.start_timeout_s=240", "runtime.request_timeout_s=60", "runtime.health_check_interval_s=1"]


def test_a_dead_worker_node_costs_no_prompt_group(ray_cluster, tmp_path):
    cfg = load_config([], [*CONFIG, f"output.dir={tmp_path / 'run'}"])
    nodes, removed = [], []

    def remove_a_node_holding_groups(controller):
        """Remove the node where a scored group of a coming step was made and scored (its only copies)."""
        deadline = time.monotonic() + 200
        while time.monotonic() < deadline:
            try:
                groups = list(controller.pipeline.groups.values())
            except RuntimeError:  # the controller thread changed the dict; look again
                continue
            reward_node = controller.rt.rewards.replicas[0].node
            for g in groups:
                victim = [n for n in nodes if n.node_id == g.node == reward_node]
                if g.request.step >= 2 and g.request.step > controller.step and g.stage == "ready" and victim:
                    ray_cluster.remove_node(victim[0], allow_graceful=False)
                    removed.append(victim[0])
                    return
            time.sleep(0.002)

    try:
        nodes += [ray_cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB) for _ in range(2)]
        ray_cluster.wait_for_nodes()
        rt = RayRuntime.start(cfg, Path(cfg.output.dir))
        try:
            assert len({r.node for r in rt.generators.replicas}) == 2  # one generator per added node
            controller = Controller(cfg, rt)
            threading.Thread(target=remove_a_node_holding_groups, args=(controller,), daemon=True).start()
            controller.run()
        finally:
            rt.shutdown()
    finally:
        for n in nodes:
            if n not in removed:
                ray_cluster.remove_node(n)
    rows = read_metrics(Path(cfg.output.dir) / "metrics.jsonl")
    assert removed, "no scored group was seen on the reward's worker node"
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["update/groups"] for r in rows] == [2.0] * 5  # none lost, none counted twice
    last = rows[-1]
    assert last["runtime/groups_regenerated"] >= 1  # its data died with the node: made again from the same seeds
    assert last["runtime/staleness_fallbacks"] >= 1 and max(r["lag/max"] for r in rows) >= 1

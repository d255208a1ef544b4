"""The plan check with an autoscaler (runtime.autoscaling): a plan that needs nodes the autoscaler can add is
allowed, one that no node type could ever hold is refused in one line — checked on numbers, then on a real
``ray.cluster_utils.Cluster`` where the test plays the autoscaler by adding the node the plan waits for."""

from pathlib import Path

import pytest

from drpo_core.config import ConfigError, load_config
from services.runtime.roles import PlacementError, ResourcePlan, Role, autoscaled_view, cluster_view

NODE_TYPES = 'runtime.autoscaling={gen: {resources: {CPU: 8, GPU: 1, gen: 1}, max_workers: 3}, ' \
             'lrn: {resources: {CPU: 32, GPU: 4, lrn: 4}, max_workers: 2}}'
ROLES = ["runtime.generator.resources={gen: 1}", "runtime.generator.num_gpus=1", "runtime.learner.resources={lrn: 1}",
         "runtime.learner.num_gpus=1", "runtime.reward.num_cpus=0.5"]
HEAD = {"CPU": 0.0, "memory": 1e9}
GEN = {"CPU": 8.0, "GPU": 1.0, "gen": 1.0, "memory": 1e9}
LRN = {"CPU": 32.0, "GPU": 4.0, "lrn": 4.0, "memory": 1e9}


def setup(*overrides):
    rt = load_config([], [NODE_TYPES, *ROLES, *overrides]).runtime
    return ResourcePlan.from_config(rt), rt.autoscaling


def totals(nodes):
    return {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}


def test_running_nodes_count_toward_their_type_and_the_head_stays():
    _, types = setup()
    nodes = [HEAD, GEN, LRN]
    grown, grown_nodes = autoscaled_view(totals(nodes), nodes, types)
    assert grown["gen"] == 3 and grown["lrn"] == 8 and grown["GPU"] == 3 + 8  # up to max_workers, not max_workers more
    assert grown_nodes[:3] == nodes and len(grown_nodes) == 1 + 3 + 2
    over = [HEAD, GEN, GEN, GEN, GEN]  # more than max_workers running (a manual scale-up): nothing is taken away
    assert autoscaled_view(totals(over), over, types)[0]["gen"] == 4


def test_a_plan_within_what_the_autoscaler_can_add_passes_and_beyond_it_fails_in_one_line():
    nodes = [HEAD, GEN, LRN]
    plan, types = setup("runtime.generator.replicas=3", "runtime.learner.replicas=8")
    with pytest.raises(PlacementError, match=r"needs 11 GPU \(generator 3×1 \+ learner 8×1\), the cluster has 5; .* or add nodes"):
        plan.check(totals(nodes), nodes)  # without the autoscaler: refused
    plan.check(totals(nodes), nodes, types)
    plan, types = setup("runtime.generator.replicas=4")
    with pytest.raises(PlacementError) as e:
        plan.check(totals(nodes), nodes, types)
    assert str(e.value) == ("the plan needs 4 gen (generator 4×1), the cluster has 1 and its autoscaler can grow it to 3 "
                            "(runtime.autoscaling); lower runtime.<role>.replicas / resources or raise a node type's max_workers")
    plan, types = setup("runtime.learner.num_gpus=5")  # no node type has 5 GPUs, however many are added
    with pytest.raises(PlacementError, match="no single node, and no node type the autoscaler can add, can hold one learner"):
        plan.check(totals(nodes), nodes, types)
    plan, types = setup("runtime.reward.resources={tpu: 1}")  # a resource no node type has
    with pytest.raises(PlacementError, match="needs 1 tpu .* can grow it to 0"):
        plan.check(totals(nodes), nodes, types)


def test_a_node_type_needs_resources_and_a_bound():
    for override, where in [("runtime.autoscaling={g: {resources: {}, max_workers: 1}}", "runtime.autoscaling.g.resources"),
                            ("runtime.autoscaling={g: {resources: {CPU: 1}}}", "runtime.autoscaling.g.max_workers"),
                            ("runtime.autoscaling={g: {resources: {CPU: 1}, max_workers: -1}}", "max_workers")]:
        with pytest.raises(ConfigError, match=where):
            load_config([], [override])


ray = pytest.importorskip("ray")


def test_on_a_real_cluster_the_plan_waits_for_the_node_the_autoscaler_adds(ray_cluster, tmp_path):
    from services.runtime.cluster import RayRuntime

    types = "runtime.autoscaling={lrn_pod: {resources: {CPU: 1, lrn_slot: 1}, max_workers: 2}}"
    base = ["runtime.learner.replicas=2", "runtime.learner.num_cpus=0.1", "runtime.learner.resources={lrn_slot: 1}",
            "runtime.start_timeout_s=5", f"output.dir={tmp_path / 'run'}"]
    first = ray_cluster.add_node(num_cpus=1, resources={"lrn_slot": 1})
    added = [first]
    try:
        ray_cluster.wait_for_nodes()
        rt = load_config([], [*base, types]).runtime
        plan = ResourcePlan.from_config(rt)
        with pytest.raises(PlacementError, match="needs 2 lrn_slot .* the cluster has 1; "):
            plan.check(*cluster_view())                       # a fixed cluster cannot hold it
        plan.check(*cluster_view(), node_types=rt.autoscaling)  # the autoscaler can add the second node
        cfg = load_config([], [*base, types, "runtime.learner.replicas=3"])
        with pytest.raises(PlacementError, match="needs 3 lrn_slot .* can grow it to 2 \\(runtime.autoscaling\\)"):
            RayRuntime.start(cfg, tmp_path / "run")           # refused before any actor starts

        @ray.remote
        class Slot:
            def node(self):
                return ray.get_runtime_context().get_node_id()

        options = plan.actor_options(Role.LEARNER)
        options.pop("runtime_env")
        workers = [Slot.options(**options).remote() for _ in range(2)]
        ready, waiting = ray.wait([w.node.remote() for w in workers], num_returns=2, timeout=5)
        assert len(ready) == 1 and len(waiting) == 1         # the second worker waits for a node...
        added.append(ray_cluster.add_node(num_cpus=1, resources={"lrn_slot": 1}))  # ...that the "autoscaler" adds
        nodes = set(ray.get([w.node.remote() for w in workers], timeout=60))
        assert nodes == {n.node_id for n in added}
        for w in workers:
            ray.kill(w)
    finally:
        for node in added:
            ray_cluster.remove_node(node)

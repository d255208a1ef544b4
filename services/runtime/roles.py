"""Roles and resources as data: what each role asks of the cluster, checked before any actor starts.

``ResourcePlan.check`` compares the plan with the cluster's totals and nodes and raises one line that
names the shortfall ("the plan needs 2.5 CPU (generator 2×0.5 + reward 1×0.5 + learner 1×1), the
cluster has 2") instead of leaving an actor pending forever.

With an autoscaler (``runtime.autoscaling``: node types with their resources and ``max_workers``), the
check is made against the largest cluster the autoscaler can grow to: the nodes running now, each node
type topped up to ``max_workers`` nodes. A plan that fits it is allowed (its actors wait for the new
nodes, up to ``runtime.start_timeout_s``); one that does not is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from drpo_core.config import RoleConfig, RuntimeConfig
from drpo_core.config.runtime import NodeTypeConfig

EPS = 1e-9


class Role(str, Enum):
    GENERATOR = "generator"
    REWARD = "reward"
    LEARNER = "learner"


class PlacementError(RuntimeError):
    """The cluster cannot hold the plan; the message names the resource, the need and the capacity."""


@dataclass(frozen=True)
class RolePlan:
    role: Role
    replicas: int
    bundle: dict[str, float]          # resources of one replica: {"CPU": .5, "GPU": 1, "reward_gpu": 1}
    scheduling: str
    max_restarts: int
    max_task_retries: int
    runtime_env: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, role: Role, rc: RoleConfig) -> "RolePlan":
        bundle = {"CPU": rc.num_cpus, "GPU": rc.num_gpus, **rc.resources}
        return cls(role, rc.replicas, {k: v for k, v in bundle.items() if v > 0}, rc.scheduling, rc.max_restarts,
                   rc.max_task_retries, rc.runtime_env)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _fits(bundle: dict[str, float], capacity: dict[str, float]) -> bool:
    return all(capacity.get(k, 0.0) + EPS >= v for k, v in bundle.items())


def _is_type(node: dict[str, float], node_type: NodeTypeConfig) -> bool:
    return all(abs(node.get(k, 0.0) - v) <= EPS for k, v in node_type.resources.items())


def autoscaled_view(cluster: dict[str, float], nodes: list[dict[str, float]],
                    node_types: dict[str, NodeTypeConfig]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The largest cluster the autoscaler can grow ``nodes`` to: each node type topped up to ``max_workers``.

    A running node counts toward the first type whose resources it advertises (the per-role custom resource
    makes that unambiguous); nodes of no type (the head) stay as they are; nothing is ever taken away.
    """
    running = dict.fromkeys(node_types, 0)
    for node in nodes:
        name = next((t for t, nt in node_types.items() if _is_type(node, nt)), None)
        if name is not None:
            running[name] += 1
    grown_cluster, grown_nodes = dict(cluster), list(nodes)
    for name, nt in node_types.items():
        extra = max(0, nt.max_workers - running[name])
        grown_nodes += [dict(nt.resources)] * extra
        for k, v in nt.resources.items():
            grown_cluster[k] = grown_cluster.get(k, 0.0) + v * extra
    return grown_cluster, grown_nodes


@dataclass(frozen=True)
class ResourcePlan:
    roles: dict[Role, RolePlan]
    placement: str = "none"
    extra_env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, runtime: RuntimeConfig, extra_env: dict[str, str] | None = None) -> "ResourcePlan":
        roles = {role: RolePlan.from_config(role, getattr(runtime, role.value)) for role in Role}
        return cls(roles, runtime.placement, dict(extra_env or {}))

    def bundles(self) -> list[tuple[Role, dict[str, float]]]:
        return [(r.role, r.bundle) for r in self.roles.values() for _ in range(r.replicas)]

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for _, bundle in self.bundles():
            for k, v in bundle.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def describe(self, resource: str) -> str:
        parts = [f"{r.role.value} {r.replicas}×{_fmt(r.bundle[resource])}" for r in self.roles.values() if resource in r.bundle]
        return " + ".join(parts)

    def check(self, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None,
              node_types: dict[str, NodeTypeConfig] | None = None) -> None:
        """Raise :class:`PlacementError` if ``cluster`` (``ray.cluster_resources()``) or its ``nodes`` cannot hold the
        plan, even once the autoscaler has added every node of ``node_types`` it may (``runtime.autoscaling``)."""
        now = dict(cluster)
        if node_types:
            cluster, nodes = autoscaled_view(cluster, nodes or [], node_types)
        for resource, need in sorted(self.totals().items()):
            have = cluster.get(resource, 0.0)
            if need > have + EPS:
                knob = f"num_{resource.lower()}s" if resource in ("CPU", "GPU") else "resources"
                if node_types:
                    has = f"{_fmt(now.get(resource, 0.0))} and its autoscaler can grow it to {_fmt(have)} (runtime.autoscaling)"
                    more = "raise a node type's max_workers"
                else:
                    has, more = _fmt(have), "add nodes"
                raise PlacementError(f"the plan needs {_fmt(need)} {resource} ({self.describe(resource)}), the cluster has "
                                     f"{has}; lower runtime.<role>.replicas / {knob} or {more}")
        if nodes is None:
            return
        for role, bundle in self.bundles():
            if not any(_fits(bundle, n) for n in nodes):
                where = "no single node, and no node type the autoscaler can add," if node_types else "no single node"
                raise PlacementError(f"{where} can hold one {role.value} replica {bundle}; the largest node has "
                                     f"{max(nodes, key=lambda n: n.get('CPU', 0.0)) if nodes else {}}")
        if self.placement == "STRICT_PACK" and not any(_fits(self.totals(), n) for n in nodes):
            raise PlacementError(f"placement STRICT_PACK needs one node with {self.totals()}; no node has that much")
        if self.placement == "STRICT_SPREAD" and len(self.bundles()) > len(nodes):
            raise PlacementError(f"placement STRICT_SPREAD needs {len(self.bundles())} nodes (one per replica), the cluster has {len(nodes)}")

    def actor_options(self, role: Role, placement_group=None, bundle_index: int | None = None) -> dict[str, Any]:
        """``.options(...)`` of one replica of ``role``."""
        plan = self.roles[role]
        custom = {k: v for k, v in plan.bundle.items() if k not in ("CPU", "GPU")}
        env = dict(plan.runtime_env or {})
        env["env_vars"] = {**self.extra_env, **env.get("env_vars", {})}
        if plan.bundle.get("GPU", 0.0) == 0:  # Ray 2.60 no longer blanks it: a GPU-less role would still see every GPU
            env["env_vars"].setdefault("CUDA_VISIBLE_DEVICES", "")
        options: dict[str, Any] = {"num_cpus": plan.bundle.get("CPU", 0.0), "num_gpus": plan.bundle.get("GPU", 0.0),
                                   "max_restarts": plan.max_restarts, "max_task_retries": plan.max_task_retries,
                                   "runtime_env": env}
        if custom:
            options["resources"] = custom
        if placement_group is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group, placement_group_bundle_index=bundle_index)
        elif plan.scheduling == "SPREAD":
            options["scheduling_strategy"] = "SPREAD"
        return options

    def reserve(self, timeout_s: float):
        """One placement group for every initial replica (``placement`` != 'none'); returns (group, role → bundle indices)."""
        if self.placement == "none":
            return None, {}
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        indices: dict[Role, list[int]] = {}
        for i, (role, _) in enumerate(self.bundles()):
            indices.setdefault(role, []).append(i)
        group = placement_group([b for _, b in self.bundles()], strategy=self.placement, name="drpo")
        ready, _ = ray.wait([group.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(group)
            raise PlacementError(f"placement group {self.placement} with bundles {[b for _, b in self.bundles()]} was not "
                                 f"placed within {timeout_s:g}s (runtime.start_timeout_s)")
        return group, indices


def cluster_view() -> tuple[dict[str, float], list[dict[str, float]]]:
    """``ray.cluster_resources()`` and the resources of each alive node."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes

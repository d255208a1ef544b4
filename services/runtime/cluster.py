"""Connecting to Ray and starting the three roles: generator pool, reward pool, learner.

``connect``: inside a cluster (``RAY_ADDRESS`` set, as under ``ray job submit``, or
``runtime.address``) it joins it; otherwise it starts an embedded local cluster with
``runtime.local_num_cpus`` CPUs. ``RayRuntime.start`` checks the resource plan against the cluster
first, then applies ``ray.remote`` to the plain actor classes and waits until every replica answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError

from drpo_core.config import DrpoConfig
from services.runtime.actors import GeneratorActor, LearnerActor, RewardActor
from services.runtime.replica_pool import HEALTH_GROUP, PoolExhaustedError, ReplicaPool, short_error
from services.runtime.roles import ResourcePlan, Role, cluster_view
from services.runtime.weight_sync import WEIGHTS_GROUP

# Variables every actor needs to see like the driver does (offline hub, model cache, tokenizer threads).
PROPAGATED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "DRPO_CACHE", "TOKENIZERS_PARALLELISM")


class LearnerStartError(RuntimeError):
    """The learner actor did not come up (bad checkpoint, model error, no resources)."""


def propagated_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PROPAGATED_ENV if k in os.environ}


def connect(cfg: DrpoConfig) -> bool:
    """Join the configured/ambient cluster or start an embedded one; True if this call started Ray."""
    if ray.is_initialized():
        return False
    address = cfg.runtime.address or os.environ.get("RAY_ADDRESS")
    if address:  # an http:// dashboard address is what `ray job submit` takes; drivers join the GCS
        ray.init(address="auto" if address.startswith("http") else address)
        return True
    # address="local": a new embedded cluster even when another one runs on this machine (without it ray.init
    # joins that cluster through /tmp/ray/ray_current_cluster, and fails because num_cpus is set)
    ray.init(address="local", num_cpus=cfg.runtime.local_num_cpus, include_dashboard=False, log_to_driver=False)
    return True


@dataclass
class RoleClasses:
    """The classes that become actors (a benchmark may swap in cost-simulating ones with the same methods)."""

    generator: type = GeneratorActor
    reward: type = RewardActor
    learner: type = LearnerActor


@dataclass
class RayRuntime:
    cfg: DrpoConfig
    plan: ResourcePlan
    generators: ReplicaPool
    rewards: ReplicaPool
    learner: Any
    output_dir: Path
    resume: str | None
    classes: RoleClasses
    placement_group: Any = None
    learner_bundles: list = field(default_factory=list)  # placement-group bundle of each learner worker (or None)
    _remote: dict = field(default_factory=dict)
    learner_workers: list = field(default_factory=list)  # data-parallel ranks; learner_workers[0] is self.learner
    _joined: bool = False
    learner_pings: list = field(default_factory=list)

    @classmethod
    def start(cls, cfg: DrpoConfig, output_dir: Path, resume: Path | None = None, classes: RoleClasses | None = None) -> "RayRuntime":
        rt, classes = cfg.runtime, classes or RoleClasses()
        plan = ResourcePlan.from_config(rt, propagated_env())
        plan.check(*cluster_view(), node_types=rt.autoscaling)
        group, indices = plan.reserve(rt.start_timeout_s)
        remote = {role: ray.remote(concurrency_groups={**HEALTH_GROUP, **WEIGHTS_GROUP})(getattr(classes, role.value)) for role in Role}
        cfg_json = cfg.model_dump_json()

        def factory(role: Role):
            def make(i: int):
                bundles = indices.get(role, [])
                opts = plan.actor_options(role, group if i < len(bundles) else None, bundles[i] if i < len(bundles) else None)
                return remote[role].options(**opts).remote(cfg_json)
            return make

        def pool(role: Role) -> ReplicaPool:
            rc = getattr(rt, role.value)
            return ReplicaPool(role.value, factory(role), rc.replicas, max_in_flight=rc.max_in_flight,
                               request_timeout_s=rt.request_timeout_s, max_attempts=rt.max_attempts,
                               restart_budget=rt.replica_restart_budget, health_interval_s=rt.health_check_interval_s,
                               health_timeout_s=max(30.0, 3 * rt.health_check_interval_s), start_timeout_s=rt.start_timeout_s,
                               hedge_quantile=rt.hedge_quantile, hedge_factor=rt.hedge_factor,
                               hedge_min_samples=rt.hedge_min_samples, hedge_floor_s=rt.hedge_floor_s,
                               # a score request has one budget for every layer (drpo_core/rewards/budget.py)
                               call_budget=role is Role.REWARD,
                               deadline_s=(rt.request_deadline_s or rt.max_attempts * rt.request_timeout_s)
                               if role is Role.REWARD else None)

        self = cls(cfg, plan, None, None, None, Path(output_dir), str(resume) if resume else None, classes, group,
                   indices.get(Role.LEARNER) or [None] * rt.learner.replicas, remote)
        try:
            self.learner = self.new_learner()
            self.generators, self.rewards = pool(Role.GENERATOR), pool(Role.REWARD)
            self.generators.wait_ready(rt.start_timeout_s)
            self.rewards.wait_ready(rt.start_timeout_s)
            self.wait_learner(rt.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        return self

    @property
    def data_parallel(self) -> bool:
        return self.cfg.runtime.learner.replicas > 1

    def new_learner(self):
        """The learner workers (one per runtime.learner.replicas); returns rank 0, the one that publishes,
        checkpoints and evaluates. With several, none is restarted by Ray on its own: a lost worker breaks
        the process group, so the controller replaces the whole group (which resumes from the checkpoint)."""
        workers = []
        for bundle in self.learner_bundles:
            opts = self.plan.actor_options(Role.LEARNER, self.placement_group if bundle is not None else None, bundle)
            if self.data_parallel:
                opts["max_restarts"] = 0
            workers.append(self._remote[Role.LEARNER].options(**opts).remote(self.cfg.model_dump_json(), str(self.output_dir), self.resume))
        self.learner_workers, self._joined = workers, False
        return workers[0]

    def wait_learner(self, timeout_s: float) -> dict:
        """Every learner worker's ping (and, data-parallel, the process group formed through rank 0's
        rendezvous), raising :class:`LearnerStartError` with the constructor's last error line."""
        try:
            pings = self.learner_pings = ray.get([w.ping.remote() for w in self.learner_workers], timeout=timeout_s)
            if self.data_parallel and not self._joined:
                address, port = ray.get(self.learner.rendezvous.remote(), timeout=timeout_s)
                n = len(self.learner_workers)
                ray.get([w.join.remote(address, port, rank, n, self.cfg.runtime.update_timeout_s)
                         for rank, w in enumerate(self.learner_workers)], timeout=timeout_s)
                self._joined = True
            return pings[0]
        except GetTimeoutError:
            raise LearnerStartError(f"the learner did not start within {timeout_s:g}s (runtime.start_timeout_s)") from None
        except RayError as e:
            raise LearnerStartError(f"the learner failed to start: {short_error(e)}") from None

    def placement(self) -> dict[str, float]:
        """``placement/{role}/{device}/{dtype}`` → live replicas there (the start-up line and a metric)."""
        live = ("up", "suspect")
        infos = {"generator": [r.info for r in self.generators.replicas if r.state in live],
                 "reward": [r.info for r in self.rewards.replicas if r.state in live], "learner": self.learner_pings}
        out: dict[str, float] = {}
        for role, found in infos.items():
            for info in found:
                key = f"placement/{role}/{info.get('device', 'unknown')}/{info.get('dtype', 'unknown')}"
                out[key] = out.get(key, 0.0) + 1.0
        return out

    def replace_learner(self) -> None:
        """After the learner died for good (Ray restarts spent, or a data-parallel worker lost): new workers
        resume from the last checkpoint."""
        self._kill_learners()
        self.learner = self.new_learner()

    def _kill_learners(self) -> None:
        for w in self.learner_workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        self.learner_workers = []

    def shutdown(self) -> None:
        for p in (self.generators, self.rewards):
            if p is not None:
                p.shutdown()
        if self.learner is not None:
            self._kill_learners()
            self.learner = None
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


__all__ = ["RayRuntime", "RoleClasses", "connect", "LearnerStartError", "PoolExhaustedError"]

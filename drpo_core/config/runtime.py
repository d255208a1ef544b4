"""Config sections of the Ray actor–learner runtime (``runtime:`` in drpo_core/config/schema.py; docs/ray.md)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from drpo_core.config.sections import Section


class RoleConfig(Section):
    """Resources and fault budget of one role of the distributed runtime (one Ray actor per replica)."""

    replicas: int = Field(1, ge=1)
    num_cpus: float = Field(0.5, ge=0, description="logical CPUs per replica; fractions let roles share a small machine")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica; fractions co-locate roles on one GPU")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per replica, e.g. {reward_gpu: 1}")
    scheduling: Literal["DEFAULT", "SPREAD"] = Field("DEFAULT", description="Ray scheduling strategy when runtime.placement is 'none'")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts of a dead replica (-1 = unlimited)")
    max_task_retries: int = Field(0, ge=-1, description="Ray retries of a call on a restarted replica (only for idempotent calls)")
    max_in_flight: int = Field(2, ge=1, description="requests queued or running per replica")
    runtime_env: dict[str, Any] | None = Field(None, description="Ray runtime_env of this role's actors (pip, env_vars, container...)")


def _pool_owns_retries(role: str):
    """Generator and reward calls are retried by the replica pool within runtime.max_attempts; a Ray task retry
    on top would be a second, unbudgeted layer (its tries multiply the pool's)."""

    def check(cls, v: int) -> int:
        if v != 0:
            raise ValueError(f"the replica pool retries {role} calls within runtime.max_attempts (one budget for every "
                             "layer); Ray task retries would multiply them, so max_task_retries must be 0")
        return v
    return field_validator("max_task_retries")(classmethod(check))


class GeneratorRoleConfig(RoleConfig):
    """Generator replicas: sample K candidates per prompt group with the newest published weights."""

    _no_task_retries = _pool_owns_retries("generator")

    batch_groups: int = Field(1, ge=1, description="prompt groups of one step per generate call (one batched forward "
                              "of up to batch_groups·K candidates); 1 = one group per call")


class RewardRoleConfig(RoleConfig):
    """Reward-server replicas: scoring is idempotent, so the pool re-issues a failed or slow call elsewhere."""

    num_cpus: float = Field(0.25, ge=0)
    _no_task_retries = _pool_owns_retries("reward")


class LearnerRoleConfig(RoleConfig):
    """The learner; a restart resumes from the last checkpoint (an update is never retried).

    ``replicas: N > 1`` is a data-parallel learner: N workers in one torch.distributed process group (NCCL on
    GPU, gloo on CPU), each computing the loss of its share of the step's prompt groups, gradients all-reduced;
    rank 0 publishes weights and writes checkpoints. ``num_gpus`` etc. are per worker.
    """

    replicas: int = Field(1, ge=1, description="data-parallel learner workers (gradients all-reduced)")
    num_cpus: float = Field(1.0, ge=0)
    max_restarts: int = Field(2, ge=-1, description="Ray restarts of a lost learner (one worker); with replicas > 1 the "
                              "controller replaces the whole worker group instead")

    @field_validator("max_task_retries")
    @classmethod
    def _no_update_retries(cls, v: int) -> int:
        if v != 0:
            raise ValueError("an update is not idempotent (it steps the optimizer); max_task_retries must be 0")
        return v


class NodeTypeConfig(Section):
    """One node type the cluster's autoscaler can add (a KubeRay worker group, a cluster-launcher node type)."""

    resources: dict[str, float] = Field(description="Ray resources one node of this type advertises, e.g. "
                                        "{CPU: 8, GPU: 1, generator: 1} (KubeRay: the pod's cpu / nvidia.com/gpu limits "
                                        "and the group's resources)")
    max_workers: int = Field(ge=0, description="nodes of this type the autoscaler may run at most (KubeRay: maxReplicas)")

    @field_validator("resources")
    @classmethod
    def _some_positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v or any(x < 0 for x in v.values()):
            raise ValueError("a node type needs at least one resource and no negative amounts")
        return v


class RuntimeConfig(Section):
    """The Ray actor–learner runtime (``drpo train`` without ``--local``); see docs/ray.md."""

    address: str | None = Field(None, description="Ray address; None: RAY_ADDRESS (inside a job) or an embedded local cluster")
    local_num_cpus: int = Field(2, ge=1, description="CPUs of the embedded local cluster started when no address is known")
    placement: Literal["none", "PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "none", description="reserve all replicas in one placement group with this strategy; 'none' schedules per role")
    autoscaling: dict[str, NodeTypeConfig] = Field(default_factory=dict, description="node types the cluster's "
                                                   "autoscaler can add, by name; the plan check counts up to max_workers "
                                                   "nodes of each (empty: the cluster is what it is now)")
    generator: GeneratorRoleConfig = GeneratorRoleConfig()
    reward: RewardRoleConfig = RewardRoleConfig()
    learner: LearnerRoleConfig = LearnerRoleConfig()
    max_staleness: int = Field(1, ge=0, description="max policy versions between the sampling and the learning weights (0 = synchronous)")
    staleness_timeout_s: float = Field(60.0, gt=0, description="wait this long for fresh weights, then sample with older ones")
    request_timeout_s: float = Field(300.0, gt=0, description="a generate/score call older than this is re-issued to another replica")
    hedge_quantile: float | None = Field(0.95, gt=0, le=1, description="re-issue a call sooner: at hedge_factor × this "
                                         "quantile of the method's recent latencies (null: only at request_timeout_s)")
    hedge_factor: float = Field(2.0, ge=1)
    hedge_min_samples: int = Field(20, ge=1, description="finished calls of a method before its quantile is trusted")
    hedge_floor_s: float = Field(5.0, ge=0, description="never hedge a call younger than this")
    update_timeout_s: float = Field(1800.0, gt=0, description="a learner update older than this counts as a hung learner")
    start_timeout_s: float = Field(300.0, gt=0, description="actors and placement groups must be up within this time")
    health_check_interval_s: float = Field(10.0, gt=0)
    max_attempts: int = Field(3, ge=1, description="tries per generate/score request before giving up on it; for a "
                              "score request every try counts, the pool's re-issues and hedges and a remote reward "
                              "client's own retries alike (one budget; the client's max_retries still caps its share)")
    request_deadline_s: float | None = Field(None, gt=0, description="a score request unanswered this long after it was "
                                             "submitted gives up (its group's scores are missing); no try starts after it; "
                                             "null: max_attempts × request_timeout_s")
    replica_restart_budget: int = Field(4, ge=0, description="replacements of permanently dead replicas, per pool")
    learner_restart_budget: int = Field(2, ge=0, description="learner recoveries from the last checkpoint per job")
    weight_sync: Literal["auto", "object_store", "collective"] = Field(
        "auto", description="how generators get new weights: object_store (one copy per version, pulled), collective "
        "(learner rank 0 broadcasts to the generators; gloo on CPU, NCCL on GPU); auto: collective for full fine-tuning, "
        "object_store for LoRA")
    weight_sync_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the broadcast weights; auto: model.dtype (exact: the generators sample with the "
        "learner's weights; float16 halves an fp32 model's bytes but rounds its weights)")
    weight_sync_timeout_s: float = Field(120.0, gt=0, description="bound on joining and on one broadcast; a generator "
                                         "that missed it fetches that version from the learner instead")
    stop_grace_s: float = Field(25.0, gt=0, description="after SIGTERM/SIGINT, finish the step in hand and checkpoint "
                                "it within this time, else stop mid-step (the newest periodic checkpoint stands); below "
                                "Kubernetes' 30 s termination grace period. Used by --local too")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port of the controller; 0 = off")
    metrics_host: str = Field("127.0.0.1", description="interface of the /metrics server (0.0.0.0 in a cluster pod, "
                              "where Prometheus scrapes it; loopback by default so a laptop run exposes nothing)")

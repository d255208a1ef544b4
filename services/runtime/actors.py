"""Actor bodies of the distributed runtime: thin shells over the plain drpo_core workers.

``CandidateSampler``, ``RewardScorer`` and ``DrpoLearner`` do the work; these classes only build them
from the validated config (sent as JSON), pull published weights, time their calls and return small
control records next to the data. ``ray.remote`` is applied from outside (services/runtime/cluster.py), so a
test can construct every class in-process.
"""

from __future__ import annotations

import os
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drpo_core.training.checkpoint import latest_checkpoint
from drpo_core.config import DrpoConfig
from drpo_core.models.generator_factory import load_generator
from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.algorithms.normalizer import RunningStats
from drpo_core.rewards.budget import CallBudget
from services.rewards.clients import build_reward  # grpc / flow_grpo clients live in services
from drpo_core.training import data_parallel
from drpo_core.training.precision import resolve_precision, reward_at_run_precision
from drpo_core.training.sampler import CandidateSampler
from drpo_core.training.scoring import RewardScorer
from drpo_core.training.trainer import DrpoTrainer, build_rewards
from services.observability.actor_metrics import ActorMetrics
from services.runtime.weight_sync import SyncReceiver, SyncSender, sync_dtype, sync_mode
from services.runtime.weights import WeightsHandle, pack_state, unpack_state


@dataclass(frozen=True)
class GroupRequest:
    """One prompt group to sample: ``group_id`` is ``"<step>:<slot>"`` exactly as in DrpoTrainer.collect."""

    group_id: str
    step: int
    slot: int
    prompt: str
    seeds: list[int]
    metadata: dict | None = None


@dataclass(frozen=True)
class GenerationInfo:
    """What the driver needs about a generated group; the group itself stays in the object store."""

    group_id: str
    version: int
    size: int
    seconds: float
    sync_seconds: float
    pid: int
    node: str | None = None  # the Ray node whose object store holds the group


@dataclass
class ScoreResult:
    """Rewards and ranking scores of one group (``rewards``: label → `[K']`, ``scores``: `[K']`, NaN = missing)."""

    group_id: str
    version: int
    rewards: dict[str, torch.Tensor]
    scores: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    attempts: int = 1  # the most tries a remote reward's batch made in this call (within its CallBudget)

    @classmethod
    def missing(cls, group_id: str, version: int, size: int, labels: list[str]) -> "ScoreResult":
        """Every score missing: the learner skips the group (``too_few_valid``) instead of the job stalling."""
        nan = torch.full((size,), float("nan"))
        return cls(group_id, version, {label: nan.clone() for label in labels}, nan.clone())


class LearnerRestartedError(RuntimeError):
    """The learner's state is not the one the controller last saw (Ray restarted it from a checkpoint)."""


def _config(cfg_json: str) -> DrpoConfig:
    return DrpoConfig.model_validate_json(cfg_json)


def _whereabouts(**extra) -> dict:
    """What a health ping returns: the process id (a restart changes it) and the Ray node."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"pid": os.getpid(), "node": node, **extra}


class DeviceUnavailableError(RuntimeError):
    """A role was given GPUs but its actor cannot use CUDA (no device visible, driver too old for this torch)."""


def check_gpu(role: str, num_gpus: float) -> None:
    """A role with ``num_gpus > 0`` must see CUDA: stop at start in one line instead of training on the CPU
    without a word (``model.device: auto`` would fall back silently)."""
    if num_gpus <= 0:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        usable = torch.cuda.is_available()  # warns e.g. "The NVIDIA driver on your system is too old"
    if usable:
        return
    why = "; ".join(str(w.message).strip().splitlines()[0] for w in caught) or "torch.cuda.is_available() is False"
    raise DeviceUnavailableError(f"runtime.{role}.num_gpus={num_gpus:g} but this {role} actor cannot use CUDA "
                                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__} "
                                 f"built for CUDA {torch.version.cuda}): {why}")


def device_report(device: torch.device, dtype: str) -> dict:
    """Where a role computes, for the start-up log and the ``placement/{role}/{device}/{dtype}`` metric."""
    report = {"device": str(device), "dtype": dtype, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if device.type == "cuda":
        report["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1024 ** 3
        report["gpu_name"] = torch.cuda.get_device_name(device)
    return report


def _compute_dtype(cfg, device: torch.device) -> str:
    """``model.dtype``, with ``+bf16`` / ``+fp16`` when the role autocasts (trainer.mixed_precision on this device)."""
    precision = resolve_precision(device, cfg.trainer.mixed_precision)
    return cfg.model.dtype if precision == "fp32" else f"{cfg.model.dtype}+{precision}"


def _pull(handle: WeightsHandle, timeout_s: float) -> dict[str, torch.Tensor]:
    import ray

    payload = ray.get(handle.ref, timeout=timeout_s) if isinstance(handle.ref, ray.ObjectRef) else handle.ref
    return unpack_state(payload)


class GeneratorActor:
    """Holds a OneStepGenerator; samples K candidates (+ frozen-base latents) per request."""

    def __init__(self, cfg_json: str):
        cfg = _config(cfg_json)
        check_gpu("generator", cfg.runtime.generator.num_gpus)
        self.pull_timeout_s = cfg.runtime.request_timeout_s
        self.sampler = CandidateSampler.for_algo(load_generator(cfg.model, cfg.lora), cfg.algo, cfg.trainer.mixed_precision)
        self.sampler.version = -1  # no published weights yet: the first request always pulls
        if cfg.model.merge_lora_for_sampling:  # sampling-only: stay merged; load_trainable_state_dict re-merges once per version
            self.sampler.generator.merge_lora(keep=True)
        self.dtype = _compute_dtype(cfg, self.sampler.generator.device)
        self.serial, self.receiver = -1, None  # collective weight sync: the publish held, the broadcast end
        if sync_mode(cfg) == "collective":
            shapes = {k: tuple(v.shape) for k, v in self.sampler.generator.trainable_state_dict().items()}
            self.receiver = SyncReceiver(sync_dtype(cfg), self.sampler.generator.device, shapes)
        self.metrics = ActorMetrics(cfg, "generator")

    def _sync(self, weights: WeightsHandle) -> float:
        """Pull the published version if ours differs (a restarted learner may publish an older one). Collective
        sync: switch to the staged broadcast (or fetch a missed one) when the request's publish is newer."""
        if weights.source is not None:
            if weights.serial <= self.serial:
                return 0.0
            t0 = time.perf_counter()
            serial, version, state = self.receiver.weights_for(weights, self.pull_timeout_s)
            self.sampler.set_weights(state, version)
            self.serial = serial
            return time.perf_counter() - t0
        if weights.version == self.sampler.version:
            return 0.0
        t0 = time.perf_counter()
        self.sampler.set_weights(_pull(weights, self.pull_timeout_s), weights.version)
        return time.perf_counter() - t0

    def sync_receive(self, *args) -> dict:
        """Collective weight sync, on the ``weights`` thread: join the epoch if new, receive into a staging copy."""
        return self.receiver.receive(*args)

    def sync_stats(self) -> dict:
        return {"serial": self.serial, "version": self.sampler.version, **(self.receiver.stats if self.receiver else {})}

    def generate(self, weights: WeightsHandle, request: GroupRequest) -> tuple[CandidateGroup, CandidateGroup, GenerationInfo]:
        """Called with num_returns=3: the rewards' view (uint8 images), the learner's view (latents, seeds), the info.

        Two objects, so each role pulls only what it reads: the learner never receives images (at 512 px,
        K=24: 75 MB of fp32 images per group before, 3 MB of latents now); both are CPU tensors.
        """
        sync = self._sync(weights)
        t0 = time.perf_counter()
        group = self.sampler.sample(request.group_id, request.prompt, request.seeds, request.metadata)
        return group.for_reward(), group.for_learner(), self._info(group, time.perf_counter() - t0, sync)

    def generate_batch(self, weights: WeightsHandle, *requests: GroupRequest) -> tuple:
        """Several groups in one batched forward (runtime.generator.batch_groups); called with num_returns=2n+1:
        each group's rewards' and learner's views, then the list of their GenerationInfo."""
        sync = self._sync(weights)
        t0 = time.perf_counter()
        groups = self.sampler.sample_many([(r.group_id, r.prompt, r.seeds, r.metadata) for r in requests])
        seconds = (time.perf_counter() - t0) / len(groups)  # each group's share of the batch
        views = [v for g in groups for v in (g.for_reward(), g.for_learner())]
        return (*views, [self._info(g, seconds, sync if i == 0 else 0.0) for i, g in enumerate(groups)])

    def extend(self, weights: WeightsHandle, reward_view: CandidateGroup, learner_view: CandidateGroup,
               seeds: list[int]) -> tuple[CandidateGroup, CandidateGroup, GenerationInfo]:
        """Another K-candidate round for a binary reward that found too few passes or fails (num_returns=3)."""
        sync = self._sync(weights)
        t0 = time.perf_counter()
        group = self.sampler.extend(CandidateGroup.joined(reward_view, learner_view), seeds)
        return group.for_reward(), group.for_learner(), self._info(group, time.perf_counter() - t0, sync)

    def _info(self, group: CandidateGroup, seconds: float, sync: float) -> GenerationInfo:
        self.metrics.generated(group.size, seconds, sync, group.version)
        where = _whereabouts()
        return GenerationInfo(group.group_id, group.version, group.size, seconds, sync, where["pid"], where["node"])

    def ping(self) -> dict:
        return _whereabouts(version=self.sampler.version, **device_report(self.sampler.generator.device, self.dtype))


class RewardActor:
    """Holds a RewardScorer with the configured rewards; scores one group per call (idempotent)."""

    def __init__(self, cfg_json: str):
        cfg = _config(cfg_json)
        check_gpu("reward", cfg.runtime.reward.num_gpus)
        self.scorer = RewardScorer(build_rewards(cfg, builder=build_reward), binary=cfg.algo.binary_threshold is not None,
                                   shuffle_seed=cfg.trainer.seed if cfg.algo.shuffle_rewards else None)
        self.metrics = ActorMetrics(cfg, "reward")

    def score(self, group: CandidateGroup, budget: CallBudget | None = None) -> ScoreResult:
        """``budget``: the tries and deadline the pool gave this call; remote rewards retry within it."""
        t0 = time.perf_counter()
        remote = [fn for fn, _ in self.scorer.rewards.values() if hasattr(fn, "budgeted")]  # HTTP / gRPC clients
        try:
            with ExitStack() as stack:
                for fn in remote:
                    stack.enter_context(fn.budgeted(budget))
                self.scorer.score([group])
        except Exception:
            self.metrics.score_failed()
            raise
        self.metrics.scored_group(group.size, time.perf_counter() - t0)
        return ScoreResult(group.group_id, group.version, group.rewards, group.scores, self.scorer.pop_stats(),
                           time.perf_counter() - t0, max([fn.last_attempts for fn in remote], default=1))

    def ping(self) -> dict:
        fn = next(iter(self.scorer.rewards.values()))[0]
        device = getattr(fn, "device", None)  # model rewards hold a device; remote and pixel rewards compute on CPU here
        return _whereabouts(**device_report(torch.device(device) if device is not None else torch.device("cpu"), "float32"))


class LearnerActor:
    """Holds a DrpoTrainer whose learner updates, checkpoints and publishes; its sampler and scorer stay idle.

    The trainer is built exactly as in the local runtime (same seed, same order: identical LoRA init),
    so checkpoints, resume (weights, optimizer, scheduler, RNG, step, prompt position, reward history),
    sample grids and the held-out eval are the trainer's own code. Only the first reward is built here,
    for the grids' prompt classes and the eval. On construction it resumes from the newest checkpoint of
    its run folder (a Ray restart after a crash) or of ``resume``.
    """

    def __init__(self, cfg_json: str, output_dir: str, resume: str | None = None):
        cfg = _config(cfg_json)
        check_gpu("learner", cfg.runtime.learner.num_gpus)
        first = cfg.rewards[0]
        self.trainer = DrpoTrainer(cfg, output_dir=Path(output_dir), rewards={
            first.label: (build_reward(reward_at_run_precision(first, cfg.trainer.mixed_precision)), first.weight)})
        self.checkpoint_dir = latest_checkpoint(Path(output_dir)) or (resume and (latest_checkpoint(Path(resume)) or Path(resume)))
        if self.checkpoint_dir:
            self.trainer.resume(Path(self.checkpoint_dir))
        self.rank = 0  # data parallel: set by join(); rank 0 alone publishes, checkpoints and evaluates
        self.sender = SyncSender(sync_dtype(cfg), self.trainer.generator.device) if sync_mode(cfg) == "collective" else None
        self.metrics = ActorMetrics(cfg, "learner")

    # -- data parallel (runtime.learner.replicas > 1) -----------------------------------------------
    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: this node's address and a free port, where the other workers meet it (as Ray Train's
        TorchConfig does for its worker group)."""
        import socket

        import ray

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int, rank: int, world: int, timeout_s: float) -> dict:
        """Enter the learners' process group (NCCL on GPU, gloo on CPU) and take rank 0's state: weights,
        optimizer, scheduler and version (a worker that found another checkpoint, or none, starts where rank 0 is)."""
        from datetime import timedelta

        import torch.distributed as dist

        t = self.trainer
        backend = "nccl" if t.generator.device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(t.generator.device)
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        state = data_parallel.broadcast_state(t.generator.trainable_parameters(),
                                              {"learner": t.learner.state(), "step": t.step} if rank == 0 else None)
        if rank != 0:
            t.learner.load_state(state["learner"])
            t.step = state["step"]
        self.rank = rank
        return {"rank": rank, "world": world, "backend": backend, "version": t.learner.version}

    def restore_point(self) -> dict:
        """What the controller continues from: step, weight version, prompt position, reward history."""
        t = self.trainer
        return {"step": t.step, "version": t.learner.version, "sampler": t.prompts.state(), "checkpoint": str(self.checkpoint_dir),
                "reward_history": {k: v.state() for k, v in t.reward_history.items()}}

    def _expect(self, version: int) -> None:
        """A learner that Ray restarted from an older checkpoint must not take calls meant for the old one."""
        if version != self.trainer.learner.version:
            raise LearnerRestartedError(f"learner is at version {self.trainer.learner.version} (restarted from "
                                        f"{self.checkpoint_dir}), the controller expected {version}")

    def update(self, expect_version: int, scores: list[ScoreResult], *groups: CandidateGroup) -> dict[str, float]:
        """One DrPO step on scored groups: their learner views (Ray resolves the references before the call)."""
        self._expect(expect_version)
        t0 = time.perf_counter()
        for g, s in zip(groups, scores, strict=True):
            g.rewards, g.scores = s.rewards, s.scores
        stats = self.trainer.learner.update(list(groups))
        stats.update({"version": float(self.trainer.learner.version), "timing/update_s": time.perf_counter() - t0})
        self.metrics.updated(stats["timing/update_s"], self.trainer.learner.version, stats.get("update/policy_lag", 0.0))
        return stats

    def publish_weights(self) -> tuple[dict, int]:
        """The trainable state as numpy arrays (called with num_returns=2: the first return is the one
        object-store copy of this version, the second its version number for the driver)."""
        payload = pack_state(self.trainer.generator.trainable_state_dict())
        self.metrics.published_bytes(sum(array.nbytes for array, _ in payload.values()))
        return payload, self.trainer.learner.version

    # -- collective weight sync (services/runtime/weight_sync.py) -----------------------------------
    def _live_state(self) -> dict[str, torch.Tensor]:
        g = self.trainer.generator  # the full UNet without a CPU copy; a LoRA in peft naming
        return g.trainable_state_dict() if g.lora_cfg.enabled else {k: v.detach() for k, v in g.unet.state_dict().items()}

    def sync_rendezvous(self, world: int, timeout_s: float) -> tuple[str, int, str]:
        return self.sender.rendezvous(self._live_state(), world, timeout_s)

    def sync_send(self, epoch: int, world: int, serial: int, version: int, timeout_s: float) -> dict:
        self._expect(version)
        report = self.sender.send(self._live_state(), epoch, world, serial, version, timeout_s)
        self.metrics.published_bytes(report.get("bytes", 0))
        return {**report, "version": version}

    def sync_payload(self) -> tuple[int, int, dict]:
        """The newest broadcast version for a generator that missed it (``weights`` concurrency group: served
        while an update runs)."""
        return self.sender.payload()

    def checkpoint(self, expect_version: int, step: int, sampler_state: dict, reward_history: dict) -> str:
        """DrpoTrainer.save_checkpoint with the controller's step, prompt position and reward history."""
        self._expect(expect_version)
        t = self.trainer
        t.step = step
        t.prompts.load_state(sampler_state)
        t.reward_history = {k: running_stats(v) for k, v in reward_history.items()}
        self.checkpoint_dir = t.save_checkpoint()
        return str(self.checkpoint_dir)

    def save_samples(self, name: str, averaged: bool = False) -> str:
        return str(self.trainer.save_samples(name, averaged=averaged))

    def save_before_after(self) -> str:
        return str(self.trainer.save_before_after())

    def evaluate(self, seeds: int) -> dict:
        return self.trainer.evaluate(seeds)

    def ping(self) -> dict:
        t = self.trainer
        return _whereabouts(version=t.learner.version, **device_report(t.generator.device, _compute_dtype(t.cfg, t.generator.device)))


def running_stats(state: dict) -> RunningStats:
    running = RunningStats()
    running.load_state(state)
    return running

"""Actor bodies of the distributed runtime: thin shells over the plain drpo_core workers.

``CandidateSampler``, ``RewardScorer`` and ``DrpoLearner`` do the work; these classes only build them
from the validated config (sent as JSON), pull published weights, time their calls and return small
control records next to the data. ``ray.remote`` is applied from outside (services/runtime.py), so a
test can construct every class in-process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drpo_core.training.checkpoint import latest_checkpoint
from drpo_core.config import DrpoConfig
from drpo_core.models.generator import load_generator
from drpo_core.algorithms.groups import CandidateGroup
from drpo_core.algorithms.normalizer import RunningStats
from services.rewards import build_reward  # grpc / flow_grpo clients live in services
from drpo_core.training.sampler import CandidateSampler
from drpo_core.training.scoring import RewardScorer
from drpo_core.training.trainer import DrpoTrainer, build_rewards
from services.weights import WeightsHandle, pack_state, unpack_state


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


def _pull(handle: WeightsHandle, timeout_s: float) -> dict[str, torch.Tensor]:
    import ray

    payload = ray.get(handle.ref, timeout=timeout_s) if isinstance(handle.ref, ray.ObjectRef) else handle.ref
    return unpack_state(payload)


class GeneratorActor:
    """Holds a OneStepGenerator; samples K candidates (+ frozen-base latents) per request."""

    def __init__(self, cfg_json: str):
        cfg = _config(cfg_json)
        self.pull_timeout_s = cfg.runtime.request_timeout_s
        self.sampler = CandidateSampler(load_generator(cfg.model, cfg.lora), with_base=cfg.algo.needs_base)
        self.sampler.version = -1  # no published weights yet: the first request always pulls

    def _sync(self, weights: WeightsHandle) -> float:
        """Pull the published version if ours differs (a restarted learner may publish an older one)."""
        if weights.version == self.sampler.version:
            return 0.0
        t0 = time.perf_counter()
        self.sampler.set_weights(_pull(weights, self.pull_timeout_s), weights.version)
        return time.perf_counter() - t0

    def generate(self, weights: WeightsHandle, request: GroupRequest) -> tuple[CandidateGroup, GenerationInfo]:
        sync = self._sync(weights)
        t0 = time.perf_counter()
        group = self.sampler.sample(request.group_id, request.prompt, request.seeds, request.metadata)
        return group, self._info(group, time.perf_counter() - t0, sync)

    def extend(self, weights: WeightsHandle, group: CandidateGroup, seeds: list[int]) -> tuple[CandidateGroup, GenerationInfo]:
        """Another K-candidate round for a binary reward that found too few passes or fails."""
        sync = self._sync(weights)
        t0 = time.perf_counter()
        group = self.sampler.extend(group, seeds)
        return group, self._info(group, time.perf_counter() - t0, sync)

    def _info(self, group: CandidateGroup, seconds: float, sync: float) -> GenerationInfo:
        where = _whereabouts()
        return GenerationInfo(group.group_id, group.version, group.size, seconds, sync, where["pid"], where["node"])

    def ping(self) -> dict:
        return _whereabouts(version=self.sampler.version)


class RewardActor:
    """Holds a RewardScorer with the configured rewards; scores one group per call (idempotent)."""

    def __init__(self, cfg_json: str):
        cfg = _config(cfg_json)
        self.scorer = RewardScorer(build_rewards(cfg, builder=build_reward), binary=cfg.algo.binary_threshold is not None,
                                   shuffle_seed=cfg.trainer.seed if cfg.algo.shuffle_rewards else None)

    def score(self, group: CandidateGroup) -> ScoreResult:
        t0 = time.perf_counter()
        self.scorer.score([group])
        return ScoreResult(group.group_id, group.version, group.rewards, group.scores, self.scorer.pop_stats(),
                           time.perf_counter() - t0)

    def ping(self) -> dict:
        return _whereabouts()


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
        first = cfg.rewards[0]
        self.trainer = DrpoTrainer(cfg, output_dir=Path(output_dir), rewards={first.label: (build_reward(first), first.weight)})
        self.checkpoint_dir = latest_checkpoint(Path(output_dir)) or (resume and (latest_checkpoint(Path(resume)) or Path(resume)))
        if self.checkpoint_dir:
            self.trainer.resume(Path(self.checkpoint_dir))

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
        """One DrPO step on scored groups (Ray resolves the group references before the call)."""
        self._expect(expect_version)
        t0 = time.perf_counter()
        for g, s in zip(groups, scores, strict=True):
            g.rewards, g.scores = s.rewards, s.scores
        stats = self.trainer.learner.update(list(groups))
        stats.update({"version": float(self.trainer.learner.version), "timing/update_s": time.perf_counter() - t0})
        return stats

    def publish_weights(self) -> tuple[dict, int]:
        """The trainable state as numpy arrays (called with num_returns=2: the first return is the one
        object-store copy of this version, the second its version number for the driver)."""
        return pack_state(self.trainer.generator.trainable_state_dict()), self.trainer.learner.version

    def checkpoint(self, expect_version: int, step: int, sampler_state: dict, reward_history: dict) -> str:
        """DrpoTrainer.save_checkpoint with the controller's step, prompt position and reward history."""
        self._expect(expect_version)
        t = self.trainer
        t.step = step
        t.prompts.load_state(sampler_state)
        t.reward_history = {k: running_stats(v) for k, v in reward_history.items()}
        self.checkpoint_dir = t.save_checkpoint()
        return str(self.checkpoint_dir)

    def save_samples(self, name: str) -> str:
        return str(self.trainer.save_samples(name))

    def save_before_after(self) -> str:
        return str(self.trainer.save_before_after())

    def evaluate(self, seeds: int) -> dict:
        return self.trainer.evaluate(seeds)

    def ping(self) -> dict:
        return _whereabouts(version=self.trainer.learner.version)


def running_stats(state: dict) -> RunningStats:
    running = RunningStats()
    running.load_state(state)
    return running

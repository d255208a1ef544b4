"""The driver of the distributed runtime: DrpoTrainer's loop with each stage on other actors.

    for step t:
        prompts  ← next B prompts; K seeds each                      (issued up to max_staleness steps ahead)
        groups   ← generators sample with weights v ≥ t − max_staleness; the reward pool scores each group
        update   ← learner: rank top-M / bottom-M, drift, regress, AdamW  (generators keep sampling t+1 meanwhile)
        publish  ← one object-store copy of version t+1; generators pull it with their next request

With ``max_staleness = 0`` every step samples with the weights of the previous update, which makes a
step identical to ``DrpoTrainer.train_step`` (tested). Outputs are the local trainer's: config.yaml,
metrics.jsonl (same keys plus timing/*, lag/*, runtime/*, pool/*), the reward curve, sample grids,
checkpoints (written by the learner).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError
from safetensors import SafetensorError

from drpo_core.config import DrpoConfig, dump_config
from drpo_core.training.checkpoint import CheckpointError
from drpo_core.training.prompts import PromptSampler, training_prompts
from drpo_core.training.reporting import MetricsWriter, plot_reward_curve
from drpo_core.training.stopping import GracefulStop
from drpo_core.training.tracking import RunTracker
from drpo_core.training.trainer import group_stats
from services.runtime.actors import LearnerRestartedError, running_stats
from services.runtime.pipeline import GroupPipeline, TrackedGroup
from services.runtime.replica_pool import short_error
from services.runtime.cluster import RayRuntime
from services.runtime.weight_sync import CollectivePublisher, sync_mode
from services.runtime.weights import WeightStore

log = logging.getLogger("drpo.controller")


class LearnerLostError(RuntimeError):
    """The learner died or hung; the controller rolls back to its last checkpoint."""


class LearnerHungError(LearnerLostError):
    """A learner call ran past its timeout: the actor is replaced, not waited for."""


def shares(items: list, n: int) -> list[list]:
    """``items`` in ``n`` contiguous parts whose sizes differ by at most one (the first ones get the extra)."""
    q, r = divmod(len(items), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


class StageTimer(dict):
    @contextmanager
    def __call__(self, key: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[key] = self.get(key, 0.0) + time.perf_counter() - t0


class Controller:
    def __init__(self, cfg: DrpoConfig, runtime: RayRuntime, output_dir: Path | None = None, exporter=None):
        self.cfg, self.rt, self.exporter = cfg, runtime, exporter
        self.output_dir = Path(output_dir or cfg.output.dir)
        self.weights = WeightStore()
        self.collective = (CollectivePublisher(cfg.runtime.weight_sync_timeout_s, self.generator_members)
                           if sync_mode(cfg) == "collective" else None)  # else: through the object store
        self.pipeline = GroupPipeline(cfg, runtime.generators, runtime.rewards, self.weights)
        self.counters: Counter = Counter()
        self.step = self.next_issue = 0
        self.sampler_states: dict[int, dict] = {}
        self.metrics: MetricsWriter | None = None
        self.reward_history: dict = {}  # running reward stats (reward/<label>/normalized), checkpointed by the learner

    # -- the loop (reads like the algorithm box) --------------------------------------------------
    def run(self, on_step: Callable[[dict], None] | None = None, resume: Path | None = None,
            stop: GracefulStop | None = None) -> dict:
        out, tc = self.output_dir, self.cfg.trainer
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(self.cfg))
        self.restore()  # step, version and prompt position of the learner's checkpoint (step 0 when new)
        tracker = RunTracker(out, self.cfg, start_step=self.step, resuming=resume is not None)  # the one writer, on the driver
        self.metrics = tracker.metrics  # a learner rollback rewinds it (each step once in metrics.jsonl)
        try:
            if resume is None:
                tracker.image("samples", self.save_samples("step_0"), 0)
            while self.step < tc.steps:
                try:
                    stats = self.train_step()
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        tracker.write(stats)
                        self.export(stats)
                    if on_step:
                        on_step(stats)
                    if self.step % tc.sample_every == 0 and self.step < tc.steps:
                        tracker.image("samples", self.save_samples(f"step_{self.step}"), self.step)
                    stopping = stop is not None and stop.requested()  # SIGTERM/SIGINT: this step is the last
                    if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stopping:
                        self.save_checkpoint()
                    if stopping:
                        stop.check(self.step)  # raises StopRequested; the caller stops the actors
                except LearnerLostError as e:  # plumbing: back to the last checkpoint, as a resumed job would
                    self.recover_learner(e)
            return self.finish(tracker)
        except KeyboardInterrupt:
            self.checkpoint_interrupted()  # an interrupted run keeps its progress; --resume continues it
            raise
        finally:
            tracker.close()

    def train_step(self) -> dict:
        t, timer, t0 = self.step, StageTimer(), time.perf_counter()
        self.issue_ahead()
        # DrPO lines 3–6: K candidates per prompt from the generators (weights ≤ max_staleness versions old),
        # each group scored and z-scored by the reward pool as soon as it exists
        with timer("timing/wait_groups_s"):
            groups = self.pipeline.wait_step(t, self.cfg.trainer.prompts_per_step)
        # DrPO lines 7–14: rank, drift targets, regression, AdamW on the learner; generators sample ahead meanwhile
        with timer("timing/wait_update_s"):
            stats, groups = self.learn(t, groups)
        lags = [self.weights.version - g.version for g in groups]  # versions between sampling and learning weights
        # plumbing: version t+1 goes to the object store once; generators pull it with their next request
        with timer("timing/publish_s"):
            self.publish(int(stats["version"]))
        self.step += 1
        stats.update(self.step_stats(groups, lags, timer, time.perf_counter() - t0))
        return stats

    def learn(self, t: int, groups: list[TrackedGroup]) -> tuple[dict, list[TrackedGroup]]:
        """learner.update on the step's groups; groups whose data died with a node are made again first."""
        while True:
            # data parallel: worker w gets a contiguous share of the groups; all return the step's summed stats
            workers = self.rt.learner_workers
            updates = [w.update.remote(self.weights.version, [g.score for g in part], *[g.learner_ref for g in part])
                       for w, part in zip(workers, shares(groups, len(workers)))]
            try:
                return [self.wait_learner(u, self.cfg.runtime.update_timeout_s, fallback=True) for u in updates][0], groups
            except ObjectLostError as e:  # the update never ran: its arguments were gone
                log.warning("step %d: group data lost (%s); regenerating its groups", t + 1, short_error(e))
                self.pipeline.regenerate(groups)
                groups = self.pipeline.wait_step(t, len(groups))

    # -- staleness --------------------------------------------------------------------------------
    def issue_ahead(self, past_bound: bool = False) -> bool:
        """Issue every step whose weights would be at most max_staleness updates old (or, with ``past_bound``,
        the next one regardless: the fallback when fresh weights are late). Counted in finished steps, not
        versions: a step whose update was skipped (no group kept) publishes nothing new, and waiting for a
        version that never comes would stall."""
        issued = False
        B, bound = self.cfg.trainer.prompts_per_step, self.cfg.runtime.max_staleness
        while self.next_issue < self.cfg.trainer.steps and (past_bound or self.next_issue - self.step <= bound):
            self.pipeline.issue(self.next_issue, self.prompts.next(B))
            self.sampler_states[self.next_issue] = self.prompts.state()
            self.next_issue, issued = self.next_issue + 1, True
            if past_bound:
                break
        return issued

    def wait_learner(self, ref, timeout_s: float, fallback: bool = False):
        """Wait for a learner call while the pipeline keeps moving; after runtime.staleness_timeout_s the next
        step is sampled with the weights at hand instead of waiting for fresh ones (no deadlock)."""
        start, fell_back = time.monotonic(), False
        while not self.pipeline.pump(extra=[ref], timeout_s=0.1):
            waited = time.monotonic() - start
            if fallback and not fell_back and waited > self.cfg.runtime.staleness_timeout_s:
                fell_back = self.issue_ahead(past_bound=True)
                self.counters["staleness_fallbacks"] += int(fell_back)
            if waited > timeout_s:
                raise LearnerHungError(f"learner call did not return within {timeout_s:g}s")
        try:
            return ray.get(ref, timeout=60)
        except ObjectLostError:
            raise
        except RayActorError as e:
            raise LearnerLostError(short_error(e)) from None
        except RayTaskError as e:
            if isinstance(e.cause, LearnerRestartedError):
                raise LearnerLostError(str(e.cause)) from None
            if isinstance(e.cause, (OSError, SafetensorError)):  # read-only or full run folder (safetensors raises its
                # own error for "no space left"): stop in one line; the last complete checkpoint stands
                why = str(e.cause).strip().splitlines()[0] if str(e.cause).strip() else type(e.cause).__name__
                raise CheckpointError(f"the learner cannot write to the run folder {self.output_dir}: {why}") from None
            raise

    # -- plumbing ---------------------------------------------------------------------------------
    def publish(self, version: int) -> None:
        """The learner's state of ``version`` as one object; only its small second return comes to the driver
        (a learner that died before publishing surfaces here, not in every generator's pull)."""
        if version == self.weights.version:
            return
        if self.collective is not None:  # broadcast to the generators; a missed one is fetched from the learner
            self.collective.publish(self.rt.learner, self.weights.published + 1, version, self.wait_learner)
            self.weights.publish(version, None, source=self.rt.learner)
            return
        payload, published = self.rt.learner.publish_weights.options(num_returns=2).remote()
        self.weights.publish(self.wait_learner(published, self.cfg.runtime.update_timeout_s), payload)

    def generator_members(self) -> list:
        """Live generators for the broadcast group, keyed by (replica, pid): a restart changes the key."""
        return [((r.index, r.pid), r.handle) for r in self.rt.generators.replicas if r.state == "up"]

    def restore(self) -> None:
        point = self.wait_learner(self.rt.learner.restore_point.remote(), self.cfg.runtime.start_timeout_s)
        self.step = self.next_issue = int(point["step"])
        self.prompts = PromptSampler(training_prompts(self.cfg.prompts), self.cfg.trainer.seed)
        self.prompts.load_state(point["sampler"])
        self.reward_history = {k: running_stats(v) for k, v in point["reward_history"].items()}
        self.weights.clear()
        if self.collective is not None:
            self.collective.reset()  # a restarted learner left the broadcast group
        self.publish(int(point["version"]))

    def recover_learner(self, error: LearnerLostError) -> None:
        """Roll back to the learner's last checkpoint: Ray restarts it (max_restarts), else a new one is made."""
        why = str(error)
        if self.counters["learner_restarts"] >= self.cfg.runtime.learner_restart_budget:
            raise RuntimeError(f"the learner was lost {self.counters['learner_restarts'] + 1} times "
                               f"(runtime.learner_restart_budget); last: {why}")
        self.counters["learner_restarts"] += 1
        log.warning("learner lost at step %d (%s); resuming from its last checkpoint", self.step, why)
        self.pipeline.reset()
        try:
            if isinstance(error, LearnerHungError) or self.rt.data_parallel:  # one lost worker breaks the process group
                raise error
            self.rt.wait_learner(self.cfg.runtime.start_timeout_s)
        except Exception:  # hung, or its Ray restarts are spent: a fresh actor reads the same checkpoint
            self.rt.replace_learner()
            self.rt.wait_learner(self.cfg.runtime.start_timeout_s)
        self.restore()
        if self.metrics is not None:
            self.metrics.rewind(self.step)  # the steps after the checkpoint are redone: a reader sees each once

    def save_checkpoint(self) -> str:
        # the prompt position right after this step's prompts, not after the look-ahead already issued
        state = self.sampler_states.get(self.step - 1, self.prompts.state())
        history = {k: v.state() for k, v in self.reward_history.items()}
        ref = self.rt.learner.checkpoint.remote(self.weights.version, self.step, state, history)
        return self.wait_learner(ref, self.cfg.runtime.update_timeout_s)

    def checkpoint_interrupted(self) -> None:
        try:
            self.save_checkpoint()
        except Exception as e:  # e.g. interrupted mid-update: the learner is a version ahead of this step
            log.warning("no checkpoint of the interrupted step (%s); the last periodic one stands", short_error(e))

    def save_samples(self, name: str, averaged: bool = False) -> str:
        return str(self.wait_learner(self.rt.learner.save_samples.remote(name, averaged), self.cfg.runtime.update_timeout_s))

    def finish(self, tracker: RunTracker) -> dict:
        """The local trainer's final outputs: last checkpoint and grid, reward curve, before/after grid, held-out eval."""
        out, tc, timeout = self.output_dir, self.cfg.trainer, self.cfg.runtime.update_timeout_s
        checkpoint = out / "checkpoints" / f"step_{self.step}"
        if not (checkpoint / "state.json").is_file():
            self.save_checkpoint()
        final = {"samples": self.save_samples(f"step_{self.step}", averaged=True), "checkpoint": str(checkpoint), "metrics": str(out / "metrics.jsonl")}
        tracker.image("samples", final["samples"], self.step)
        final["reward_curve"] = str(plot_reward_curve(out / "metrics.jsonl", out / "plots" / "reward_curve.png"))
        final["before_after"] = str(self.wait_learner(self.rt.learner.save_before_after.remote(), timeout))
        tracker.image("before_after", final["before_after"], self.step)
        if tc.heldout_eval_seeds:
            result = self.wait_learner(self.rt.learner.evaluate.remote(tc.heldout_eval_seeds), timeout)
            (out / "eval.json").write_text(json.dumps(result, indent=2))
            final["eval"], final["eval_summary"] = str(out / "eval.json"), result["overall"]
            tracker.summary({f"eval/{k}": v for k, v in result["overall"].items()}, self.step)
            self.export({f"eval/{k}": v for k, v in result["overall"].items() if isinstance(v, (int, float))})
        return final

    def step_stats(self, groups: list[TrackedGroup], lags: list[int], timer: StageTimer, step_s: float) -> dict:
        """The trainer's keys (reward stats of first-round candidates, time/*) plus timing, lag and fault counters."""
        stats = group_stats([g.first_score for g in groups], self.reward_history, {r.label: r.weight for r in self.cfg.rewards})
        if self.cfg.algo.binary_threshold is not None:
            stats["sampler/extra_rounds"] = float(sum(g.round for g in groups))
        for g in groups:
            for k, v in g.score.stats.items():
                stats[k] = stats.get(k, 0.0) + v
        wait_update = timer["timing/wait_update_s"] + timer["timing/publish_s"]
        stats.update(timer)
        stats.update({"step": self.step, "trainer/steps": self.cfg.trainer.steps, "version": self.weights.version,
                      "time/sample_score_s": timer["timing/wait_groups_s"], "time/update_s": wait_update, "time/step_s": step_s,
                      "timing/generate_s": sum(g.generate_s for g in groups), "timing/score_s": sum(g.score_s for g in groups),
                      "timing/weights_sync_s": sum(g.sync_s for g in groups),
                      "lag/mean": sum(lags) / len(lags), "lag/max": float(max(lags)), "lag/groups": lags})
        pools = {"generator": self.rt.generators, "reward": self.rt.rewards}
        stats["runtime/groups_reissued"] = float(sum(p.stats["requeued"] for p in pools.values()))
        stats["runtime/duplicates_dropped"] = float(self.pipeline.counters["duplicates_dropped"]
                                                    + sum(p.stats["duplicates_dropped"] for p in pools.values()))
        stats["runtime/groups_regenerated"] = float(self.pipeline.counters["regenerated"])
        stats["runtime/missing_groups"] = float(self.pipeline.counters["missing_groups"])
        stats["runtime/staleness_fallbacks"] = float(self.counters["staleness_fallbacks"])
        stats["runtime/learner_restarts"] = float(self.counters["learner_restarts"])
        if self.collective is not None:
            stats["runtime/weight_sync_epochs"] = float(self.collective.counters["epochs"])
            stats["runtime/weight_sync_failures"] = float(self.collective.counters["failures"])
        stats.update(self.rt.placement())  # placement/{role}/{device}/{dtype}: replicas
        for name, p in pools.items():
            stats.update({f"pool/{name}/replicas": float(p.size), f"pool/{name}/restarts": float(p.stats["restarts"]),
                          f"pool/{name}/timeouts": float(p.stats["timeouts"])})
        return stats

    def export(self, stats: dict) -> None:
        if self.exporter is not None:
            unmapped = self.exporter.export(stats)
            if unmapped and not self.counters["warned_unmapped"]:
                self.counters["warned_unmapped"] = 1
                log.warning("metrics without a Prometheus entry in services/observability/metrics.py: %s", unmapped)

"""Prompt groups tracked by id through generate → score (→ extend → score)* → ready.

Each group of step t, slot s has the id ``"t:s"`` (as in DrpoTrainer.collect) and candidate seeds
``candidate_seed(seed, t, s, i)``, so which replica made it never changes the result. Every request
id also carries the issue epoch, the stage and the round (``"3:1@0/score0"``): a result for a group
that already moved on, or one issued before a rollback, is dropped and counted, never used twice.
A lost request (dead replica, lost object, deadline) is re-issued by its :class:`ReplicaPool`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import ray

from drpo_core.config import DrpoConfig
from drpo_core.algorithms.groups import candidate_seed
from drpo_core.training.prompts import prompt_metadata
from drpo_core.algorithms.ranking import SKIP_TOO_FEW_NEGATIVES, SKIP_TOO_FEW_POSITIVES, select_anchors
from services.runtime.actors import GenerationInfo, GroupRequest, ScoreResult
from services.runtime.replica_pool import Completion, ReplicaPool
from services.runtime.weights import WeightStore

log = logging.getLogger("drpo.pipeline")


BATCH_SEP = "|"  # a batched generate call's request id: the member groups' request ids joined


def split_batch(c: Completion) -> list[Completion]:
    """A batched generate completion as one completion per member group (data: its two views, info: its own)."""
    ids = c.request_id.split(BATCH_SEP)
    if len(ids) == 1:
        return [c]
    if c.error or c.lost_data:
        return [Completion(i, error=c.error, lost_data=c.lost_data) for i in ids]
    return [Completion(i, info, c.data[2 * k:2 * k + 2]) for k, (i, info) in enumerate(zip(ids, c.info, strict=True))]


class GenerationFailedError(RuntimeError):
    """A prompt group could not be generated within runtime.max_attempts tries."""


@dataclass
class TrackedGroup:
    request: GroupRequest
    epoch: int
    incarnation: int = 0  # bumped when the group's data died with a node and it is made again
    round: int = 0
    stage: str = "generate"  # generate | score | ready
    group_ref: Any = None  # the rewards' view (uint8 images)
    learner_ref: Any = None  # the learner's view (latents, seeds; no images)
    node: str | None = None  # where the group's data lives
    version: int = -1
    first_score: ScoreResult | None = None  # round-0 rewards: the step's reward statistics (as the trainer)
    score: ScoreResult | None = None
    generate_s: float = 0.0
    sync_s: float = 0.0
    score_s: float = 0.0


class GroupPipeline:
    def __init__(self, cfg: DrpoConfig, generators: ReplicaPool, rewards: ReplicaPool, weights: WeightStore):
        self.cfg, self.generators, self.rewards, self.weights = cfg, generators, rewards, weights
        self.metadata = prompt_metadata(cfg.prompts)  # per-prompt reward metadata (a .jsonl prompts file)
        self.groups: dict[str, TrackedGroup] = {}
        self.epoch = 0
        self.counters: Counter = Counter()

    # -- issue ------------------------------------------------------------------------------------
    def issue(self, step: int, prompts: list[str]) -> None:
        """One group per prompt, sampled with the newest published weights."""
        K, seed = self.cfg.algo.num_candidates, self.cfg.trainer.seed
        fresh = []
        for slot, prompt in enumerate(prompts):
            seeds = [candidate_seed(seed, step, slot, i) for i in range(K)]
            req = GroupRequest(f"{step}:{slot}", step, slot, prompt, seeds, self.metadata.get(prompt))
            fresh.append(TrackedGroup(req, self.epoch))
            self.groups[req.group_id] = fresh[-1]
        n = self.cfg.runtime.generator.batch_groups
        for start in range(0, len(fresh), n):
            batch = fresh[start:start + n]
            if len(batch) == 1:
                self._generate(batch[0])
            else:  # one call, one batched forward; its completion is split back into per-group ones (_on_generated)
                rid = BATCH_SEP.join(self._rid(tg, "generate") for tg in batch)
                self.generators.submit(rid, "generate_batch", self.weights.newest, *[tg.request for tg in batch],
                                       num_returns=2 * len(batch) + 1)

    def _rid(self, tg: TrackedGroup, stage: str) -> str:
        return f"{tg.request.group_id}@{tg.epoch}.{tg.incarnation}/{stage}{tg.round}"

    def regenerate(self, groups: list[TrackedGroup]) -> None:
        """Make groups again from round 0 (their data died with a node): same seeds, newest weights."""
        for old in groups:
            if old.incarnation + 1 >= self.cfg.runtime.max_attempts:
                raise GenerationFailedError(f"prompt group {old.request.group_id}: its data was lost {old.incarnation + 1} "
                                            "times (nodes dying faster than it can be made?)")
            tg = self.groups[old.request.group_id] = TrackedGroup(old.request, self.epoch, old.incarnation + 1)
            self.counters["regenerated"] += 1
            self._generate(tg)

    def _generate(self, tg: TrackedGroup) -> None:
        if tg.round == 0:
            self.generators.submit(self._rid(tg, "generate"), "generate", self.weights.newest, tg.request, num_returns=3)
            return
        K, r = self.cfg.algo.num_candidates, tg.round
        seeds = [candidate_seed(self.cfg.trainer.seed, tg.request.step, tg.request.slot, r * K + i) for i in range(K)]
        self.generators.submit(self._rid(tg, "generate"), "extend", self.weights.newest, tg.group_ref, tg.learner_ref, seeds,
                               num_returns=3)

    # -- progress ---------------------------------------------------------------------------------
    def pump(self, extra: list = (), timeout_s: float = 0.1) -> list:
        """Wait up to ``timeout_s`` for any pool call or ``extra`` ref, advance groups; returns the ready ``extra`` refs."""
        refs = self.generators.refs() + self.rewards.refs() + list(extra)
        ready: list = []
        if refs:
            ready = ray.wait(refs, num_returns=1, timeout=timeout_s, fetch_local=False)[0]
            if ready:  # collect everything else that is already done in the same pass
                ready = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0] or ready
        else:
            time.sleep(timeout_s)
        done = set(ready)
        for c in self.generators.process(done):
            for part in split_batch(c):
                self._on_generated(part)
        for c in self.rewards.process(done):
            self._on_scored(c)
        return [r for r in extra if r in done]

    def _match(self, c: Completion, stage: str) -> TrackedGroup | None:
        group_id, rest = c.request_id.split("@", 1)
        incarnation, tail = rest.split("/", 1)
        tg = self.groups.get(group_id)
        if tg is None or f"{tg.epoch}.{tg.incarnation}" != incarnation or tg.stage != stage or f"{stage}{tg.round}" != tail:
            self.counters["duplicates_dropped"] += 1
            return None
        return tg

    def _on_generated(self, c: Completion) -> None:
        tg = self._match(c, "generate")
        if tg is None:
            return
        if c.lost_data:
            self.regenerate([tg])
            return
        if c.error:
            raise GenerationFailedError(f"prompt group {tg.request.group_id} ({tg.request.prompt!r}): {c.error}")
        info: GenerationInfo = c.info
        tg.group_ref, tg.learner_ref, tg.node = c.data[0], c.data[1], info.node
        tg.version = info.version if tg.round == 0 else tg.version
        tg.generate_s, tg.sync_s = tg.generate_s + info.seconds, tg.sync_s + info.sync_seconds
        tg.stage = "score"
        self.rewards.submit(self._rid(tg, "score"), "score", tg.group_ref)

    def _on_scored(self, c: Completion) -> None:
        tg = self._match(c, "score")
        if tg is None:
            return
        if c.lost_data:  # the generated group died with its node before it was scored
            self.regenerate([tg])
            return
        if c.error:  # a reward that keeps failing must not stall training: the group's scores are missing
            log.warning("scores of group %s are missing: %s", tg.request.group_id, c.error)
            self.counters["missing_groups"] += 1
            labels = [r.label for r in self.cfg.rewards]
            score = ScoreResult.missing(tg.request.group_id, tg.version, len(tg.request.seeds) * (tg.round + 1), labels)
        else:
            score = c.info
        tg.score_s += score.seconds
        if tg.round == 0:
            tg.first_score = score
        if self._needs_another_round(tg, score):
            tg.round += 1
            tg.stage = "generate"
            self.counters["extra_rounds"] += 1
            self._generate(tg)
            return
        tg.score, tg.stage = score, "ready"

    def _needs_another_round(self, tg: TrackedGroup, score: ScoreResult) -> bool:
        """Binary rewards: another K candidates while a group lacks M passes or M fails (DrpoTrainer._extra_rounds)."""
        algo = self.cfg.algo
        if algo.binary_threshold is None or tg.round >= algo.max_extra_rounds:
            return False
        sel = select_anchors(score.scores[None], algo.num_anchors, binary_threshold=algo.binary_threshold)
        return bool({SKIP_TOO_FEW_POSITIVES, SKIP_TOO_FEW_NEGATIVES} & sel.skipped.keys())

    # -- consume ----------------------------------------------------------------------------------
    def wait_step(self, step: int, num_groups: int) -> list[TrackedGroup]:
        """Block until the ``num_groups`` groups of ``step`` are scored; returns them in slot order and forgets them."""
        ids = [f"{step}:{slot}" for slot in range(num_groups)]
        missing = [i for i in ids if i not in self.groups]
        if missing:
            raise RuntimeError(f"step {step} was never issued (groups {missing})")
        while any(self.groups[i].stage != "ready" for i in ids):
            if not (self.generators.pending or self.rewards.pending):
                stuck = [i for i in ids if self.groups[i].stage != "ready"]
                raise RuntimeError(f"groups {stuck} are not ready and nothing is in flight")
            self.pump(timeout_s=0.5)
        return [self.groups.pop(i) for i in ids]

    def reset(self) -> None:
        """Forget every group (after a learner rollback); late results of the old epoch are dropped."""
        self.epoch += 1
        self.groups.clear()
        self.generators.cancel_all()
        self.rewards.cancel_all()

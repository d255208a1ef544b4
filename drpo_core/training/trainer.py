"""Single-process DrPO trainer: the ground truth the distributed runtime must match step for step.

    for step in 1..S:
        prompts ← next B prompts
        groups  ← sample K candidates per prompt (+ frozen-base outputs for the same noises)
        groups  ← score with the rewards, z-score per prompt (extra rounds for binary rewards)
        update  ← rank top-M / bottom-M, drift targets, regress, AdamW        (the learner)
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Callable

import torch

from drpo_core.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from drpo_core.config import DrpoConfig, dump_config
from drpo_core.training.evaluation import evaluate, heldout_seeds
from drpo_core.features import build_encoder
from drpo_core.models.generator import load_generator
from drpo_core.algorithms.groups import CandidateGroup, candidate_seed
from drpo_core.training.learner import DrpoLearner
from drpo_core.algorithms.normalizer import RunningStats
from drpo_core.training.prompts import PromptSampler, heldout_prompts, prompt_metadata, training_prompts
from drpo_core.algorithms.ranking import SKIP_TOO_FEW_NEGATIVES, SKIP_TOO_FEW_POSITIVES, select_anchors
from drpo_core.training.grids import save_before_after, save_grid
from drpo_core.training.reporting import plot_reward_curve
from drpo_core.training.tracking import RunTracker
from drpo_core.rewards import build_reward
from drpo_core.training.sampler import CandidateSampler
from drpo_core.training.stopping import GracefulStop
from drpo_core.training.scoring import RewardScorer


def build_rewards(cfg: DrpoConfig, builder: Callable = build_reward) -> dict[str, tuple]:
    return {r.label: (builder(r), r.weight) for r in cfg.rewards}


def group_stats(groups: list[CandidateGroup], history: dict[str, RunningStats] | None = None,
                weights: dict[str, float] | None = None) -> dict[str, float]:
    """Reward statistics over each group's candidates (NaN = missing, excluded).

    Per reward ``reward/<label>/mean`` (raw) and ``missing``, and — with ``history`` — the same mean in
    standard deviations of the run so far (``normalized``), which puts rewards of different scales on one
    axis. ``reward/mean`` and ``reward/std`` are of the ensemble score of each candidate,
    ``r_j = Σ_i w_i r_ij / Σ_i w_i`` over the rewards i (``weights``, default equal; flow_grpo's weighted
    sum of raw scores, divided by Σ w so that one reward alone is its own mean whatever its weight),
    over the candidates that every reward scored; with one reward it is that reward's mean.
    ``reward/std_within_prompt`` is the ensemble's std among one prompt's candidates, averaged over prompts.
    """
    stats: dict[str, float] = {}
    labels = list(groups[0].rewards.keys()) if groups else []
    for label in labels:
        raw = torch.cat([g.rewards[label] for g in groups])
        valid = raw[~torch.isnan(raw)]
        stats[f"reward/{label}/mean"] = float(valid.mean()) if valid.numel() else float("nan")
        stats[f"reward/{label}/missing"] = float(raw.numel() - valid.numel())
        if history is not None:
            running = history.setdefault(label, RunningStats())
            if valid.numel():
                stats[f"reward/{label}/normalized"] = running.normalize(stats[f"reward/{label}/mean"])
            running.update(valid)
    if labels:
        w = {label: (weights or {}).get(label, 1.0) for label in labels}
        total = sum(w.values()) or 1.0  # weights summing to 0: the plain weighted sum
        per_group = [sum(w[label] * g.rewards[label].double() for label in labels) / total for g in groups]
        valid = torch.cat(per_group)[~torch.isnan(torch.cat(per_group))]
        stats["reward/mean"] = float(valid.mean()) if valid.numel() else float("nan")
        stats["reward/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
        within = [float(e[~torch.isnan(e)].std()) for e in per_group if (~torch.isnan(e)).sum() > 1]
        stats["reward/std_within_prompt"] = sum(within) / len(within) if within else 0.0  # spread the ranking sees
    return stats


class DrpoTrainer:
    """Builds the three workers (sampler, scorer, learner) in one process and runs the loop."""

    def __init__(self, cfg: DrpoConfig, output_dir: Path | None = None, rewards: dict[str, tuple] | None = None):
        self.cfg = cfg
        self.output_dir = Path(output_dir or cfg.output.dir)
        torch.manual_seed(cfg.trainer.seed)
        self.generator = load_generator(cfg.model, cfg.lora)
        self.encoder = build_encoder(cfg.features, self.generator.latent_shape[0], self.generator.device, generator=self.generator)
        self.sampler = CandidateSampler.for_algo(self.generator, cfg.algo, threads=cfg.trainer.sample_threads)
        self.scorer = RewardScorer(rewards or build_rewards(cfg), binary=cfg.algo.binary_threshold is not None,
                                   shuffle_seed=cfg.trainer.seed if cfg.algo.shuffle_rewards else None)
        # DRaFT differentiates the rewards in the learner: it builds its own (the in-process, differentiable kinds)
        learner_rewards = build_rewards(cfg) if cfg.algo.kind == "draft" else None
        self.learner = DrpoLearner(self.generator, self.encoder, cfg.algo, cfg.trainer, rewards=learner_rewards)
        self.prompts = PromptSampler(training_prompts(cfg.prompts), cfg.trainer.seed)
        self.metadata = prompt_metadata(cfg.prompts)
        self.reward_history: dict[str, RunningStats] = {}
        self.step = 0
        self._mid_step = False

    # -- one step, in the order of the algorithm box --------------------------------------------
    def collect(self, step: int, prompts: list[str]) -> tuple[list[CandidateGroup], dict[str, float]]:
        """Sample and score one group per prompt, with extra rounds for binary rewards."""
        K, seed = self.cfg.algo.num_candidates, self.cfg.trainer.seed
        requests = [(f"{step}:{slot}", prompt, [candidate_seed(seed, step, slot, i) for i in range(K)], self.metadata.get(prompt))
                    for slot, prompt in enumerate(prompts)]
        groups = self.sampler.sample_groups(requests)  # one sample() per group (decoding overlapped: trainer.sample_threads)
        self.scorer.score(groups)
        stats = group_stats(groups, self.reward_history, {r.label: r.weight for r in self.cfg.rewards})
        if self.cfg.algo.binary_threshold is not None:
            stats["sampler/extra_rounds"] = float(self._extra_rounds(step, groups))
        return groups, stats

    def _extra_rounds(self, step: int, groups: list[CandidateGroup]) -> int:
        K, M, algo = self.cfg.algo.num_candidates, self.cfg.algo.num_anchors, self.cfg.algo
        rounds = 0
        for slot, g in enumerate(groups):
            for r in range(1, algo.max_extra_rounds + 1):
                sel = select_anchors(g.scores[None], M, binary_threshold=algo.binary_threshold)
                if not ({SKIP_TOO_FEW_POSITIVES, SKIP_TOO_FEW_NEGATIVES} & sel.skipped.keys()):
                    break
                self.sampler.extend(g, [candidate_seed(self.cfg.trainer.seed, step, slot, r * K + i) for i in range(K)])
                self.scorer.score([g])
                rounds += 1
        return rounds

    def train_step(self) -> dict[str, float]:
        self._mid_step = True  # an interrupt now must not checkpoint half-applied state
        t0 = time.perf_counter()
        prompts = self.prompts.next(self.cfg.trainer.prompts_per_step)
        groups, stats = self.collect(self.step, prompts)
        t1 = time.perf_counter()
        stats.update(self.learner.update(groups))
        self.sampler.version = self.learner.version  # one process: the sampler shares the weights
        stats.update(self.scorer.pop_stats())
        self.step += 1
        t2 = time.perf_counter()
        stats.update({"step": self.step, "trainer/steps": self.cfg.trainer.steps, "version": self.learner.version,
                      "time/sample_score_s": t1 - t0, "time/update_s": t2 - t1, "time/step_s": t2 - t0})
        self._mid_step = False
        return stats

    # -- outputs ---------------------------------------------------------------------------------
    def sample_prompts(self) -> list[str]:
        held = heldout_prompts(self.cfg.prompts) if not self.cfg.prompts.file else training_prompts(self.cfg.prompts)[:4]
        per_class = {}
        for p in held:  # one held-out prompt per colour keeps the grid small
            per_class.setdefault(self.scorer_color(p), p)
        return list(per_class.values())[:8]

    def scorer_color(self, prompt: str) -> str | None:
        fn = next(iter(self.scorer.rewards.values()))[0]
        return fn.color_of(prompt) if hasattr(fn, "color_of") else prompt

    def save_samples(self, name: str, base: bool = False, averaged: bool = False) -> Path:
        """A grid of held-out prompts × seeds from the policy (``averaged``: its moving average, when kept)."""
        prompts = self.sample_prompts()
        seeds = heldout_seeds(self.cfg.trainer.eval_seeds, "grid")
        with self.learner.averaged_weights() if averaged else contextlib.nullcontext():
            _, images = self.generator.generate([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds], base=base)
        return save_grid(images, prompts, seeds, self.output_dir / "samples" / f"{name}.png")

    def save_before_after(self) -> Path:
        """Base (top rows) and the trained policy (bottom rows; its moving average when kept) on the same
        held-out prompts and seeds."""
        prompts = self.sample_prompts()
        seeds = heldout_seeds(self.cfg.trainer.eval_seeds, "grid")
        pairs = ([p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds])
        base = self.generator.generate(*pairs, base=True)[1]
        with self.learner.averaged_weights():
            policy = self.generator.generate(*pairs)[1]
        return save_before_after(base, policy, prompts, seeds, self.output_dir / "samples" / "before_after.png")

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.output_dir / "checkpoints" / f"step_{self.step}", generator=self.generator,
                               learner=self.learner, step=self.step, sampler_state=self.prompts.state(),
                               extra={"config": self.cfg.model_dump(mode="json"),  # drpo export rebuilds the pipeline from it
                                      "reward_history": {k: v.state() for k, v in self.reward_history.items()}})

    def resume(self, folder: Path) -> None:
        state = load_checkpoint(folder, generator=self.generator, learner=self.learner)
        self.step = int(state["step"])
        self.prompts.load_state(state["sampler"])
        for label, running in state.get("reward_history", {}).items():
            self.reward_history.setdefault(label, RunningStats()).load_state(running)
        self.sampler.version = self.learner.version

    def evaluate(self, seeds: int = 16) -> dict:
        fn = next(iter(self.scorer.rewards.values()))[0]
        prompts = heldout_prompts(self.cfg.prompts) if not self.cfg.prompts.file else training_prompts(self.cfg.prompts)
        with self.learner.averaged_weights():
            return evaluate(self.generator, fn, prompts, heldout_seeds(seeds), group_of=getattr(fn, "color_of", None))

    def run(self, on_step: Callable[[dict], None] | None = None, resume: Path | None = None,
            stop: GracefulStop | None = None) -> dict:
        """The whole job: resume if asked, train ``trainer.steps`` steps, write every output.

        With ``stop`` (SIGTERM/SIGINT caught), a requested stop checkpoints the last finished step and raises
        :class:`StopRequested`."""
        out, tc = self.output_dir, self.cfg.trainer
        out.mkdir(parents=True, exist_ok=True)
        if resume is not None:  # restore first: a checkpoint that does not fit must leave the run folder untouched
            self.resume(latest_checkpoint(resume) or Path(resume))  # a run folder or one checkpoint folder
        (out / "config.yaml").write_text(dump_config(self.cfg))
        tracker = RunTracker(out, self.cfg, start_step=self.step, resuming=resume is not None)  # metrics.jsonl + TensorBoard/W&B
        try:
            if resume is None:
                tracker.image("samples", self.save_samples("step_0"), 0)
            while self.step < tc.steps:
                stats = self.train_step()
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    tracker.write(stats)
                if on_step:
                    on_step(stats)
                if self.step % tc.sample_every == 0 and self.step < tc.steps:
                    tracker.image("samples", self.save_samples(f"step_{self.step}"), self.step)
                stopping = stop is not None and stop.requested()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps or stopping:
                    self.save_checkpoint()
                if stopping:
                    stop.check(self.step)
            return self.finish(tracker)
        except KeyboardInterrupt:
            if not self._mid_step:  # mid-step, the newest periodic checkpoint stays the restart point
                self.save_checkpoint()  # an interrupted run keeps its progress; --resume continues it
            raise
        finally:
            tracker.close()

    def finish(self, tracker: RunTracker) -> dict:
        """Last checkpoint and grid, reward curve, before/after grid, held-out eval."""
        out, tc = self.output_dir, self.cfg.trainer
        checkpoint = out / "checkpoints" / f"step_{self.step}"
        if not (checkpoint / "state.json").is_file():
            self.save_checkpoint()
        final = {"samples": str(self.save_samples(f"step_{self.step}", averaged=True)), "checkpoint": str(checkpoint),
                 "metrics": str(out / "metrics.jsonl")}
        tracker.image("samples", final["samples"], self.step)
        final["reward_curve"] = str(plot_reward_curve(out / "metrics.jsonl", out / "plots" / "reward_curve.png"))
        final["before_after"] = str(self.save_before_after())
        tracker.image("before_after", final["before_after"], self.step)
        if tc.heldout_eval_seeds:
            result = self.evaluate(tc.heldout_eval_seeds)
            (out / "eval.json").write_text(json.dumps(result, indent=2))
            final["eval"] = str(out / "eval.json")
            final["eval_summary"] = result["overall"]
            tracker.summary({f"eval/{k}": v for k, v in result["overall"].items()}, self.step)
        return final

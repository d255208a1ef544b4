"""Stale groups (the Ray runtime's overlap): anchors where the policy maps them now, not where they were scored.

The seed-42 demo job collapsed through Ray at lag 1 (docs/ray.md "Staleness"): a stale copy of each regressed
point among the anchors pushes a bottom-ranked point further along its last update. These tests pin the
mechanism (drift level) and the fix (a lagged learner step equals the on-policy step with the same ranking).
"""

import copy

import pytest
import torch

from drpo_core.algorithms.drift import drift_field
from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2"]


def test_a_stale_copy_among_the_negatives_pushes_a_point_along_its_last_move():
    """The cause: points moved by δ since scoring; their scored copies as anchors add a drift along +δ to the
    bottom-ranked points (cosine > 0.5 in every trial) compared with anchors at the points' current positions."""
    gen = torch.Generator().manual_seed(0)
    K, M, D = 16, 4, 32
    for _ in range(20):
        scored = torch.randn(K, D, generator=gen)
        order = torch.randperm(K, generator=gen)
        top, bottom = order[:M], order[-M:]
        delta = 0.05 * torch.randn(K, D, generator=gen)
        now = scored + delta
        stale = drift_field(now, scored[top], scored[bottom]).V
        current = drift_field(now, now[top], now[bottom]).V
        extra = (stale - current)[bottom]
        cosine = torch.nn.functional.cosine_similarity(extra, delta[bottom], dim=1)
        assert bool((cosine > 0.5).all()), cosine


def _groups_at(trainer, step):
    """Step ``step``'s groups as DrpoTrainer.collect makes them (sampled and scored with the current weights)."""
    prompts = trainer.prompts.next(trainer.cfg.trainer.prompts_per_step)
    return trainer.collect(step, prompts)[0]


def _resampled(trainer, stale):
    """The same prompts, seeds and scores, sampled with the learner's current weights (lag 0)."""
    fresh = []
    for g in stale:
        new = trainer.sampler.sample(g.group_id, g.prompt, g.seeds, metadata=g.metadata)
        new.rewards, new.scores = g.rewards, g.scores
        fresh.append(new)
    return fresh


def _delta(trainer, groups):
    """θ after one learner update on ``groups`` minus θ before, with the learner's state restored afterwards."""
    gen, learner = trainer.generator, trainer.learner
    before = {k: v.clone() for k, v in gen.trainable_state_dict().items()}
    state = copy.deepcopy(learner.state())
    learner.update(groups)
    after = gen.trainable_state_dict()
    delta = torch.cat([(after[k] - before[k]).flatten() for k in before])
    gen.load_trainable_state_dict(before)
    learner.load_state(state)
    return delta


@pytest.mark.parametrize("mode", ["current", "sampled"])
def test_a_lagged_step_is_the_on_policy_step_with_the_older_ranking(tmp_path, mode):
    trainer = DrpoTrainer(load_config([], [*FAST, f"algo.stale_anchors={mode}"]), output_dir=tmp_path / "run")
    stale = _groups_at(trainer, 0)  # sampled and scored at version 0
    trainer.train_step()  # another step's update: the learner is at version 1, the groups lag by one
    assert trainer.learner.version == 1 and all(g.version == 0 for g in stale)
    fresh = _resampled(trainer, stale)
    assert all(g.version == 1 for g in fresh)
    assert max(float((f.latents - s.latents).abs().max()) for f, s in zip(fresh, stale)) > 1e-3  # the policy moved

    lagged, on_policy = _delta(trainer, stale), _delta(trainer, fresh)
    gap = float((lagged - on_policy).norm() / on_policy.norm())
    if mode == "current":
        assert gap < 1e-3, gap
    else:  # the scored latents as anchors: a different step (the collapse's mechanism)
        assert gap > 0.05, gap


def test_fresh_groups_keep_the_scored_latents_as_anchors(tmp_path):
    """At lag 0 both modes are the same computation, bit for bit (the in-process trainer is unchanged)."""
    runs = {}
    for mode in ("current", "sampled"):
        trainer = DrpoTrainer(load_config([], [*FAST, f"algo.stale_anchors={mode}"]), output_dir=tmp_path / mode)
        for _ in range(2):
            trainer.train_step()
        runs[mode] = trainer.generator.trainable_state_dict()
    assert all(torch.equal(runs["current"][k], runs["sampled"][k]) for k in runs["current"])

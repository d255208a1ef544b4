"""The shuffled-reward control (algo.shuffle_rewards): same candidates, same score values, different pairing.

A control that shuffled nothing would silently turn the control run into a second treatment run, so the
test asserts that the top-M / bottom-M anchors actually change, not just that the score multiset survives.
"""

import torch

from drpo_core.algorithms.ranking import select_anchors
from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2"]
PROMPTS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird", "a photo of a purple boat",
           "a photo of a red house", "a photo of a blue chair"]


def anchors(groups, M):
    out = []
    for g in groups:
        sel = select_anchors(g.scores[None], M)
        out.append((sorted(sel.pos_idx[0].tolist()), sorted(sel.neg_idx[0].tolist())))
    return out


def test_shuffling_permutes_scores_within_each_group_and_changes_the_anchor_pairs(tmp_path):
    plain = DrpoTrainer(load_config([], FAST), output_dir=tmp_path / "plain")
    control = DrpoTrainer(load_config([], [*FAST, "algo.shuffle_rewards=true"]), output_dir=tmp_path / "control")
    a, _ = plain.collect(0, PROMPTS)
    b, _ = control.collect(0, PROMPTS)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga.latents, gb.latents)  # same candidates
        torch.testing.assert_close(ga.rewards["hue_fraction"], gb.rewards["hue_fraction"])  # same raw rewards
        torch.testing.assert_close(ga.scores.sort().values, gb.scores.sort().values)  # a permutation of the scores
    moved = sum(not torch.equal(ga.scores, gb.scores) for ga, gb in zip(a, b))
    assert moved >= len(PROMPTS) - 1  # P(a random permutation of 6 is the identity) = 1/720
    M = plain.cfg.algo.num_anchors
    changed = [pa != pb for pa, pb in zip(anchors(a, M), anchors(b, M))]
    assert sum(changed) >= len(PROMPTS) // 2, changed  # the pairing itself differs, not only the order


def test_shuffling_is_reproducible_per_group(tmp_path):
    first = DrpoTrainer(load_config([], [*FAST, "algo.shuffle_rewards=true"]), output_dir=tmp_path / "a")
    again = DrpoTrainer(load_config([], [*FAST, "algo.shuffle_rewards=true"]), output_dir=tmp_path / "b")
    x, _ = first.collect(0, PROMPTS)
    y, _ = again.collect(0, PROMPTS)
    assert all(torch.equal(gx.scores, gy.scores) for gx, gy in zip(x, y))  # a resumed run or a Ray replica agrees

"""Ranking: z-scores, ensembles, disjoint top-M/bottom-M, and the edge cases that must not crash a step."""

import math

import pytest
import torch

from drpo_core.algorithms.ranking import (SKIP_CONSTANT, SKIP_TOO_FEW_NEGATIVES, SKIP_TOO_FEW_POSITIVES, SKIP_TOO_FEW_VALID,
                               ensemble_scores, select_anchors, zscore)

nan = float("nan")


def test_zscore_per_prompt_ignores_missing():
    z = zscore(torch.tensor([[1.0, 2.0, 3.0, nan], [5.0, 5.0, 5.0, 5.0]]))
    torch.testing.assert_close(z[0, :3], torch.tensor([-1.2247, 0.0, 1.2247]), atol=1e-4, rtol=0)
    assert math.isnan(z[0, 3])
    assert (z[1] == 0).all()


def test_selection_is_disjoint_top_and_bottom():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.7, 0.2]])
    sel = select_anchors(scores, 2)
    assert sel.pos_idx.tolist() == [[1, 4]] and sel.neg_idx.tolist() == [[0, 5]] and sel.keep.tolist() == [True]


def test_k_equals_two():
    sel = select_anchors(torch.tensor([[0.2, 0.8]]), 1)
    assert sel.pos_idx.tolist() == [[1]] and sel.neg_idx.tolist() == [[0]]


def test_two_m_greater_than_k_is_rejected():
    with pytest.raises(ValueError, match="disjoint"):
        select_anchors(torch.zeros(1, 3), 2)


def test_ties_break_by_candidate_index_deterministically():
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    a, b = select_anchors(scores, 2), select_anchors(scores.clone(), 2)
    assert a.pos_idx.tolist() == b.pos_idx.tolist() == [[0, 1]]
    assert set(a.neg_idx[0].tolist()) <= {2, 3, 5}


def test_constant_scores_skip_the_prompt():
    sel = select_anchors(torch.tensor([[0.5] * 4, [0.1, 0.2, 0.3, 0.4]]), 1)
    assert sel.keep.tolist() == [False, True] and sel.skipped == {SKIP_CONSTANT: 1}


def test_nan_scores_exclude_candidates_and_too_few_valid_skips():
    scores = torch.tensor([[nan, 0.9, 0.1, nan, 0.5, 0.4], [nan, nan, nan, 0.3, 0.2, nan]])
    sel = select_anchors(scores, 2)
    assert sel.keep.tolist() == [True, False]
    assert sel.pos_idx[0].tolist() == [1, 4] and sel.neg_idx[0].tolist() == [2, 5]
    assert sel.skipped == {SKIP_TOO_FEW_VALID: 1}


def test_binary_rewards_need_m_positives_and_m_negatives():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    sel = select_anchors(scores, 2, binary_threshold=0.5)
    assert sel.keep.tolist() == [False, False, True]
    assert sel.skipped == {SKIP_TOO_FEW_POSITIVES: 1, SKIP_TOO_FEW_NEGATIVES: 1}
    assert sorted(sel.pos_idx[2].tolist()) == [0, 2] and sorted(sel.neg_idx[2].tolist()) == [1, 3]


def test_ensemble_is_weighted_sum_of_zscores_and_propagates_missing():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[40.0, 30.0, nan, 10.0]])
    ens = ensemble_scores({"a": a, "b": b}, {"a": 1.0, "b": 0.5})
    assert math.isnan(ens[0, 2])
    expected = zscore(a) + 0.5 * zscore(b)
    torch.testing.assert_close(ens[0, [0, 1, 3]], expected[0, [0, 1, 3]])
    # one component ranks exactly like the raw reward
    assert torch.equal(ensemble_scores({"a": a}, {"a": 3.0}).argsort(), a.argsort())

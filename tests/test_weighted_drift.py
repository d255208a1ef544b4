"""Reward-weighted drifts (drpo-awr, -topk, -hard, -advsign): loop oracles and what the weights do."""

import pytest
import torch

from drpo_core.algorithms.drift import drift_field
from drpo_core.algorithms.weighted_drift import (awr_advsign_drift_loss, awr_hard_drift_loss, awr_kernel_drift_loss,
                                                 awr_topk_drift_loss)
from tests.reference_baselines import (awr_advsign_loss_loop, awr_hard_loss_loop, awr_kernel_loss_loop)

RADII = (0.05, 0.2)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def case():
    return rand(6, 2, 3), rand(6, 2, 3, seed=1), rand(6, seed=2)  # K=6 candidates, L=2 patches, D=3


def test_awr_kernel_equals_loop(case):
    gen, ref, scores = case
    loss, _ = awr_kernel_drift_loss(gen, ref, scores, alpha=0.5, radii=RADII)
    assert float(loss) == pytest.approx(awr_kernel_loss_loop(gen, ref, scores, 0.5, RADII), rel=1e-4)


def test_awr_topk_equals_loop(case):
    gen, ref, scores = case
    loss, _ = awr_topk_drift_loss(gen, ref, scores, alpha=0.5, radii=RADII, top_fraction=0.34, force_scale=2.0)
    want = awr_kernel_loss_loop(gen, ref, scores, 0.5, RADII, topk_fraction=0.34, force_scale=2.0)
    assert float(loss) == pytest.approx(want, rel=1e-4)


def test_awr_hard_equals_loop(case):
    gen, _, scores = case
    loss, _ = awr_hard_drift_loss(gen, scores, alpha=0.5, pos_weight=30.0, neg_weight=20.0, radii=RADII, top_fraction=0.5)
    assert float(loss) == pytest.approx(awr_hard_loss_loop(gen, scores, 0.5, 30.0, 20.0, RADII, 0.5), rel=1e-4)


def test_awr_advsign_equals_loop(case):
    gen, _, scores = case
    loss, _ = awr_advsign_drift_loss(gen, scores, alpha=0.5, pos_weight=30.0, neg_weight=20.0, radii=RADII)
    assert float(loss) == pytest.approx(awr_advsign_loss_loop(gen, scores, 0.5, 30.0, 20.0, RADII), rel=1e-4)


def test_equal_per_anchor_weights_reduce_to_the_scalar_weight():
    gen, pos, neg = rand(7, 3), rand(3, 3, seed=1), rand(2, 3, seed=2)
    a = drift_field(gen, pos, neg, pos_weight=50.0, neg_weight=40.0).V
    b = drift_field(gen, pos, neg, pos_weight=torch.full((3,), 50.0), neg_weight=torch.full((2,), 40.0)).V
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="per-anchor weights"):
        drift_field(gen, pos, neg, pos_weight=torch.ones(2))


def test_awr_hard_with_a_flat_softmax_is_the_dipole_drift_on_top_and_bottom():
    # α → ∞ makes every AWR weight equal: the variant must reduce to DrPO's drift with hard top/bottom anchors
    gen, scores = rand(6, 1, 3), torch.arange(6.0)
    loss, _ = awr_hard_drift_loss(gen, scores, alpha=1e9, pos_weight=30.0, neg_weight=30.0, radii=RADII, top_fraction=0.5)
    field = drift_field(gen[:, 0], gen[[5, 4, 3], 0], gen[[0, 1, 2], 0], pos_weight=30.0, neg_weight=30.0, radii=RADII)
    assert float(loss) == pytest.approx(float(field.V.pow(2).mean()), rel=1e-5)


@pytest.mark.parametrize("variant", ["kernel", "topk", "hard", "advsign"])
def test_one_step_moves_points_toward_the_high_reward_candidate(variant):
    # two clusters: a high-reward one at +e1 and a low-reward one at −e1; a point in between must move toward +e1
    g = torch.Generator().manual_seed(0)
    hi = torch.tensor([2.0, 0.0, 0.0]) + 0.1 * torch.randn(3, 3, generator=g)
    lo = torch.tensor([-2.0, 0.0, 0.0]) + 0.1 * torch.randn(3, 3, generator=g)
    mid = torch.tensor([[0.2, 0.0, 0.0]])
    gen = torch.cat([hi, lo, mid])[:, None].requires_grad_()  # [7, 1, 3]
    scores = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 0.0])
    ref = gen.detach().clone()  # base = current: its kernel mean cancels the batch mean on average
    fn = {"kernel": lambda: awr_kernel_drift_loss(gen, ref, scores, alpha=0.3, radii=RADII),
          "topk": lambda: awr_topk_drift_loss(gen, ref, scores, alpha=0.3, radii=RADII, top_fraction=0.43),
          "hard": lambda: awr_hard_drift_loss(gen, scores, alpha=0.3, radii=RADII, top_fraction=0.43),
          "advsign": lambda: awr_advsign_drift_loss(gen, scores, alpha=0.3, radii=RADII)}[variant]
    loss, _ = fn()
    (grad,) = torch.autograd.grad(loss, gen)
    assert grad[6, 0, 0] < 0  # gradient descent increases x₁ of the middle point

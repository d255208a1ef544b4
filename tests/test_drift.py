"""Properties of the drift field, the loop oracle, and the regression loss."""

import pytest
import torch

from drpo_core.algorithms.drift import drift_field, drift_loss
from tests.reference import drift_field_loop


def points(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", ["laplacian", "rbf", "cosine"])
def test_antisymmetric_when_weights_symmetric(kernel):
    gen, pos, neg = points(9, 5), points(4, 5, seed=1), points(4, 5, seed=2)
    v = drift_field(gen, pos, neg, self_weight=0, kernel=kernel).V
    v_swapped = drift_field(gen, neg, pos, self_weight=0, kernel=kernel).V
    torch.testing.assert_close(v_swapped, -v, atol=1e-5, rtol=1e-4)
    assert v.abs().max() > 0.1  # a non-trivial field, not zero == -zero


def test_zero_when_positives_equal_negatives():
    gen, anchors = points(8, 6), points(5, 6, seed=3)
    v = drift_field(gen, anchors, anchors.clone(), self_weight=0).V
    assert v.abs().max() < 1e-6


def test_batch_as_negative_block_repels_even_with_equal_anchor_sets():
    # with the generated batch as a weight-1 negative block (the official code's default) equal
    # anchor sets leave a spreading force: document the difference by testing it
    gen, anchors = points(8, 6), points(5, 6, seed=3)
    assert drift_field(gen, anchors, anchors.clone()).V.abs().max() > 0.1


def test_permutation_equivariance_over_generated_axis():
    gen, pos, neg = points(11, 4), points(3, 4, seed=1), points(3, 4, seed=2)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(5))
    v = drift_field(gen, pos, neg).V
    torch.testing.assert_close(drift_field(gen[perm], pos, neg).V, v[perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-2, 7.0, 300.0])
def test_invariant_to_global_feature_scale(scale):
    gen, pos, neg = points(7, 5), points(3, 5, seed=1), points(3, 5, seed=2)
    ref = drift_field(gen, pos, neg)
    scaled = drift_field(gen * scale, pos * scale, neg * scale)
    torch.testing.assert_close(scaled.V, ref.V, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(scaled.sigma, ref.sigma * scale, rtol=1e-4, atol=0)


def test_shape_dtype_contract_and_input_checks():
    gen = points(6, 3).double().requires_grad_()
    field = drift_field(gen, points(2, 3).half(), points(2, 3, seed=1))
    assert field.V.shape == (6, 3) and field.V.dtype == torch.float32 and not field.V.requires_grad
    with pytest.raises(ValueError, match="feature dims differ"):
        drift_field(points(6, 3), points(2, 4), points(2, 3))
    with pytest.raises(ValueError, match="mask_negative_self"):
        drift_field(points(6, 3), points(2, 3), points(2, 3), mask_negative_self=True)


def test_finite_on_duplicate_points():
    gen = torch.ones(6, 4)
    pos = torch.ones(3, 4)
    neg = torch.cat([torch.ones(2, 4), torch.zeros(1, 4)])
    field = drift_field(gen, pos, neg)
    assert torch.isfinite(field.V).all() and torch.isfinite(field.sigma)
    loss, _ = drift_loss(gen.clone().requires_grad_(), pos, neg)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kernel", ["laplacian", "rbf", "cosine"])
@pytest.mark.parametrize("N,P,Q,D,self_weight", [(7, 3, 3, 5, 1.0), (5, 2, 3, 3, 0.0), (4, 1, 1, 2, 1.0)])
def test_matches_loop_oracle(kernel, N, P, Q, D, self_weight):
    gen, pos, neg = points(N, D), points(P, D, seed=1) + 0.5, points(Q, D, seed=2) - 0.5
    field = drift_field(gen, pos, neg, kernel=kernel, self_weight=self_weight, pos_weight=30.0, neg_weight=20.0)
    V, sigma = drift_field_loop(gen, pos, neg, kernel=kernel, self_weight=self_weight, pos_weight=30.0, neg_weight=20.0)
    torch.testing.assert_close(field.V.double(), V, atol=2e-4, rtol=1e-3)
    assert abs(float(field.sigma) - sigma) < 1e-5 * max(1.0, sigma)


def test_reference_drift_masking_matches_oracle():
    gen, ref = points(6, 4), points(6, 4, seed=9)
    field = drift_field(gen, ref, gen, mask_negative_self=True)
    V, _ = drift_field_loop(gen, ref, gen, mask_negative_self=True)
    torch.testing.assert_close(field.V.double(), V, atol=2e-4, rtol=1e-3)


def test_loss_value_equals_mean_squared_drift():
    gen = points(9, 4).requires_grad_()
    pos, neg = points(3, 4, seed=1), points(3, 4, seed=2)
    loss, stats = drift_loss(gen, pos, neg)
    V = drift_field(gen, pos, neg).V
    assert abs(float(loss.detach()) - float(V.pow(2).mean())) < 1e-4
    assert abs(stats["drift_norm"] - float(V.pow(2).mean().sqrt())) < 1e-5


@pytest.mark.parametrize("field_form", ["mean_shift", "kernel_gradient"])
def test_one_sgd_step_moves_points_toward_positives_and_away_from_negatives(field_form):
    torch.manual_seed(0)
    pos = torch.randn(4, 3) * 0.3 + torch.tensor([3.0, 0.0, 0.0])
    neg = torch.randn(4, 3) * 0.3 - torch.tensor([3.0, 0.0, 0.0])
    x = (torch.randn(10, 3) * 0.5).requires_grad_()
    loss, _ = drift_loss(x, pos, neg, self_weight=0, field_form=field_form, radii=(0.2, 0.5))
    loss.backward()
    with torch.no_grad():
        moved = x - 0.05 * x.grad

    def mean_dist(a, b):
        return torch.cdist(a, b).mean(1)

    assert (mean_dist(moved, pos) < mean_dist(x.detach(), pos)).all()
    assert (mean_dist(moved, neg) > mean_dist(x.detach(), neg)).all()

"""Baseline losses: one gradient step moves the weights where the objective says (known answers), and
the vectorised losses equal their loop oracles."""

import pytest
import torch

from drpo_core.algorithms.dpo import dpo_loss, pseudo_log_prob
from drpo_core.algorithms.draft import draft_loss
from drpo_core.algorithms.grpo import neighbor_grpo_loss, neighbor_noise, quasi_norm_advantages
from drpo_core.algorithms.raft import raft_loss
from drpo_core.rewards.hue import HueFractionReward
from drpo_core.rewards.soft_hue import SoftHueReward
from tests.reference_baselines import dpo_loss_loop, neighbor_grpo_loss_loop, quasi_norm_advantages_loop


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sgd_step(param, loss, lr):
    (grad,) = torch.autograd.grad(loss, param)
    return (param - lr * grad).detach()


# -- DPO --------------------------------------------------------------------------------------------
def test_dpo_loss_equals_loop_oracle():
    policy, ref, chosen, rejected = rand(6, 5), rand(6, 5, seed=1), rand(2, 5, seed=2), rand(2, 5, seed=3)
    loss, _ = dpo_loss(policy, ref, chosen, rejected, beta=3.0)
    assert float(loss) == pytest.approx(dpo_loss_loop(policy, ref, chosen, rejected, 3.0), rel=1e-5)


def test_dpo_step_moves_policy_toward_chosen_and_away_from_rejected():
    chosen, rejected = torch.full((2, 4), 1.0, dtype=torch.float64), torch.full((2, 4), -1.0, dtype=torch.float64)
    policy = rand(6, 4) * 0.1
    ref = policy.clone()  # at the start the policy is the base: logit 0, loss log 2
    x = policy.clone().requires_grad_()
    loss, stats = dpo_loss(x, ref, chosen, rejected, beta=30.0)
    assert float(loss.detach()) == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    new = sgd_step(x, loss, lr=0.05)
    gap = lambda p: float(pseudo_log_prob(p, chosen) - pseudo_log_prob(p, rejected))
    assert gap(new) > gap(policy) + 1e-3
    # known answer: ∂ gap / ∂ x_i = −2/(K D) Σ_j [(x_i − c_j)/P − (x_i − r_j)/Q] = 2 (c̄ − r̄)/(K D) for every i
    (grad,) = torch.autograd.grad(dpo_loss(x, ref, chosen, rejected, beta=30.0)[0], x)
    expected = -0.5 * 30.0 * 2 * (chosen.mean(0) - rejected.mean(0)) / (6 * 4)  # −σ(−0)·β·∂gap
    torch.testing.assert_close(grad, expected.expand(6, 4))


def test_dpo_reference_free_ignores_the_base():
    policy, chosen, rejected = rand(4, 3), rand(2, 3, seed=1), rand(2, 3, seed=2)
    a, _ = dpo_loss(policy, rand(4, 3, seed=5), chosen, rejected, beta=2.0, reference_free=True)
    b, _ = dpo_loss(policy, None, chosen, rejected, beta=2.0, reference_free=True)
    assert float(a) == float(b)


# -- RAFT -------------------------------------------------------------------------------------------
def test_raft_step_pulls_every_sample_toward_the_best_centroid():
    best = rand(3, 4, seed=1) + 5.0
    x = rand(8, 4).requires_grad_()
    loss, _ = raft_loss(x, best)
    assert float(loss) == pytest.approx(-float(pseudo_log_prob(x.detach(), best)))
    (grad,) = torch.autograd.grad(loss, x)
    # known answer: ∂/∂x_i mean_{i,j,d}(x_i − b_j)² = 2 (x_i − b̄) / (K D)
    torch.testing.assert_close(grad, 2 * (x.detach() - best.mean(0)) / (8 * 4))
    new = (x - 0.5 * grad).detach()
    assert ((new - best.mean(0)).norm(dim=1) < (x.detach() - best.mean(0)).norm(dim=1)).all()


# -- GRPO -------------------------------------------------------------------------------------------
def test_quasi_norm_advantages_equal_loop_and_handle_constant_groups():
    r = rand(7, seed=4)
    got = quasi_norm_advantages(r, p=0.8, clip=0.3)
    torch.testing.assert_close(got, torch.tensor(quasi_norm_advantages_loop(r, 0.8, 0.3), dtype=got.dtype))
    assert got.abs().max() == pytest.approx(0.3)  # the clip is active in this case
    assert quasi_norm_advantages(torch.ones(5)).abs().max() == 0


def test_neighbor_noise_keeps_unit_variance_and_correlation_sigma():
    base, deltas = rand(4, 32, 32).float(), rand(2000, 4, 32, 32, seed=1).float()[:64]
    eps = neighbor_noise(base, deltas, 0.3)
    assert eps.std().item() == pytest.approx(1.0, abs=0.03)
    corr = torch.corrcoef(eps.flatten(1)[:2])[0, 1].item()
    assert corr == pytest.approx(1 - 0.3**2, abs=0.03)
    with pytest.raises(ValueError):
        neighbor_noise(base, deltas, 0.0)


def test_grpo_loss_equals_loop_oracle_with_clipping_active():
    cands, cur, old = rand(6, 5), rand(2, 5, seed=1), rand(2, 5, seed=2)
    adv = quasi_norm_advantages(rand(6, seed=3))
    loss, stats = neighbor_grpo_loss(cands, cur, old, adv, clip_range=0.2, temperature=0.7)
    assert stats["grpo/clipfrac"] > 0
    assert float(loss) == pytest.approx(neighbor_grpo_loss_loop(cands, cur, old, adv.tolist(), 0.2, 0.7), rel=1e-5)


def test_grpo_step_moves_the_anchor_toward_the_high_advantage_candidate():
    cands = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    anchor = torch.tensor([[0.1, 0.3]], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x = anchor.clone().requires_grad_()
    loss, _ = neighbor_grpo_loss(cands, x, anchor, adv)
    new = sgd_step(x, loss, lr=0.1)
    assert (new - cands[0]).norm() < (anchor - cands[0]).norm()
    assert (new - cands[1]).norm() > (anchor - cands[1]).norm()


# -- DRaFT and its differentiable reward -----------------------------------------------------------
def test_soft_hue_ranks_like_the_hue_fraction_and_has_a_gradient():
    colors = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.2, 1.0), "grey": (0.5, 0.5, 0.5)}
    images = torch.stack([torch.tensor(c).view(3, 1, 1).expand(3, 8, 8) for c in colors.values()])
    prompts = ["a photo of a red car"] * 4
    soft, hard = SoftHueReward()(images, prompts), HueFractionReward()(images, prompts)
    assert hard.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert soft[0] > 0.9 and soft[1:].max() < 0.05
    assert torch.isnan(SoftHueReward()(images[:1], ["a photo of a car"])).all()
    washed_out = torch.tensor([0.51, 0.49, 0.49]).view(1, 3, 1, 1).expand(1, 3, 8, 8)  # red hue, almost no chroma
    assert HueFractionReward()(washed_out, prompts[:1]).item() == 0.0 and SoftHueReward()(washed_out, prompts[:1]).item() < 0.3


def test_draft_step_raises_the_reward():
    reward = SoftHueReward()
    image = torch.tensor([0.55, 0.45, 0.45]).view(1, 3, 1, 1).expand(2, 3, 4, 4).clone().requires_grad_()
    score = lambda img: reward(img, ["a red kite"] * 2)
    loss, stats = draft_loss({"soft_hue": score(image)}, {"soft_hue": 1.0})
    assert float(loss) == pytest.approx(-float(score(image.detach()).mean()))
    new = sgd_step(image, loss, lr=0.5)
    assert score(new).mean() > score(image.detach()).mean() + 1e-3
    assert (new[:, 0] > image.detach()[:, 0]).all()  # more red


def test_draft_refuses_nan_rewards_and_adds_the_base_l2():
    with pytest.raises(ValueError, match="NaN"):
        draft_loss({"r": torch.tensor([0.1, float("nan")])}, {"r": 1.0})
    x, base = torch.zeros(2, 3), torch.ones(2, 3)
    loss, _ = draft_loss({"r": torch.tensor([0.5, 0.5])}, {"r": 2.0}, x, base, ref_l2_weight=0.1)
    assert float(loss) == pytest.approx(-1.0 + 0.1)

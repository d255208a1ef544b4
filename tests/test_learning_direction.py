"""An update moves the policy toward its top-ranked candidates and away from its bottom-ranked ones.

Three levels, each catching a swapped positive/negative anchor pair where it could be planted:
``drpo_group_loss`` (algorithms/loss.py), ``DrpoLearner.update`` on the real tiny generator
(training/learner.py), and the ranking that feeds it (the anchors must be the highest-scored candidates).
"""

import torch

from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=8", "algo.num_anchors=2", "algo.lambda_ref=0"]


def mean_distance(points: torch.Tensor, anchors: torch.Tensor) -> float:
    """Mean Euclidean distance between every point `[N, D]` and every anchor `[M, D]`."""
    return float(torch.cdist(points.double(), anchors.double()).mean())


def test_one_sgd_step_on_the_group_loss_moves_features_toward_top_and_away_from_bottom():
    algo = load_config([], ["algo.lambda_ref=0", "algo.radii=[0.2,0.5]"]).algo
    torch.manual_seed(0)
    # two feature keys `[K, L, D]`; the top-M sit at +2 on the first axis, the bottom-M at −2
    shift = torch.zeros(5)
    shift[0] = 2.0
    pos = {k: torch.randn(2, 3, 5) * 0.3 + shift for k in ("a", "b")}
    neg = {k: torch.randn(2, 3, 5) * 0.3 - shift for k in ("a", "b")}
    feats = {k: (torch.randn(6, 3, 5) * 0.5).requires_grad_() for k in ("a", "b")}
    loss, _ = drpo_group_loss(feats, pos, neg, None, algo)
    loss.backward()
    for k, x in feats.items():
        moved = (x - 0.05 * x.grad).detach().reshape(-1, 5)
        before = x.detach().reshape(-1, 5)
        assert mean_distance(moved, pos[k].reshape(-1, 5)) < mean_distance(before, pos[k].reshape(-1, 5)), k
        assert mean_distance(moved, neg[k].reshape(-1, 5)) > mean_distance(before, neg[k].reshape(-1, 5)), k


def features_of(trainer: DrpoTrainer, groups) -> dict[str, torch.Tensor]:
    """The current policy's features on every group's own noises, ``key -> [B·K, L, D]``."""
    gen, K = trainer.generator, trainer.cfg.algo.num_candidates
    with torch.no_grad():
        seeds = [s for g in groups for s in g.seeds[:K]]
        emb = gen.encode_prompts([g.prompt for g in groups for _ in range(K)])
        return trainer.encoder(gen.predict_x0(gen.noise(seeds), emb))


def anchors_of(trainer: DrpoTrainer, group, top: bool) -> dict[str, torch.Tensor]:
    """Features of the group's top-M (or bottom-M) candidates by ranking score, ``key -> [M, L, D]``."""
    M = trainer.cfg.algo.num_anchors
    order = torch.argsort(group.scores, descending=True, stable=True)
    with torch.no_grad():
        return trainer.encoder(group.latents[order[:M] if top else order[-M:]])


def test_one_learner_update_moves_the_policy_toward_its_top_m_and_away_from_its_bottom_m(tmp_path):
    """Through DrpoLearner.update (recompute G_θ on the candidates' noises, select anchors, drift, AdamW).

    Measured per feature key in the point sets the loss uses (patch vectors pooled): the policy's features on
    the same noises move along μ(top-M) − μ(bottom-M), and their distance to the bottom-M grows more than
    their distance to the top-M. (Both absolute distances grow a little: one LoRA step moves all K candidates
    together and the batch spreads, so "closer to the top-M" is relative to the bottom-M.)
    """
    trainer = DrpoTrainer(load_config([], [*FAST, "trainer.lr=1e-3"]), output_dir=tmp_path / "run")
    groups, _ = trainer.collect(0, ["a photo of a red car", "a photo of a blue cup"])
    K = trainer.cfg.algo.num_candidates
    before = features_of(trainer, groups)
    stats = trainer.learner.update(groups)
    after = features_of(trainer, groups)
    assert stats["update/applied"] == 1.0 and stats["update/kept_groups"] == 2.0
    for b, group in enumerate(groups):
        top, bottom = anchors_of(trainer, group, top=True), anchors_of(trainer, group, top=False)
        for key in before:
            D = before[key].shape[-1]
            x0, x1 = (f[b * K:(b + 1) * K].reshape(-1, D) for f in (before[key], after[key]))
            pos, neg = top[key].reshape(-1, D), bottom[key].reshape(-1, D)
            shift = (x1 - x0).double().mean(0)
            toward = pos.double().mean(0) - neg.double().mean(0)
            assert float(torch.nn.functional.cosine_similarity(shift, toward, dim=0)) > 0.1, (b, key)
            gap_before = mean_distance(x0, neg) - mean_distance(x0, pos)
            gap_after = mean_distance(x1, neg) - mean_distance(x1, pos)
            assert gap_after > gap_before, (b, key)

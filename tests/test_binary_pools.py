"""The official GenEval anchor rule (algo.binary_rule: pools) against a re-derivation written here from the
official SD-Turbo trainer before its removal (UGVly/DrPO e93ff02^: ``_append_capped_geneval_candidates``,
``_sample_geneval_pref_indices``), and its loss: only the positives regressed, a skipped prompt a zero slot."""

import torch

from drpo_core.algorithms.binary_pools import official_binary_pools
from drpo_core.algorithms.groups import CandidateGroup, stable_seed
from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer


def oracle(scores, K, M, rng):
    pos_pool, neg_pool = [], []

    def append_capped(pool, new):
        pool = pool + new
        if len(pool) > M:
            keep = torch.randperm(len(pool), generator=rng)[:M].tolist()
            pool = [pool[k] for k in keep]
        return pool

    for r in range(0, len(scores), K):
        round_idx = list(range(r, min(r + K, len(scores))))
        passes = [i for i in round_idx if scores[i] >= 0.5]
        fails = [i for i in round_idx if scores[i] < 0.5]
        if passes:
            pos_pool = append_capped(pos_pool, passes)
        if fails:
            neg_pool = append_capped(neg_pool, fails)
        if len(pos_pool) >= M and len(neg_pool) >= M:
            break
    if len(pos_pool) < M or len(neg_pool) < M:
        return None
    pos = [pos_pool[k] for k in torch.randperm(len(pos_pool), generator=rng).tolist()]
    neg = [neg_pool[k] for k in torch.randperm(len(neg_pool), generator=rng).tolist()]
    best, worst = pos[:M], neg[:M]
    regressed = [i for i in pos + neg if i not in worst] or best[:1]
    return best, worst, regressed


def test_pools_match_the_official_rule():
    K, M = 6, 2
    data = torch.Generator().manual_seed(0)
    for case in range(300):
        rounds = int(torch.randint(1, 5, (1,), generator=data))
        p = float(torch.rand(1, generator=data))
        scores = (torch.rand(K * rounds, generator=data) < p).float()
        got = official_binary_pools(scores, K, M, 0.5, torch.Generator().manual_seed(case))
        want = oracle(scores.tolist(), K, M, torch.Generator().manual_seed(case))
        if want is None:
            assert got is None, case
            continue
        assert (got.pos_idx.tolist(), got.neg_idx.tolist(), got.regress_idx.tolist()) == want, case
        assert set(got.regress_idx.tolist()) == set(got.pos_idx.tolist())  # pools capped at M: only positives
        assert all(scores[i] >= 0.5 for i in got.pos_idx) and all(scores[i] < 0.5 for i in got.neg_idx)


def test_loss_regresses_the_positives_and_counts_a_skipped_prompt(tmp_path):
    cfg = load_config([], ["algo.num_candidates=4", "algo.num_anchors=1", "algo.binary_threshold=0.5",
                           "algo.latent_l2_weight=0.2", "trainer.prompts_per_step=2"])
    trainer = DrpoTrainer(cfg, output_dir=tmp_path / "run")
    gen, enc = trainer.generator, trainer.encoder
    with torch.no_grad():
        for p in gen.trainable_parameters():
            p.add_(0.05)
    groups = []
    for i, (prompt, scores) in enumerate([("a photo of a red car", [1.0, 0.0, 1.0, 0.0]),
                                          ("a photo of a blue cup", [1.0, 1.0, 1.0, 1.0])]):  # the second: no fails
        seeds = [10 * i + j for j in range(4)]
        latents, images = gen.generate([prompt] * 4, seeds)
        base = gen.generate([prompt] * 4, seeds, base=True)[0]
        g = CandidateGroup(group_id=f"0:{i}", prompt=prompt, seeds=seeds, latents=latents.float(), images=images,
                           version=0, base_latents=base.float())
        g.scores = torch.tensor(scores)
        groups.append(g)
    g = groups[0]
    pick = official_binary_pools(g.scores, 4, 1, 0.5, torch.Generator().manual_seed(stable_seed("binary-pools", cfg.trainer.seed, g.group_id)))
    with torch.no_grad():
        r = pick.regress_idx
        x = gen.predict_x0(gen.noise([g.seeds[i] for i in r]), gen.encode_prompts([g.prompt] * len(r)))
        feats, ref = enc(x), enc(g.base_latents[r])
        pos, neg = enc(g.latents[pick.pos_idx]), enc(g.latents[pick.neg_idx])
        loss, _ = drpo_group_loss(feats, pos, neg, ref, cfg.algo)
        loss = loss + 0.2 * (x - g.base_latents[r]).square().mean()
    stats = trainer.learner.update(groups)
    assert stats["skipped/too_few_passes_or_fails"] == 1 and stats["update/kept_groups"] == 1
    assert abs(stats["loss"] - float(loss) / 2) < 1e-4 * max(1.0, abs(float(loss)))  # zero slot for the skipped prompt
    assert r.tolist() == pick.pos_idx.tolist() and g.scores[r].eq(1).all()


def test_first_k_is_ours():
    cfg = load_config([], ["algo.binary_threshold=0.5", "algo.binary_rule=first_k"])
    assert cfg.algo.binary_rule == "first_k" and load_config([], []).algo.binary_rule == "pools"

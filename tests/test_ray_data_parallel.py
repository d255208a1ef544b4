"""The data-parallel learner: 2 workers × B/2 prompt groups == 1 worker × B (gloo on CPU, real Ray actors).

AdamW with eps=1 makes the first steps linear in the gradient (~lr·g/(|g|+1)), so equal weights show equal
gradients; the second step also checks that the optimizer states stayed identical. The groups are real: the
generator and reward shells make them in-process from the tiny model.
"""

from pathlib import Path

import pytest
import torch

from drpo_core.algorithms.groups import candidate_seed
from drpo_core.config import load_config
from services.runtime.actors import GeneratorActor, GroupRequest, LearnerActor, RewardActor, ScoreResult
from services.runtime.weights import WeightsHandle, unpack_state

ray = pytest.importorskip("ray")

B = 4
FAST = [f"trainer.prompts_per_step={B}", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2", "trainer.eps=1.0"]


def make_groups(cfg, learner: LearnerActor):
    generator, reward = GeneratorActor(cfg.model_dump_json()), RewardActor(cfg.model_dump_json())
    weights = WeightsHandle(0, learner.publish_weights()[0])
    groups, scores = [], []
    for slot, prompt in enumerate(learner.trainer.prompts.next(B)):
        request = GroupRequest(f"0:{slot}", 0, slot, prompt, [candidate_seed(cfg.trainer.seed, 0, slot, i) for i in range(6)])
        for_reward, for_learner, _ = generator.generate(weights, request)
        groups.append(for_learner)
        scores.append(reward.score(for_reward))
    return groups, scores


def test_two_gloo_workers_on_half_the_groups_each_make_the_one_worker_update(ray_cluster, tmp_path):
    cfg = load_config([], [*FAST, f"output.dir={tmp_path / 'one'}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    try:
        one = LearnerActor(cfg.model_dump_json(), str(tmp_path / "one"))
        groups, scores = make_groups(cfg, one)
        init = {k: v.clone() for k, v in one.trainer.generator.trainable_state_dict().items()}
        # step 2: the last group's scores are missing, so worker 1 keeps one group and worker 0 two
        missing = ScoreResult.missing(scores[-1].group_id, 0, 6, list(scores[-1].rewards))
        steps = [(scores, groups), (scores[:-1] + [missing], groups)]
        want = [one.update(version, s, *g) for version, (s, g) in enumerate(steps)]
        want_weights = one.trainer.generator.trainable_state_dict()
    finally:
        torch.set_num_threads(threads)

    Learner = ray.remote(num_cpus=0.5)(LearnerActor)
    workers = [Learner.remote(cfg.model_dump_json(), str(tmp_path / f"rank{r}")) for r in range(2)]
    address, port = ray.get(workers[0].rendezvous.remote(), timeout=240)
    joined = ray.get([w.join.remote(address, port, r, 2, 120.0) for r, w in enumerate(workers)], timeout=240)
    assert [j["backend"] for j in joined] == ["gloo", "gloo"] and [j["rank"] for j in joined] == [0, 1]
    try:
        for version, (s, g) in enumerate(steps):
            got = ray.get([w.update.remote(version, s[r * 2:(r + 1) * 2], *g[r * 2:(r + 1) * 2]) for r, w in enumerate(workers)],
                          timeout=240)
            same = [{k: v for k, v in g.items() if not k.startswith("timing/")} for g in got]
            assert same[0] == same[1]  # every worker returns the step's summed statistics
            for key in ("update/groups", "update/kept_groups", "skipped/too_few_valid", "update/applied"):
                assert got[0].get(key) == want[version].get(key), key
            for key in ("loss", "loss/pref", "update/grad_norm", "update/policy_lag"):
                assert got[0][key] == pytest.approx(want[version][key], rel=1e-4, abs=1e-7), key
        states = [unpack_state(payload) for payload, _ in ray.get([w.publish_weights.remote() for w in workers])]
    finally:
        for w in workers:
            ray.kill(w)
    for k in want_weights:
        torch.testing.assert_close(states[0][k], states[1][k], rtol=0, atol=0, msg=k)  # identical replicas
        torch.testing.assert_close(states[0][k], want_weights[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.allclose(want_weights[k], init[k], atol=1e-5) for k in init)  # the steps did move the weights

"""The runtime's pieces that need no cluster: config section, resource plan check, metric table,
weight packing, and the actor classes run in one process (local mode of the same code)."""

import re
import urllib.request

import pytest
import torch

from drpo_core.config import ConfigError, load_config
from drpo_core.algorithms.ranking import select_anchors
from drpo_core.training.trainer import DrpoTrainer
from services.runtime.actors import GeneratorActor, GroupRequest, LearnerActor, RewardActor, ScoreResult
from services.observability.metrics import METRICS, MetricsExporter, spec_for
from services.runtime.roles import PlacementError, ResourcePlan, Role
from services.runtime.weights import WeightStore, WeightsHandle, pack_state, unpack_state

FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2"]


def plan(*overrides, env=None):
    return ResourcePlan.from_config(load_config([], list(overrides)).runtime, env)


# -- config -----------------------------------------------------------------------------------------
def test_runtime_section_defaults_fit_two_cores_and_bad_values_fail_in_one_line():
    rt = load_config([], []).runtime
    assert rt.generator.num_cpus + rt.reward.num_cpus + rt.learner.num_cpus <= 2 and rt.max_staleness == 1
    assert load_config([], ["runtime.reward.replicas=3"]).runtime.reward.num_cpus == 0.25  # role defaults survive overrides
    assert load_config([], ["runtime.learner.replicas=2"]).runtime.learner.replicas == 2  # a data-parallel learner
    for override, where in [("runtime.learner.replicas=0", "runtime.learner.replicas"),
                            ("runtime.learner.max_task_retries=1", "not idempotent"),
                            ("runtime.max_staleness=-1", "runtime.max_staleness"),
                            ("runtime.placement=ROUND_ROBIN", "runtime.placement"),
                            ("runtime.generator.num_gpus=-1", "runtime.generator.num_gpus")]:
        with pytest.raises(ConfigError, match=re.escape(where)) as e:
            load_config([], [override])
        assert "\n" not in str(e.value)


# -- placement --------------------------------------------------------------------------------------
def test_plan_names_the_shortfall_before_anything_starts():
    p = plan("runtime.generator.replicas=2", "runtime.reward.num_cpus=0.5")
    with pytest.raises(PlacementError) as e:
        p.check({"CPU": 2.0})
    assert str(e.value).startswith("the plan needs 2.5 CPU (generator 2×0.5 + reward 1×0.5 + learner 1×1), the cluster has 2")
    gpus = plan("runtime.learner.num_gpus=1", "runtime.generator.num_gpus=0.5", "runtime.generator.replicas=4")
    with pytest.raises(PlacementError, match=r"needs 3 GPU \(generator 4×0.5 \+ learner 1×1\), the cluster has 2"):
        gpus.check({"CPU": 64.0, "GPU": 2.0})
    custom = plan("runtime.reward.resources={reward_gpu: 1}", "runtime.reward.replicas=2")
    with pytest.raises(PlacementError, match=r"needs 2 reward_gpu \(reward 2×1\), the cluster has 0"):
        custom.check({"CPU": 8.0})
    plan().check({"CPU": 2.0})  # the default plan fits the embedded 2-CPU cluster


def test_plan_checks_nodes_for_bundles_and_strict_strategies():
    big = plan("runtime.learner.num_cpus=3")
    with pytest.raises(PlacementError, match="no single node can hold one learner replica"):
        big.check({"CPU": 8.0}, nodes=[{"CPU": 2.0}] * 4)
    with pytest.raises(PlacementError, match="STRICT_PACK needs one node"):
        plan("runtime.placement=STRICT_PACK").check({"CPU": 2.0}, nodes=[{"CPU": 1.0}, {"CPU": 1.0}])
    with pytest.raises(PlacementError, match="STRICT_SPREAD needs 3 nodes"):
        plan("runtime.placement=STRICT_SPREAD").check({"CPU": 4.0}, nodes=[{"CPU": 2.0}, {"CPU": 2.0}])


def test_actor_options_carry_resources_budgets_and_environment():
    p = plan("runtime.reward.resources={reward_gpu: 1}", "runtime.reward.runtime_env={env_vars: {A: '1'}}",
             "runtime.generator.scheduling=SPREAD", env={"HF_HUB_OFFLINE": "1"})
    reward = p.actor_options(Role.REWARD)
    assert reward["num_cpus"] == 0.25 and reward["resources"] == {"reward_gpu": 1.0}
    # a role without GPUs sees none (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0)
    assert reward["max_task_retries"] == 0  # the pool owns the retries of pooled calls (one budget)
    assert reward["runtime_env"]["env_vars"] == {"HF_HUB_OFFLINE": "1", "A": "1", "CUDA_VISIBLE_DEVICES": ""}
    assert p.actor_options(Role.GENERATOR)["scheduling_strategy"] == "SPREAD"
    assert p.actor_options(Role.LEARNER)["max_task_retries"] == 0
    gpu = plan("runtime.learner.num_gpus=1").actor_options(Role.LEARNER)
    assert gpu["num_gpus"] == 1 and "CUDA_VISIBLE_DEVICES" not in gpu["runtime_env"]["env_vars"]  # Ray sets it


def test_a_gpu_role_without_cuda_stops_in_one_line():
    from services.runtime.actors import DeviceUnavailableError, check_gpu

    check_gpu("reward", 0)  # no GPUs asked: nothing to check
    if torch.cuda.is_available():
        pytest.skip("CUDA is visible here")
    with pytest.raises(DeviceUnavailableError, match=r"^runtime\.learner\.num_gpus=1 but this learner actor cannot use CUDA") as e:
        check_gpu("learner", 1)
    assert "\n" not in str(e.value) and f"torch {torch.__version__}" in str(e.value)


# -- metrics ----------------------------------------------------------------------------------------
def test_metric_table_follows_the_naming_rule():
    names = [s.name for s in METRICS]
    assert len(names) == len(set(names)) and all(n.startswith("drpo_") for n in names)
    for s in METRICS:
        if not s.labels:
            assert s.name == "drpo_" + s.key.replace("/", "_").removesuffix("_s") + ("_seconds" if s.key.endswith("_s") else "") \
                or s.kind == "histogram", s
    assert spec_for("reward/mean")[0].name == "drpo_reward_mean"
    assert spec_for("timing/update_s")[0].name == "drpo_timing_update_seconds"
    assert spec_for("reward/hps/mean") == (spec_for("reward/hps/mean")[0], {"reward": "hps"})
    assert spec_for("drift/layer1_mean_2/pref_norm")[1] == {"feature": "layer1_mean_2"}


def test_exporter_serves_the_step_on_its_port():
    exporter = MetricsExporter(run="r1")  # every series carries the run's name
    port = exporter.serve(0, "127.0.0.1")
    try:
        unmapped = exporter.export({"reward/mean": 0.25, "timing/update_s": 1.5, "reward/hue_fraction/missing": 2.0,
                                    "lag/groups": [0, 1, 1], "runtime/groups_reissued": 3.0, "pool/reward/restarts": 1.0})
        exporter.export({"runtime/groups_reissued": 5.0})
        assert unmapped == []
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        exporter.close()
    assert 'drpo_reward_mean{run="r1"} 0.25' in text and 'drpo_timing_update_seconds{run="r1"} 1.5' in text
    assert 'drpo_reward_model_missing{reward="hue_fraction",run="r1"} 2.0' in text
    assert 'drpo_runtime_groups_reissued_total{run="r1"} 5.0' in text and 'drpo_pool_restarts_total{pool="reward",run="r1"} 1.0' in text
    assert 'drpo_policy_lag_versions_bucket{le="0.0",run="r1"} 1.0' in text and 'drpo_policy_lag_versions_count{run="r1"} 3.0' in text


# -- weights ----------------------------------------------------------------------------------------
def test_weights_round_trip_every_dtype_and_only_the_newest_is_kept():
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.randn(2, 2).half()}
    back = unpack_state(pack_state(state))
    assert all(back[k].dtype == state[k].dtype and torch.equal(back[k], state[k]) for k in state)
    store = WeightStore()
    store.publish(0, "ref0")
    store.publish(1, "ref1")
    assert store.newest == WeightsHandle(1, "ref1", serial=2) and store.version == 1


def test_missing_scores_make_the_learner_skip_the_group():
    missing = ScoreResult.missing("3:1", version=2, size=6, labels=["hue_fraction"])
    sel = select_anchors(missing.scores[None], 2)
    assert not bool(sel.keep[0]) and sel.skipped == {"too_few_valid": 1}


# -- the actor classes in one process -------------------------------------------------------------
def test_actor_classes_without_ray_make_the_trainers_step(tmp_path):
    """Local mode of the same code: generator, reward and learner shells in-process == DrpoTrainer.train_step."""
    cfg = load_config([], [*FAST, f"output.dir={tmp_path / 'shells'}"])
    trainer = DrpoTrainer(load_config([], FAST), output_dir=tmp_path / "local")
    expected = trainer.train_step()

    learner = LearnerActor(cfg.model_dump_json(), str(tmp_path / "shells"))
    generator, reward = GeneratorActor(cfg.model_dump_json()), RewardActor(cfg.model_dump_json())
    weights = WeightsHandle(0, learner.publish_weights()[0])  # in-process: the payload itself, no object store
    prompts = learner.trainer.prompts.next(2)
    from drpo_core.algorithms.groups import candidate_seed

    groups, scores = [], []
    for slot, prompt in enumerate(prompts):
        request = GroupRequest(f"0:{slot}", 0, slot, prompt, [candidate_seed(cfg.trainer.seed, 0, slot, i) for i in range(6)])
        for_reward, for_learner, info = generator.generate(weights, request)
        assert info.version == 0 and info.size == 6
        # each role gets only what it reads: uint8 images for the rewards, latents and seeds for the learner
        assert for_reward.latents is None and for_reward.base_latents is None and for_reward.images.dtype == torch.uint8
        assert for_learner.images is None and for_learner.seeds == request.seeds
        assert all(t.device.type == "cpu" for t in (for_reward.images, for_learner.latents, for_learner.base_latents))
        groups.append(for_learner)
        scores.append(reward.score(for_reward))
    stats = learner.update(0, scores, *groups)
    assert stats["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    got, want = learner.trainer.generator.trainable_state_dict(), trainer.generator.trainable_state_dict()
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7) for k in want)
    payload, version = learner.publish_weights()
    assert version == 1 and unpack_state(payload).keys() == want.keys()

"""The shapes-world job (`make demo`'s config) through the Ray runtime and in-process: at max_staleness 0 the same
computation, step for step; at the default overlap every group lags by one version and the stale groups' anchors
are where the policy maps them now (tests/test_staleness.py has the learner-level equivalence)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drpo_core.config import load_config
from drpo_core.training.trainer import DrpoTrainer
from services.runtime.weight_sync import sync_dtype, sync_mode
from tests.test_ray_train import assert_same_weights, run, trainable

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [ROOT / "deploy" / "configs" / "toy.yaml"]
SHORT = ["trainer.steps=3", "trainer.prompts_per_step=2", "algo.num_candidates=8", "algo.num_anchors=2",
         "trainer.sample_every=1000", "trainer.checkpoint_every=1000", "trainer.ema_decay=0.5",
         "runtime.generator.num_cpus=0.3", "runtime.reward.num_cpus=0.1", "runtime.learner.num_cpus=0.5",
         "runtime.start_timeout_s=240", "runtime.request_timeout_s=120", "runtime.health_check_interval_s=2"]


def shapes(tmp_path, name, *overrides):
    return load_config(SHAPES, [*SHORT, f"output.dir={tmp_path / name}", *overrides])


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes_local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors
    try:
        trainer = DrpoTrainer(shapes(tmp, "local"), output_dir=tmp / "local")
        stats = [trainer.train_step() for _ in range(3)]
        with trainer.learner.averaged_weights():
            averaged = trainer.generator.trainable_state_dict()
        return {"stats": stats, "weights": trainer.generator.trainable_state_dict(), "ema": averaged}
    finally:
        torch.set_num_threads(threads)


def test_the_shapes_world_job_through_ray_at_staleness_0_is_the_in_process_job(ray_cluster, tmp_path, in_process):
    """Full UNet (collective weight broadcast, auto dtype = exact), two rewards, the moving average: the same
    rewards, losses, weights and averaged weights as DrpoTrainer."""
    from safetensors.torch import load_file

    cfg = shapes(tmp_path, "ray", "runtime.max_staleness=0")
    assert sync_mode(cfg) == "collective" and sync_dtype(cfg) == torch.float32
    _, rows = run(cfg)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row, want in zip(rows, in_process["stats"], strict=True):
        assert row["lag/groups"] == [0, 0]
        for key in ("reward/mean", "reward/geneval/mean", "loss", "loss/pref", "update/grad_norm"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    checkpoint = Path(cfg.output.dir) / "checkpoints" / "step_3"
    assert_same_weights(trainable(checkpoint), in_process["weights"])
    assert_same_weights(load_file(str(checkpoint / "ema.safetensors")), in_process["ema"])


def test_the_shapes_world_job_with_the_default_overlap_learns_from_groups_one_version_old(ray_cluster, tmp_path, in_process):
    cfg = shapes(tmp_path, "overlap")
    assert cfg.runtime.max_staleness == 1 and cfg.algo.stale_anchors == "current"
    _, rows = run(cfg)
    assert [r["lag/groups"] for r in rows][1:] == [[1, 1], [1, 1]]  # step 1 has no older weights to lag behind
    assert rows[0]["loss"] == pytest.approx(in_process["stats"][0]["loss"], rel=1e-5)  # step 1: lag 0, the same step
    assert all(r["update/applied"] == 1.0 and r["loss"] == r["loss"] for r in rows)

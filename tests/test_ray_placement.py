"""Placement you can trust, on a real cluster node that advertises a GPU but has no usable CUDA (this box):
a role given GPUs stops at start in one line; a role without GPUs has them hidden."""

from pathlib import Path

import pytest

from drpo_core.config import load_config
from services.runtime.actors import RewardActor
from services.runtime.roles import ResourcePlan, Role

ray = pytest.importorskip("ray")

from services.runtime.cluster import PoolExhaustedError, RayRuntime  # noqa: E402

FAST = ["algo.num_candidates=6", "algo.num_anchors=2", "runtime.generator.num_cpus=0.3", "runtime.reward.num_cpus=0.1",
        "runtime.learner.num_cpus=0.5", "runtime.start_timeout_s=180", "runtime.health_check_interval_s=2"]


def test_gpu_role_without_cuda_fails_at_start_and_gpu_less_roles_see_no_gpu(ray_cluster, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is usable here: the failure this test provokes cannot happen")
    node = ray_cluster.add_node(num_cpus=1, num_gpus=1, resources={"fake_gpu_node": 1})
    try:
        ray_cluster.wait_for_nodes()
        cfg = load_config([], [*FAST, "runtime.generator.num_gpus=1", f"output.dir={tmp_path / 'run'}"])
        with pytest.raises(PoolExhaustedError) as e:
            RayRuntime.start(cfg, Path(cfg.output.dir))
        message = str(e.value)
        assert "\n" not in message and message.startswith("generator replica 0 failed to start")
        assert "runtime.generator.num_gpus=1 but this generator actor cannot use CUDA (CUDA_VISIBLE_DEVICES='0'" in message

        # on the same GPU node, a role with num_gpus: 0 gets CUDA_VISIBLE_DEVICES="" (Ray 2.60 would leave it unset)
        cfg = load_config([], [*FAST, "runtime.reward.resources={fake_gpu_node: 0.5}"])
        options = ResourcePlan.from_config(cfg.runtime).actor_options(Role.REWARD)
        actor = ray.remote(RewardActor).options(**options).remote(cfg.model_dump_json())
        try:
            info = ray.get(actor.ping.remote(), timeout=180)
        finally:
            ray.kill(actor)
        assert info["cuda_visible_devices"] == "" and info["device"] == "cpu" and info["dtype"] == "float32"
    finally:
        ray_cluster.remove_node(node)


def test_an_embedded_cluster_starts_even_when_another_cluster_runs_on_the_machine(ray_cluster):
    """`drpo train` without an address starts its own cluster; with another one up here (this session's), a
    plain ray.init(num_cpus=...) would join that one and fail ("num_cpus ... must not be provided")."""
    import os
    import subprocess
    import sys

    code = ("import ray; from drpo_core.config import load_config; from services.runtime.cluster import connect; "
            "assert connect(load_config([], ['runtime.local_num_cpus=1'])); print('CPU', ray.cluster_resources()['CPU'])")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "CPU 1.0" in out.stdout, out.stderr[-2000:]

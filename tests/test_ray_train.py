"""The Ray actor–learner runtime against the single-process trainer, on the shared local cluster.

Every run uses real actors (tiny SD-Turbo generator, hue reward, learner) with fractional CPUs and
timeouts; faults are real: ``ray.kill`` of replicas while they hold work, the learner mid-run.
Ground truth is DrpoTrainer with the same config and the actors' thread count (one): with
max_staleness 0 the distributed run must produce the same weights. (Across thread counts float
noise differs, and AdamW turns noise-level gradients into full-size steps, so the thread count matters.)
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpo_core.config import load_config
from drpo_core.training.reporting import read_metrics
from drpo_core.training.trainer import DrpoTrainer

ray = pytest.importorskip("ray")

from services.runtime.controller import Controller  # noqa: E402
from services.observability.metrics import MetricsExporter, spec_for  # noqa: E402
from services.runtime.cluster import RayRuntime  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2",
        "trainer.heldout_eval_seeds=2", "trainer.eval_seeds=2", "runtime.max_staleness=0",
        "runtime.generator.num_cpus=0.3", "runtime.reward.num_cpus=0.1", "runtime.learner.num_cpus=0.5",
        "runtime.start_timeout_s=240", "runtime.request_timeout_s=120", "runtime.health_check_interval_s=2"]
STEPS = 3


def config(tmp_path, *overrides, name="run"):
    return load_config([], [*FAST, f"trainer.steps={STEPS}", f"output.dir={tmp_path / name}", *overrides])


def run(cfg, resume=None, on_start=None, on_step=None, exporter=None) -> tuple[dict, list[dict]]:
    rt = RayRuntime.start(cfg, Path(cfg.output.dir), resume=resume)
    try:
        if on_start:
            on_start(rt)
        result = Controller(cfg, rt, exporter=exporter).run(on_step=on_step, resume=resume)
    finally:
        rt.shutdown()
    return result, read_metrics(Path(cfg.output.dir) / "metrics.jsonl")


def trainable(checkpoint) -> dict[str, torch.Tensor]:
    return load_file(str(Path(checkpoint) / "trainable.safetensors"))


def grid_pixels(path) -> torch.Tensor:
    from PIL import Image

    return torch.tensor(list(Image.open(path).convert("RGB").getdata()), dtype=torch.int16)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def local_run(tmp, *overrides) -> dict:
    """DrpoTrainer (single process) with the same config: weights after steps 0..STEPS and per-step stats."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (Ray gives a fractional-CPU actor one thread)
    try:
        trainer = DrpoTrainer(config(tmp, *overrides), output_dir=tmp / "local")
        weights = [trainer.generator.trainable_state_dict()]
        stats = []
        for _ in range(STEPS):
            stats.append(trainer.train_step())
            weights.append(trainer.generator.trainable_state_dict())
        trainer.save_samples("step_0", base=True)  # the policy at step 0 is the base
    finally:
        torch.set_num_threads(threads)
    return {"weights": weights, "stats": stats, "grid": tmp / "local" / "samples" / "step_0.png"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return local_run(tmp_path_factory.mktemp("local"))


BINARY = "algo.binary_threshold=0.05"  # pass/fail reward: extra sampling rounds, and at step 3 no group is kept


@pytest.fixture(scope="module")
def reference_binary(tmp_path_factory):
    return local_run(tmp_path_factory.mktemp("local_binary"), BINARY)


def kill_when_busy(pool, method: str, min_step: int, killed: list) -> threading.Thread:
    """Kill (Ray restarts it) the replica that holds the first ``method`` call of a step ≥ ``min_step``."""
    def watch():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not killed:
            try:
                calls = list(pool.calls.values())
            except RuntimeError:  # the controller thread changed the dict; look again
                continue
            for call in calls:
                if call.request.method == method and int(call.request.request_id.split(":")[0]) >= min_step:
                    ray.kill(call.replica.handle, no_restart=False)
                    killed.append(call.request.request_id)
                    return
            time.sleep(0.002)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_synchronous_steps_equal_the_trainer_and_a_killed_job_resumes_through_the_cli(ray_cluster, tmp_path, reference):
    """max_staleness 0: every step equals DrpoTrainer.train_step. The job dies after step 2 (newest checkpoint:
    step 1); `drpo train --resume` (Ray, joining the cluster via RAY_ADDRESS) finishes with the same weights."""
    cfg = config(tmp_path, "runtime.placement=PACK", "trainer.checkpoint_every=1")  # PACK: one placement group
    out, exporter = Path(cfg.output.dir), MetricsExporter()

    class JobKilled(Exception):
        pass

    def die_at_step_2(stats):
        if stats["step"] == 2:
            raise JobKilled  # before the step-2 checkpoint; run() tears every actor down

    with pytest.raises(JobKilled):
        run(cfg, on_step=die_at_step_2, exporter=exporter)
    rows = read_metrics(out / "metrics.jsonl")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_1"]
    assert set(reference["stats"][0]) <= set(rows[0])  # the trainer's keys, plus timing/lag/runtime/pool
    assert all(spec_for(k) for k in rows[0]), [k for k in rows[0] if not spec_for(k)]  # each has a Prometheus metric
    assert exporter.registry.get_sample_value("drpo_reward_mean", {"run": ""}) == pytest.approx(rows[1]["reward/mean"])
    assert grid_pixels(out / "samples" / "step_0.png").sub(grid_pixels(reference["grid"])).abs().max() <= 1

    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "services.cli", "train", "--config", str(out / "config.yaml"), "--resume", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 2 was trained again after resuming from step 1, listed once
    assert [r["step"] for r in read_metrics(out / "metrics.rolled_back.jsonl")] == [2]  # the first try's row, kept aside
    for row, want in zip(rows, reference["stats"], strict=True):
        assert row["lag/groups"] == [0, 0]
        for key in ("reward/mean", "loss", "loss/pref", "update/grad_norm", "update/lr"):
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert_same_weights(trainable(out / "checkpoints" / f"step_{STEPS}"), reference["weights"][STEPS])
    state = json.loads((out / "checkpoints" / f"step_{STEPS}" / "state.json").read_text())
    assert state["step"] == STEPS and state["version"] == STEPS and state["reward_history"]
    for f in ("config.yaml", "plots/reward_curve.png", f"samples/step_{STEPS}.png", "samples/before_after.png", "eval.json",
              f"checkpoints/step_{STEPS}/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    assert json.loads((out / "eval.json").read_text())["overall"]["n"] > 0
    # one TensorBoard writer on the driver; the resumed attempt purged the killed attempt's step 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]
    assert {"samples", "before_after"} <= set(events.Tags()["images"]) and "lag/mean" in events.Tags()["scalars"]


def test_killed_replicas_and_learner_lose_and_double_count_nothing(ray_cluster, tmp_path, reference_binary):
    """A generator and a reward replica are killed while they hold work, the learner after step 2 (before its
    step-2 checkpoint): lost groups are re-issued, late ones dropped, the learner resumes from step 1.
    A binary reward makes groups go round generate → score → extend → score (DrpoTrainer's extra rounds)."""
    reference = reference_binary
    cfg = config(tmp_path, BINARY, "runtime.generator.replicas=2", "runtime.reward.replicas=2", "trainer.checkpoint_every=1")
    killed_gen, killed_rew, runtime = [], [], []

    def start_killers(rt):
        runtime.append(rt)
        kill_when_busy(rt.generators, "generate", 1, killed_gen)
        kill_when_busy(rt.rewards, "score", 2, killed_rew)

    def kill_learner_at_step_2(stats):
        if stats["step"] == 2 and stats["runtime/learner_restarts"] == 0:
            ray.kill(runtime[0].learner, no_restart=False)  # Ray restarts it; it reloads checkpoints/step_1

    result, rows = run(cfg, on_start=start_killers, on_step=kill_learner_at_step_2)
    assert killed_gen and killed_rew, "the killers never found work in flight"
    assert [r["step"] for r in rows] == [1, 2, 3]  # step 2 was redone after the learner restart, and listed once
    assert [r["update/groups"] for r in rows] == [2.0] * 3  # every update saw exactly its B groups
    rolled_back = read_metrics(Path(cfg.output.dir) / "metrics.rolled_back.jsonl")
    assert [r["step"] for r in rolled_back] == [2] and rolled_back[0]["runtime/learner_restarts"] == 0
    want = reference["stats"]
    assert [r["sampler/extra_rounds"] for r in rows] == [w["sampler/extra_rounds"] for w in want]
    assert [r["update/kept_groups"] for r in rows] == [w["update/kept_groups"] for w in want]
    assert rows[-1]["runtime/learner_restarts"] == 1 and rows[-1]["runtime/groups_reissued"] >= 1
    # re-issued groups are regenerated from the same seeds and weights version: the run is unchanged
    assert_same_weights(trainable(result["checkpoint"]), reference["weights"][STEPS])


def test_cli_names_a_resource_shortfall_in_one_line_before_starting_anything(ray_cluster, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "services.cli", "train", "--set", "runtime.generator.replicas=3",
                           "--set", "runtime.generator.num_cpus=1", "--output-dir", str(tmp_path / "x")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("drpo: error: the plan needs 4.25 CPU (generator 3×1 + reward 1×0.25")
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_sigkilled_ray_driver_resumes_automatically_with_each_step_once(ray_cluster, tmp_path):
    """`drpo train --resume auto` on Ray (joining the cluster, as under a RayJob) is SIGKILLed after step 3 with
    step_2 its newest checkpoint; the identical command, past a torn step_3.tmp, finishes with each step once."""
    from tests.test_resume import drpo_train, finish, kill_when, plant_torn_checkpoint, steps_in
    from drpo_core.training.checkpoint import checkpoint_step, latest_checkpoint

    out = tmp_path / "run"
    args = [f"--set={o}" for o in FAST + ["trainer.steps=4", "trainer.checkpoint_every=2"]]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    metrics = out / "metrics.jsonl"
    kill_when(drpo_train(out, *args, env=env), lambda: 3 in steps_in(metrics), timeout_s=400)
    assert checkpoint_step(latest_checkpoint(out)) == 2
    plant_torn_checkpoint(out, 3)
    finish(drpo_train(out, *args, env=env))
    assert steps_in(metrics) == [1, 2, 3, 4]
    assert steps_in(out / "metrics.rolled_back.jsonl") == [3]
    state = json.loads((out / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["step"] == 4 and state["version"] == 4


def test_sigterm_on_the_ray_driver_checkpoints_its_last_step_stops_the_actors_and_resumes(ray_cluster, tmp_path):
    """`drpo train` on Ray with the default overlap (the next step is already sampling) gets SIGTERM after step 2:
    the learner checkpoints the last finished step, the driver exits 143 (its actors end with it); the identical
    command with --resume auto trains the rest, each step once."""
    from tests.test_resume import drpo_train, finish, kill_when, steps_in
    from drpo_core.training.checkpoint import checkpoint_step, latest_checkpoint

    out = tmp_path / "run"
    args = [f"--set={o}" for o in FAST + ["runtime.max_staleness=1", "trainer.steps=5", "trainer.checkpoint_every=10"]]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address)
    metrics = out / "metrics.jsonl"
    proc = drpo_train(out, *args, env=env)
    err = kill_when(proc, lambda: 2 in steps_in(metrics), timeout_s=400, sig=signal.SIGTERM)
    assert proc.returncode == 143, err[-3000:]
    last = steps_in(metrics)[-1]
    assert checkpoint_step(latest_checkpoint(out)) == last and f"stopped by SIGTERM after step {last}" in err
    state = json.loads((out / "checkpoints" / f"step_{last}" / "state.json").read_text())
    assert state["version"] == last  # the learner's weights of that step, not of the step sampled ahead
    finish(drpo_train(out, *args, env=env))
    assert steps_in(metrics) == [1, 2, 3, 4, 5]
    assert not (out / "metrics.rolled_back.jsonl").exists()


def test_two_data_parallel_learner_workers_through_drpo_train_learn_like_one(ray_cluster, tmp_path, reference):
    """`drpo train` with runtime.learner.replicas=2 (two gloo workers, one group each per step) finishes and
    follows the one-learner trainer: same step-1 update, each step's B groups seen once, one checkpoint writer.
    The generator makes each step's two groups in one batched call (runtime.generator.batch_groups=2)."""
    out = tmp_path / "dp"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.address, PYTHONPATH=str(ROOT))
    sets = [f"--set={o}" for o in [*FAST, f"trainer.steps={STEPS}", "runtime.learner.replicas=2", "runtime.learner.num_cpus=0.4",
                                     "runtime.generator.batch_groups=2"]]
    proc = subprocess.run([sys.executable, "-m", "services.cli", "train", "--output-dir", str(out), *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 learner replica(s)" in proc.stderr and "learner/cpu/float32 ×2" in proc.stderr  # the devices line
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and [r["update/groups"] for r in rows] == [2.0] * 3
    assert rows[0]["placement/learner/cpu/float32"] == 2.0 and rows[0]["placement/generator/cpu/float32"] == 1.0
    for key in ("reward/mean", "loss", "loss/pref", "update/grad_norm"):  # step 1: the same groups, the same gradient
        assert rows[0][key] == pytest.approx(reference["stats"][0][key], rel=1e-4), key
    for row, want in zip(rows, reference["stats"]):
        assert row["reward/mean"] == pytest.approx(want["reward/mean"], rel=1e-3)
    got, want = trainable(out / "checkpoints" / f"step_{STEPS}"), reference["weights"][STEPS]
    base = reference["weights"][0]
    # after 3 AdamW steps, float-order noise is magnified on a few entries (module doc: m/√v ≈ ±1 for noise-level
    # gradients; seen up to 60 % of the movement on single entries), so: nearly all entries agree closely
    close = [((got[k] - want[k]).abs() <= 0.05 * (want[k] - base[k]).abs().max() + 1e-6).flatten() for k in want]
    assert float(torch.cat(close).float().mean()) >= 0.95
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{STEPS}"]

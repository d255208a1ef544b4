"""Automatic resume: `drpo train --resume auto` after SIGKILL, torn checkpoints, each metrics row once.

The Ray runtime's SIGKILL test is in tests/test_ray_train.py (it needs the shared cluster); the helpers
that start, watch and kill a real `drpo train` process are here.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from drpo_core.training.checkpoint import checkpoint_step, latest_checkpoint
from drpo_core.training.reporting import MetricsWriter, read_metrics, rewind_metrics

ROOT = Path(__file__).resolve().parents[1]


def steps_in(path: Path) -> list[int]:
    """Steps of the complete rows (a row being written while we read is skipped)."""
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass
    return steps


def drpo_train(out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = dict(env or os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "services.cli", "train", "--output-dir", str(out), "--resume", "auto", *args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, ready, timeout_s: float = 300, sig: int = signal.SIGKILL) -> str:
    """Send ``sig`` (SIGKILL) to ``proc`` as soon as ``ready()`` holds (polled every 10 ms); fails if it ends first.
    Returns what it wrote on stderr."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"drpo train ended (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.01)
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]  # a SIGTERMed run checkpoints first: within runtime.stop_grace_s
    return err


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> None:
    _, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]


def plant_torn_checkpoint(out: Path, step: int) -> Path:
    """What a kill in the middle of save_checkpoint leaves: a ``step_N.tmp`` folder with part of the files."""
    torn = out / "checkpoints" / f"step_{step}.tmp"
    torn.mkdir(parents=True, exist_ok=True)
    (torn / "trainable.safetensors").write_bytes(b"\x00" * 10)
    (torn / "state.json").write_text('{"step": ')
    return torn


def test_latest_checkpoint_ignores_torn_and_foreign_folders(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for name, complete in [("step_2", True), ("step_10", True), ("step_11", False), ("step_12.tmp", True), ("step_x", True)]:
        (ckpts / name).mkdir(parents=True)
        if complete:
            (ckpts / name / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == ckpts / "step_10"  # numerically newest complete one (not "step_2" > "step_10")
    assert checkpoint_step(ckpts / "step_12.tmp") is None and checkpoint_step(ckpts / "step_11") is None
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_rewind_keeps_each_step_once_and_sets_the_rest_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    for step in (1, 2, 3):
        writer.write({"step": step, "loss": float(step)})
    assert writer.rewind(1) == 2
    writer.write({"step": 2, "loss": 20.0})
    writer.close()
    with path.open("a") as fh:
        fh.write('{"step": 3, "lo')  # a row torn by a kill mid-write
    assert rewind_metrics(path, 2) == 1
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 20.0)]
    aside = (tmp_path / "metrics.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside[:2]] == [2, 3] and aside[2] == '{"step": 3, "lo'
    assert rewind_metrics(tmp_path / "absent.jsonl", 0) == 0


LOCAL = ["--local", "--config", "deploy/configs/tiny.yaml", "--set", "algo.num_candidates=6", "--set", "algo.num_anchors=2",
         "--set", "trainer.steps=6", "--set", "trainer.checkpoint_every=4",
         "--set", "trainer.heldout_eval_seeds=2", "--set", "trainer.eval_seeds=2", "--set", "trainer.sample_every=1000"]


def test_sigkilled_local_run_resumes_automatically_with_each_step_once(tmp_path):
    """Kill 1 lands before any checkpoint (the rerun starts fresh), kill 2 after step 5 (the rerun resumes from
    step_4 past a torn step_5.tmp and trains step 5 again). The result equals an uninterrupted run."""
    out, straight = tmp_path / "killed", tmp_path / "straight"
    finish(drpo_train(straight, *LOCAL))
    metrics = out / "metrics.jsonl"

    kill_when(drpo_train(out, *LOCAL), lambda: len(steps_in(metrics)) >= 2)
    assert latest_checkpoint(out) is None and steps_in(metrics)[:2] == [1, 2]
    kill_when(drpo_train(out, *LOCAL), lambda: 5 in steps_in(metrics))
    assert checkpoint_step(latest_checkpoint(out)) == 4 and steps_in(metrics)[-1] >= 5
    plant_torn_checkpoint(out, 5)
    finish(drpo_train(out, *LOCAL))

    assert steps_in(metrics) == [1, 2, 3, 4, 5, 6]
    assert 5 in steps_in(out / "metrics.rolled_back.jsonl")  # the killed try's step-5 row, set aside
    a, b = (load_file(str(run / "checkpoints" / "step_6" / "trainable.safetensors")) for run in (out, straight))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    assert [r["loss"] for r in read_metrics(metrics)] == pytest.approx([r["loss"] for r in read_metrics(straight / "metrics.jsonl")],
                                                                        rel=1e-5)
    assert (out / "eval.json").is_file()


def test_sigterm_local_run_checkpoints_its_last_step_and_resumes_with_each_step_once(tmp_path):
    """SIGTERM (kubectl delete, ray job stop, a preemption) after step 2 with no periodic checkpoint yet: the run
    finishes the step in hand, checkpoints it, exits 143 with one line; the identical command finishes the job
    with each step once (nothing rolled back) and the uninterrupted run's weights."""
    out, straight = tmp_path / "stopped", tmp_path / "straight"
    finish(drpo_train(straight, *LOCAL))
    metrics = out / "metrics.jsonl"
    proc = drpo_train(out, *LOCAL)
    err = kill_when(proc, lambda: 2 in steps_in(metrics), sig=signal.SIGTERM)
    assert proc.returncode == 143, err[-2000:]
    last = steps_in(metrics)[-1]
    assert last < 6 and checkpoint_step(latest_checkpoint(out)) == last  # the last finished step, not step_4 or none
    assert f"stopped by SIGTERM after step {last}" in err and "--resume auto" in err
    finish(drpo_train(out, *LOCAL))
    assert steps_in(metrics) == [1, 2, 3, 4, 5, 6]
    assert not (out / "metrics.rolled_back.jsonl").exists()  # no step redone
    a, b = (load_file(str(run / "checkpoints" / "step_6" / "trainable.safetensors")) for run in (out, straight))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)

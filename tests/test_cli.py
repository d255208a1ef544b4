"""The `drpo` CLI end to end: a short local training run and the one-line user errors (exit code 2)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRPO = [sys.executable, "-m", "services.cli"]
SHORT = ["--set", "trainer.steps=3", "--set", "trainer.prompts_per_step=2", "--set", "algo.num_candidates=6",
         "--set", "algo.num_anchors=2", "--set", "trainer.checkpoint_every=2", "--set", "trainer.sample_every=2",
         "--set", "trainer.heldout_eval_seeds=2"]


def drpo(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*DRPO, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_local_writes_every_output(tmp_path):
    out = tmp_path / "run"
    proc = drpo("train", "--local", "--config", "deploy/configs/tiny.yaml", *SHORT, "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"step", "reward/mean", "reward/std", "loss", "time/step_s"} <= r.keys()
    from drpo_core.config import load_config
    assert load_config([out / "config.yaml"]).trainer.steps == 3  # the resolved config reloads
    for png in ("plots/reward_curve.png", "samples/step_0.png", "samples/step_2.png", "samples/step_3.png", "samples/before_after.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for step in (2, 3):
        ckpt = out / "checkpoints" / f"step_{step}"
        assert (ckpt / "pytorch_lora_weights.safetensors").stat().st_size > 0
        assert json.loads((ckpt / "state.json").read_text())["step"] == step
    assert json.loads((out / "eval.json").read_text())["overall"]["n"] > 0
    assert "held-out reward" in proc.stderr

    # the same folder again is refused (nothing is overwritten); --resume continues it
    again = drpo("train", "--local", "--config", "deploy/configs/tiny.yaml", *SHORT, "--output-dir", str(out))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = drpo("train", "--local", "--config", "deploy/configs/tiny.yaml", *SHORT, "--set", "trainer.steps=4",
                   "--output-dir", str(out), "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.parametrize("args,needle", [
    (["--set", "algo.nope=1"], "algo.nope: unknown key"),
    (["--set", "algo.num_candidates=1"], "algo.num_candidates"),
    (["--set", "algo.num_anchors=5", "--set", "algo.num_candidates=8"], "2M=10"),
    (["--set", "trainer.lr=-0.1"], "trainer.lr"),
    (["--config", "no/such/file.yaml"], "config file not found"),
    (["--set", "model.path=/no/such/model"], "does not exist"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, args, needle):
    proc = drpo("train", "--local", *args, "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr[-1500:]
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_print_config_resolves_layers(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("algo:\n  num_candidates: 12\n")
    proc = drpo("print-config", "--config", "deploy/configs/tiny.yaml", "--config", str(extra), "--set", "algo.num_anchors=3")
    assert proc.returncode == 0
    assert "num_candidates: 12" in proc.stdout and "num_anchors: 3" in proc.stdout


def test_empty_output_dir_on_the_command_line_is_refused_and_numeric_names_are_folders(tmp_path):
    proc = drpo("train", "--local", "--config", "deploy/configs/tiny.yaml", "-o", "")
    assert proc.returncode == 2 and "output.dir: must name a folder" in proc.stderr, proc.stderr
    shown = drpo("print-config", "--config", "deploy/configs/tiny.yaml", "--set", 'output.dir="123"')
    assert shown.returncode == 0 and "dir: '123'" in shown.stdout, shown.stdout + shown.stderr

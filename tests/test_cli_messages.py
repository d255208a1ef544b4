"""What the CLI prints: one clean line for each user error (exit 2), nothing from libraries on export,
and the progress bar only once a step exists."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from services.observability.progress import StepProgress

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["--set", "trainer.steps=1", "--set", "trainer.prompts_per_step=1", "--set", "algo.num_candidates=4",
            "--set", "algo.num_anchors=1", "--set", "trainer.heldout_eval_seeds=0", "--set", "trainer.eval_seeds=1"]


def drpo(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "DRPO_VERBOSE"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(proc, needle: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("drpo: error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["--grpc", "--metrics-port", "99999"], "--metrics-port 99999: not a TCP port (1-65535)"),
    (["--port", "0"], "--port 0: not a TCP port"),
    (["--port", "70000"], "--port 70000: not a TCP port"),
])
def test_serve_reward_port_errors_are_one_line(args, needle):
    one_error_line(drpo("serve-reward", *args), needle)


def test_export_is_quiet_and_resume_with_another_lora_rank_names_the_field(tmp_path):
    run = tmp_path / "run"
    trained = drpo("train", "--local", "-c", "deploy/configs/tiny.yaml", *ONE_STEP, "-o", str(run))
    assert trained.returncode == 0, trained.stderr[-2000:]

    exported = drpo("export", "--checkpoint", str(run), "--out", str(tmp_path / "export"), "--full-pipeline")
    assert exported.returncode == 0, exported.stderr
    assert exported.stderr == ""  # no deprecation warnings, no "Loading pipeline components" bars
    assert [l.split()[0] for l in exported.stdout.splitlines()] == ["lora", "peft", "pipeline", "provenance", "model_card"]

    resumed = drpo("train", "--local", "-c", "deploy/configs/tiny.yaml", *ONE_STEP, "--set", "trainer.steps=2",
                   "--set", "lora.rank=8", "-o", str(run), "--resume", str(run))
    one_error_line(resumed, "was trained with lora.rank=16 (config: 8)")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]  # nothing lost or added


def test_the_bar_starts_with_the_first_step_on_a_terminal_and_lines_are_printed_elsewhere():
    tty = Console(file=io.StringIO(), force_terminal=True, width=100)
    with StepProgress(tty, total=2) as progress:
        assert tty.file.getvalue() == ""  # an error before the first step prints alone
        progress.update({"step": 1, "reward/mean": 0.5, "loss": 2.0, "time/step_s": 0.1})
    assert "DrPO" in tty.file.getvalue() and "step" not in tty.file.getvalue().split("DrPO")[0]

    log = Console(file=io.StringIO(), force_terminal=False, width=40)
    with StepProgress(log, total=4, log_every=2) as progress:
        for step in range(1, 5):
            progress.update({"step": step, "reward/mean": 0.1 * step, "loss": float("nan"), "time/step_s": 0.5})
    lines = log.file.getvalue().splitlines()
    assert [l.split()[1] for l in lines] == ["2/4", "4/4"]  # every log_every-th step, one unwrapped line each
    assert lines[0].startswith("step 2/4 reward 0.2 loss nan 0.50 s/step eta ")

"""`ray job submit ... -- drpo train` against a real head started with `ray start --head` (with the dashboard).

Slow (a head with its dashboard takes ~15 s to start, the job ~30 s more) and it binds fixed-range local
ports, so it runs only with DRPO_TEST_RAY_JOB=1:

    DRPO_TEST_RAY_JOB=1 .venv/bin/python -m pytest -q tests/test_ray_job.py
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(os.environ.get("DRPO_TEST_RAY_JOB") != "1",
                                reason="starts a real Ray head with its dashboard (~1 min); set DRPO_TEST_RAY_JOB=1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # it answers (401 without the auth token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:g}s")


def stop(head: subprocess.Popen) -> None:
    """SIGINT to `ray start --block`, then SIGKILL to its process group: only the processes this test started."""
    head.send_signal(signal.SIGINT)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=20)


def test_ray_job_submit_runs_drpo_train_on_a_real_head(tmp_path):
    dashboard = free_port()
    # Ray 2.60 heads enable token auth by default (token in ~/.ray/auth_token); the job CLI reads it in token mode
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    temp = Path("/tmp") / f"drpo-rayjob-{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             # own ports for the agents: another cluster on this machine (the session one) holds the defaults
                             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                             f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                             f"--ray-client-server-port={free_port()}",
                             f"--temp-dir={temp}", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://127.0.0.1:{dashboard}/api/version", 120)
        out = tmp_path / "run"
        for _ in range(12):  # the dashboard answers before its job agent is up ("No available agent"): retry
            proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                   "--working-dir", ".", "--runtime-env", "deploy/ray/runtime_env.yaml", "--",
                                   "drpo", "train", "--config", "deploy/configs/tiny.yaml", "--set", "trainer.steps=3",
                                   "--set", "trainer.heldout_eval_seeds=2", "--output-dir", str(out)],
                                  cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in proc.stdout + proc.stderr:
                break
            time.sleep(5)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        assert "succeeded" in proc.stdout + proc.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and "lag/groups" in rows[0]
        assert (out / "checkpoints" / "step_3" / "state.json").is_file()
    finally:
        stop(head)

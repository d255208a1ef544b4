"""`make gpu-check` (benchmarks/gpu_check.py) at tiny size on the CPU: the script a lent GPU runs once must not rot.

Runs it as the GPU machine will (a subprocess, one JSON report in --out) and checks that every section ran and
reported finite, positive numbers under the keys docs/models.md reads.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def numbers(tree, path=""):
    """Every (path, number) in a JSON tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}/{i}")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, float(tree)


def test_gpu_check_runs_at_tiny_size_on_cpu_and_writes_one_report(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--size", "tiny", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check.json"]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"device", "size", "torch", "date", "wall_s", "sections"} <= set(report) and report["size"] == "tiny"
    sections = report["sections"]
    assert list(sections) == ["preset_update", "sampling", "drpo_vs_draft", "weight_publish"]
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s], sections

    update = sections["preset_update"]
    assert update["applied"] == 1.0 and len(update["micro_batches"]) == update["prompts"] == 2
    assert {"seconds", "peak_gib"} == set(update["micro_batches"][0])
    for key in ("micro_batch_median_s", "micro_batch_peak_gib_max", "optimizer_step_s", "update_32_prompts_estimate_s"):
        assert key in update, key
    assert {"policy_only", "with_base"} <= set(sections["sampling"]) and sections["sampling"]["with_base"]["candidates_per_s"] > 0
    rows = sections["drpo_vs_draft"]["rows"]
    assert [r["reward"] for r in rows] == ["vit-tiny", "llama-tiny"]
    assert all({"drpo_ref_on", "drpo_ref_off", "draft"} == set(r["total_s"]) for r in rows)
    for state in ("lora", "full_unet"):
        assert {"params_M", "MiB", "publish_s", "flatten_s", "receive_s"} <= set(sections["weight_publish"][state])

    values = dict(numbers(sections))
    bad = {p: v for p, v in values.items() if not (math.isfinite(v) and (v > 0 or p.endswith(("/loss", "/grad_norm"))))}
    assert not bad, bad  # every time, memory, rate and size is a positive finite number

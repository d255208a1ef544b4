"""benchmarks/smoke_real.py (`make smoke-real`) runs end to end on the tiny model (--dry-tiny), so the script
that runs the real-size update cannot rot; the real-size run itself is `make smoke-real` (minutes, ~9 GiB)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_real_dry_run_applies_one_update(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DRPO_SMOKE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/smoke_real.py", "--dry-tiny", "--json", str(tmp_path / "r.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["max_weight_change"] > 0 and result["keys"] == sorted(
        f"layer4_{s}" for s in ("mean", "std", "mean_2", "std_2", "mean_4", "std_4"))
    assert [r["stage"].split()[0] for r in result["stages"]] == ["build", "load", "load", "encode", "sample", "score", "DrPO"]

"""The demo's acceptance benchmark: default job vs a shuffled-reward control, on 2 CPU cores.

Runs `drpo train --local` twice with the same seed and config — once as shipped, once with each prompt
group's scores shuffled before ranking (`algo.shuffle_rewards=true`) — then reads each run's eval.json
(held-out prompts × held-out seeds, base vs final policy, paired) and prints the table for the README.

    .venv/bin/python benchmarks/demo_benchmark.py [--config deploy/configs/tiny.yaml] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "services.cli", "train", "--local", "--config", config, "--output-dir", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    result = json.loads((out / "eval.json").read_text())
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "train_s": sum(r["time/step_s"] for r in steps), "steps": len(steps), **result}


def row(name: str, r: dict) -> str:
    o = r["overall"]
    per = ", ".join(f"{k} {v['base_mean']:.3f}→{v['policy_mean']:.3f}" for k, v in r["per_class"].items())
    return (f"| {name} | {r['steps']} | {r['wall_s']:.0f} s | {o['base_mean']:.4f} ± {o['base_se']:.4f} | "
            f"{o['policy_mean']:.4f} ± {o['policy_se']:.4f} | {o['gain']:+.4f} ± {o['gain_se']:.4f} ({o['z']:.1f} s.e.) | {per} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deploy/configs/tiny.yaml")
    ap.add_argument("--out", default=f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--skip-control", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    args = ap.parse_args()
    out = Path(args.out)
    extra = [a for s in args.set for a in ("--set", s)]
    results = {"default": run(args.config, out / "default", extra)}
    if not args.skip_control:
        results["shuffled control"] = run(args.config, out / "control", [*extra, "--set", "algo.shuffle_rewards=true"])
    (out / "benchmark.json").write_text(json.dumps(results, indent=2))
    print("| run | steps | wall | base reward | final reward | paired gain | per colour (base→final) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(row(name, r))
    print(f"\nresults: {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()

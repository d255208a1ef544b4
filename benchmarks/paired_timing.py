"""Ray vs local whole-job wall time, measured as a paired, alternating comparison (≥ 5 pairs, median ratio).

One run = one `drpo train` process (start-up, every step, checkpoints, eval), timed from launch to exit. Pairs
alternate which runtime goes first (local→ray, ray→local, ...), so a machine that gets busier or quieter over
time biases both sides equally; each pair gives ratio = wall(ray) / wall(local), and the summary is the median
ratio with its min–max and how many pairs favoured each side. A shared or loaded machine widens the spread:
quote the range and the load, not only the median.

    PYTHONPATH=. python benchmarks/paired_timing.py --pairs 5 --config deploy/configs/tiny.yaml --set trainer.steps=120
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("local", "ray")


def alternating_schedule(pairs: int) -> list[tuple[str, str]]:
    """Order of the two runs in each pair: local first in even pairs, ray first in odd ones."""
    return [RUNTIMES if i % 2 == 0 else RUNTIMES[::-1] for i in range(pairs)]


def summarize_pairs(walls: list[dict[str, float]]) -> dict:
    """``[{"local": s, "ray": s}, ...]`` → per-pair ratios ray/local, their median, min, max and the win count."""
    if len(walls) < 1:
        raise ValueError("no pairs to summarise")
    ratios = [w["ray"] / w["local"] for w in walls]
    return {"pairs": len(walls), "ratios": ratios, "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
            "max_ratio": max(ratios), "ray_faster": sum(r < 1 for r in ratios), "local_faster": sum(r > 1 for r in ratios),
            "median_local_s": statistics.median(w["local"] for w in walls),
            "median_ray_s": statistics.median(w["ray"] for w in walls)}


def timed_run(runtime: str, config: str, overrides: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", config, "--output-dir", str(out),
           *(a for s in overrides for a in ("--set", s)), *(["--local"] if runtime == "local" else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)  # ray: the embedded local cluster, as `make demo-hue` runs it
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        said = [line for line in proc.stderr.splitlines() if line.startswith("drpo: error")] or proc.stderr.splitlines()[-3:]
        raise SystemExit(f"{runtime} run failed (exit {proc.returncode}): {' / '.join(said)}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deploy/configs/tiny.yaml")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.pairs < 5:
        ap.error("--pairs must be >= 5 (a timing comparison needs at least five paired runs)")
    work = Path(tempfile.mkdtemp(prefix="drpo-paired-"))
    walls: list[dict[str, float]] = []
    for i, order in enumerate(alternating_schedule(args.pairs)):
        pair = {runtime: timed_run(runtime, args.config, args.overrides, work / f"pair{i}-{runtime}") for runtime in order}
        walls.append(pair)
        print(f"pair {i + 1} ({order[0]} first): local {pair['local']:.1f} s, ray {pair['ray']:.1f} s, "
              f"ratio {pair['ray'] / pair['local']:.3f}", flush=True)
    s = summarize_pairs(walls)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.pairs} alternating pairs of `drpo train` ({args.config} {' '.join(args.overrides)}), "
          f"{os.cpu_count()} CPUs, load average at the end {load:.1f}\n")
    print("| pairs | median wall local | median wall ray | ray/local: median (min – max) | pairs ray faster / local faster |")
    print("|---|---|---|---|---|")
    print(f"| {s['pairs']} | {s['median_local_s']:.1f} s | {s['median_ray_s']:.1f} s | {s['median_ratio']:.3f} "
          f"({s['min_ratio']:.3f} – {s['max_ratio']:.3f}) | {s['ray_faster']} / {s['local_faster']} |")
    if args.json:
        args.json.write_text(json.dumps({"walls": walls, **s}, indent=2))


if __name__ == "__main__":
    main()

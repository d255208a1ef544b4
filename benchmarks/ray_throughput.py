"""Throughput of the Ray runtime vs the single-process trainer on the same config (candidates per second).

Runs ``--steps`` steps of each variant in this process (the local trainer with torch's default threads;
the Ray runtime on an embedded local cluster, one thread per actor as Ray sets it) and reports the
steady-state rate (median step time after ``--warmup`` steps), the wall time including start-up, and the
overhead fraction 1 − rate(Ray) / rate(local). Numbers go to docs/ray.md; nothing here is a test.

    .venv/bin/python benchmarks/ray_throughput.py --config deploy/configs/tiny.yaml --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DRPO_CACHE", str(ROOT / ".cache" / "drpo"))

VARIANTS = {  # name -> runtime overrides (an int = the single-process trainer with that many torch threads)
    "local (DrpoTrainer), torch default threads": 0,
    "local (DrpoTrainer), 1 thread": 1,
    "ray, max_staleness 0 (synchronous)": ["runtime.max_staleness=0"],
    "ray, max_staleness 1 (overlapped)": ["runtime.max_staleness=1"],
    "ray, max_staleness 1, 2 generators": ["runtime.max_staleness=1", "runtime.generator.replicas=2",
                                           "runtime.generator.num_cpus=0.3"],
}


def measure_local(cfg, steps: int, threads: int) -> dict:
    import torch

    from drpo_core.training.trainer import DrpoTrainer

    default = torch.get_num_threads()
    torch.set_num_threads(threads or default)
    try:
        return _measure_local(cfg, steps, DrpoTrainer)
    finally:
        torch.set_num_threads(default)


def _measure_local(cfg, steps: int, DrpoTrainer) -> dict:
    t0 = time.perf_counter()
    trainer = DrpoTrainer(cfg, output_dir=Path(tempfile.mkdtemp(prefix="bench-local-")))
    start = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return {"start_s": start, "step_times": times}


def measure_ray(cfg, steps: int) -> dict:
    from services.controller import Controller
    from services.runtime import RayRuntime

    t0 = time.perf_counter()
    rt = RayRuntime.start(cfg, Path(tempfile.mkdtemp(prefix="bench-ray-")))
    try:
        controller = Controller(cfg, rt)
        controller.restore()
        start = time.perf_counter() - t0
        times, rows = [], []
        for _ in range(steps):
            t = time.perf_counter()
            rows.append(controller.train_step())
            times.append(time.perf_counter() - t)
    finally:
        rt.shutdown()
    keys = ("timing/wait_groups_s", "timing/wait_update_s", "timing/generate_s", "timing/score_s", "timing/update_s",
            "timing/publish_s", "timing/weights_sync_s", "lag/mean")
    return {"start_s": start, "step_times": times, "stages": {k: statistics.median(r[k] for r in rows) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="deploy/configs/tiny.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from drpo_core.config import load_config
    from services.runtime import connect

    base = load_config([args.config], args.overrides)
    candidates = base.trainer.prompts_per_step * base.algo.num_candidates
    connect(base)
    results = {}
    try:
        for name, overrides in VARIANTS.items():
            local = isinstance(overrides, int)
            cfg = load_config([args.config], [*args.overrides, *([] if local else overrides)])
            r = measure_local(cfg, args.steps, overrides) if local else measure_ray(cfg, args.steps)
            steady = statistics.median(r["step_times"][args.warmup:])
            r.update(rate=candidates / steady, median_step_s=steady, wall_s=r["start_s"] + sum(r["step_times"]))
            results[name] = r
            print(f"{name}: {r['rate']:.1f} candidates/s (median step {steady:.3f}s, start {r['start_s']:.1f}s)", flush=True)
    finally:
        ray.shutdown()
    local = max((r for n, r in results.items() if n.startswith("local")), key=lambda r: r["rate"])  # the faster local
    print(f"\n{args.steps} steps of {args.config} ({candidates} candidates/step), {os.cpu_count()} CPUs, "
          f"median step after {args.warmup} warm-up steps\n")
    print("| runtime | candidates/s | median step | start-up | wall (start + steps) | overhead vs local |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        overhead = 1 - r["rate"] / local["rate"]
        print(f"| {name} | {r['rate']:.1f} | {r['median_step_s']:.3f} s | {r['start_s']:.1f} s | {r['wall_s']:.1f} s | "
              f"{'—' if r is local else f'{overhead:+.0%}'} |")
    print("\n(overhead = 1 − rate / rate of the faster local variant; negative = faster than local)")
    print("\nmedian per-step stage times of the Ray variants (s):")
    for name, r in results.items():
        if "stages" in r:
            print(f"  {name}: " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in r["stages"].items()))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

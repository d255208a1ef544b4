"""Throughput of the Ray runtime vs the single-process trainer on the same config (candidates per second).

Runs ``--steps`` steps of each variant in this process (the local trainer with torch's default threads;
the Ray runtime on an embedded local cluster, one thread per actor as Ray sets it) and reports the
steady-state rate (median step time after ``--warmup`` steps), the wall time including start-up, and the
overhead fraction 1 − rate(Ray) / rate(local). Numbers go to docs/ray.md; nothing here is a test.

    .venv/bin/python benchmarks/ray_throughput.py --config deploy/configs/tiny.yaml --steps 30

``--cluster-nodes N --generators 1,2,4`` instead runs the Ray runtime only, on a ``ray.cluster_utils.Cluster``
(a head holding the driver, learner and reward, N worker nodes each with its own raylet and object store;
generators spread over them with ``scheduling: SPREAD``), once per generator count, ``--rounds`` times in
alternating order; the table gives the median over rounds of each run's median step.

    nice -n 15 .venv/bin/python benchmarks/ray_throughput.py --cluster-nodes 2 --generators 1,2,4 --steps 20 --rounds 2
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
    from services.runtime.controller import Controller
    from services.runtime.cluster import RayRuntime

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
    ap.add_argument("--cluster-nodes", type=int, default=0, help="run on a local multi-node Cluster with this many worker nodes")
    ap.add_argument("--generators", default="1,2,4", help="with --cluster-nodes: generator replica counts")
    ap.add_argument("--rounds", type=int, default=1, help="with --cluster-nodes: alternating repeats of the set of variants")
    ap.add_argument("--address", default=None, help="with --cluster-nodes: use this running (GPU) cluster instead of a local one")
    args = ap.parse_args()
    if args.cluster_nodes:
        return scale_generators(args)

    import ray

    from drpo_core.config import load_config
    from services.runtime.cluster import connect

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


def scale_generators(args) -> None:
    """1/2/4 generator replicas on a local multi-node cluster (see the module docstring)."""
    import ray
    from ray.cluster_utils import Cluster

    from drpo_core.config import load_config

    cluster = None if args.address else Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(0 if args.address else args.cluster_nodes):
        cluster.add_node(num_cpus=2)
    address = args.address or cluster.address
    counts = [int(x) for x in args.generators.split(",")]
    base = load_config([args.config], args.overrides)
    candidates = base.trainer.prompts_per_step * base.algo.num_candidates
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    try:
        for r in range(args.rounds):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                cfg = load_config([args.config], [*args.overrides, f"runtime.address={address}",
                                                  f"runtime.generator.replicas={n}", "runtime.generator.scheduling=SPREAD",
                                                  f"runtime.generator.num_cpus={min(0.5, 2 * args.cluster_nodes / n):g}"])
                ray.init(address=address, log_to_driver=False)
                try:
                    result = measure_ray(cfg, args.steps)
                finally:
                    ray.shutdown()
                result["median_step_s"] = statistics.median(result["step_times"][args.warmup:])
                runs[n].append(result)
                print(f"round {r + 1}, {n} generator(s): median step {result['median_step_s']:.3f}s, "
                      f"{candidates / result['median_step_s']:.1f} candidates/s, start {result['start_s']:.1f}s", flush=True)
    finally:
        if cluster is not None:
            cluster.shutdown()
    print(f"\n{args.steps} steps of {args.config} ({candidates} candidates/step), head + {args.cluster_nodes} worker nodes "
          f"on {os.cpu_count()} CPU cores, median step after {args.warmup} warm-up steps, median over {args.rounds} round(s)\n")
    print("| generators | candidates/s | median step | range of run medians | generate (per step, in actors) | wait for groups | wait for update |")
    print("|---|---|---|---|---|---|---|")
    for n, rs in runs.items():
        step = statistics.median(x["median_step_s"] for x in rs)
        stage = {k: statistics.median(x["stages"][k] for x in rs) for k in rs[0]["stages"]}
        print(f"| {n} | {candidates / step:.1f} | {step:.3f} s | {min(x['median_step_s'] for x in rs):.3f}–"
              f"{max(x['median_step_s'] for x in rs):.3f} s | {stage['timing/generate_s']:.2f} s | "
              f"{stage['timing/wait_groups_s']:.2f} s | {stage['timing/wait_update_s']:.2f} s |")
    if args.json:
        args.json.write_text(json.dumps({str(n): rs for n, rs in runs.items()}, indent=2))


if __name__ == "__main__":
    main()

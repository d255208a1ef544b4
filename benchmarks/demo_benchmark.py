"""The demo's acceptance benchmark: default job vs a shuffled-reward control, on 2 CPU cores.

Runs `drpo train --local` twice with the same seed and config — once as shipped, once with each prompt
group's scores shuffled before ranking (`algo.shuffle_rewards=true`) — then reads each run's eval.json
(held-out prompts × held-out seeds, base vs final policy, paired) and prints the table for the README.

Every ± in the per-run table is a prompt-clustered (CR1) standard error: held-out seeds are nested in
prompts, so the clusters are the prompts (``n_prompts`` of them), not the prompt × seed cells. With
``--train-seeds N`` both runs are repeated for N training seeds (trainer.seed = seed, seed+1, ...) and a
second table gives, per run kind, the gain's mean ± sample std over the seeds (min–max): the spread a
reader should expect from retraining, which a single run's standard error does not contain.

    .venv/bin/python benchmarks/demo_benchmark.py [--config deploy/configs/tiny.yaml] [--out runs/bench] [--train-seeds 3]
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
sys.path.insert(0, str(ROOT))

from drpo_core.training.statistics import spread_over_runs  # noqa: E402


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
            f"{o['policy_mean']:.4f} ± {o['policy_se']:.4f} | {o['gain']:+.4f} ± {o['gain_se']:.4f} ({o['z']:.1f} s.e., "
            f"{o['n_prompts']} prompt clusters, n={o['n']}) | {per} |")


def over_seeds(runs: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """``{seed: {run kind: result}}`` → per run kind: spread_over_runs of the gain, base and final reward,
    and the largest single-run clustered s.e. (to compare the within-run and the between-seed uncertainty)."""
    kinds = sorted({k for by_kind in runs.values() for k in by_kind}, key=lambda k: (k != "default", k))
    out = {}
    for kind in kinds:
        results = [runs[seed][kind]["overall"] for seed in sorted(runs) if kind in runs[seed]]
        out[kind] = {"gain": spread_over_runs([o["gain"] for o in results]),
                     "base_mean": spread_over_runs([o["base_mean"] for o in results]),
                     "policy_mean": spread_over_runs([o["policy_mean"] for o in results]),
                     "max_gain_se": max(o["gain_se"] for o in results), "seeds": sorted(runs)}
    return out


def seed_table(summary: dict[str, dict]) -> list[str]:
    lines = ["| run | training seeds | final reward (mean over seeds) | paired gain: mean ± std over seeds (min – max) | "
             "largest single-run clustered s.e. |", "|---|---|---|---|---|"]
    for kind, s in summary.items():
        g = s["gain"]
        std = f"{g['std']:.4f}" if g["n"] > 1 else "n/a"
        lines.append(f"| {kind} | {g['n']} ({', '.join(map(str, s['seeds']))}) | {s['policy_mean']['mean']:.4f} | "
                     f"{g['mean']:+.4f} ± {std} ({g['min']:+.4f} – {g['max']:+.4f}) | {s['max_gain_se']:.4f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="deploy/configs/tiny.yaml")
    ap.add_argument("--out", default=f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    ap.add_argument("--skip-control", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    ap.add_argument("--train-seeds", type=int, default=1, help="repeat both runs for this many training seeds")
    ap.add_argument("--first-seed", type=int, default=42, help="trainer.seed of the first repetition")
    args = ap.parse_args()
    if args.train_seeds < 1:
        ap.error("--train-seeds must be >= 1")
    out = Path(args.out)
    extra = [a for s in args.set for a in ("--set", s)]
    runs: dict[int, dict[str, dict]] = {}
    for seed in range(args.first_seed, args.first_seed + args.train_seeds):
        where = out if args.train_seeds == 1 else out / f"seed_{seed}"
        with_seed = [*extra, "--set", f"trainer.seed={seed}"]
        runs[seed] = {"default": run(args.config, where / "default", with_seed)}
        if not args.skip_control:
            runs[seed]["shuffled control"] = run(args.config, where / "control", [*with_seed, "--set", "algo.shuffle_rewards=true"])
    summary = over_seeds(runs)
    (out / "benchmark.json").write_text(json.dumps({"runs": {str(k): v for k, v in runs.items()}, "over_seeds": summary}, indent=2))
    print("| run | seed | steps | wall | base reward | final reward | paired gain ± prompt-clustered s.e. | per colour (base→final) |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, by_kind in runs.items():
        for name, r in by_kind.items():
            print(row(name, r).replace(f"| {name} |", f"| {name} | {seed} |", 1))
    if args.train_seeds > 1:
        print()
        print("\n".join(seed_table(summary)))
    print(f"\nresults: {out / 'benchmark.json'}")


if __name__ == "__main__":
    main()

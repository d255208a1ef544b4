"""The comparison table: base, DrPO and each baseline at the same candidate budget, over training seeds.

    python benchmarks/compare_methods.py --out runs/compare                      # tiny default, 3 seeds
    python benchmarks/compare_methods.py --config deploy/configs/tiny.yaml --methods drpo dpo grpo raft draft \\
        --seeds 3 --steps 400 --eval-seeds 16 --out runs/compare

Every method trains with the same generator, LoRA, prompts, K, prompts per step, steps and learning rate
(the config's; ``--set`` changes them for all), i.e. the same number of sampled candidates; only
``algo.kind`` differs. DRaFT needs a differentiable reward: it trains on ``--draft-reward`` (default
soft_hue, the smooth version of the hue fraction) while every method is *evaluated* with the config's
first reward. After training, each run is scored on the held-out prompts × ``--eval-seeds`` seeds, paired
with the frozen base on the same (prompt, seed) cells:

    gain       policy − base reward; mean over prompts × eval seeds × training seeds, ± prompt-clustered
               (CR1) standard error (eval seeds and training seeds nested in prompts); also the spread of
               the per-run gains over training seeds
    distance   ‖φ(x_policy) − φ(x_base)‖ / √dim on the same noises (φ = the config's frozen feature encoder,
               mean over its keys), mean ± prompt-clustered SE: how far the method moved from the base
    diversity  mean pairwise per-pixel RMS distance between a prompt's images across eval seeds (base: same
               prompts and seeds)

Writes ``table.md``, ``results.json`` and ``reward_vs_distance.png`` (one point per run) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from drpo_core.config import load_config  # noqa: E402
from drpo_core.training.evaluation import diversity, heldout_seeds, paired_gain, reward_table  # noqa: E402
from drpo_core.training.prompts import heldout_prompts, training_prompts  # noqa: E402
from drpo_core.training.statistics import clustered_mean, spread_over_runs  # noqa: E402

METHODS = ["drpo", "draft", "dpo", "grpo", "raft"]


@torch.no_grad()
def feature_distance(generator, encoder, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """`[P, S]` table of ‖φ(G_θ(ε_s, c_p)) − φ(G_base(ε_s, c_p))‖ / √dim, averaged over φ's keys."""
    rows = []
    for p in prompts:
        policy = generator.generate([p] * len(seeds), seeds)[0]
        base = generator.generate([p] * len(seeds), seeds, base=True)[0]
        fp, fb = encoder(policy), encoder(base)
        per_key = [(fp[k] - fb[k]).flatten(1).norm(dim=1) / math.sqrt(fp[k][0].numel()) for k in fp]
        rows.append(torch.stack(per_key).mean(0).cpu())
    return torch.stack(rows)


def train_and_evaluate(cfg, method: str, seed: int, out: Path, eval_prompts: list[str], eval_seeds: list[int],
                       task_reward) -> dict:
    from drpo_core.training.trainer import DrpoTrainer

    run = DrpoTrainer(cfg, output_dir=out / f"{method}_seed{seed}")
    run.run()
    gen = run.generator
    base = reward_table(gen, task_reward, eval_prompts, eval_seeds, base=True)
    policy = reward_table(gen, task_reward, eval_prompts, eval_seeds, base=False)
    dist = feature_distance(gen, run.encoder, eval_prompts, eval_seeds)
    shown = eval_prompts[:4]
    div = {side: sum(diversity(gen, p, eval_seeds, base=side == "base") for p in shown) / len(shown) for side in ("base", "policy")}
    return {"method": method, "seed": seed, "base": base, "policy": policy, "distance": dist, "diversity": div,
            "gain": paired_gain(base, policy).gain}


def summarise(runs: list[dict]) -> dict:
    """Pool one method's runs: cells (prompt, eval seed, training seed), clustered by prompt."""
    base = torch.cat([r["base"] for r in runs], dim=1)
    policy = torch.cat([r["policy"] for r in runs], dim=1)
    gain = paired_gain(base, policy)
    dist = clustered_mean(torch.cat([r["distance"] for r in runs], dim=1))
    return {"gain": gain.gain, "gain_se": gain.gain_se, "policy_mean": gain.policy_mean, "base_mean": gain.base_mean,
            "distance": dist.mean, "distance_se": dist.se, "diversity": sum(r["diversity"]["policy"] for r in runs) / len(runs),
            "base_diversity": sum(r["diversity"]["base"] for r in runs) / len(runs),
            "gain_over_seeds": spread_over_runs([r["gain"] for r in runs]), "n_prompts": gain.n_prompts, "n_cells": gain.n}


def fmt(x: float, se: float | None = None) -> str:
    return f"{x:+.4f}" + (f" ± {se:.4f}" if se is not None and se == se else "")


def table(summary: dict[str, dict], header: str) -> str:
    first = next(iter(summary.values()))
    lines = [header, "", "| method | reward | gain ± SE (prompt-clustered) | gain over training seeds (mean, min..max) | "
             "distance to base ± SE | diversity |", "|---|---|---|---|---|---|",
             f"| base | {first['base_mean']:.4f} | 0 | | 0 | {first['base_diversity']:.4f} |"]
    for method, s in summary.items():
        spread = s["gain_over_seeds"]
        lines.append(f"| {method} | {s['policy_mean']:.4f} | {fmt(s['gain'], s['gain_se'])} | {spread['mean']:+.4f} "
                     f"({spread['min']:+.4f}..{spread['max']:+.4f}, n={spread['n']}) | {s['distance']:.4f} ± {s['distance_se']:.4f} | "
                     f"{s['diversity']:.4f} |")
    return "\n".join(lines)


def plot(runs: list[dict], summary: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, s) in enumerate(summary.items()):
        mine = [r for r in runs if r["method"] == method]
        c = colors[i % len(colors)]
        ax.scatter([float(r["distance"].nanmean()) for r in mine], [r["gain"] for r in mine], color=c, alpha=0.5, s=18)
        ax.errorbar(s["distance"], s["gain"], xerr=s["distance_se"], yerr=s["gain_se"], fmt="o", color=c, label=method, capsize=3)
    ax.scatter([0], [0], marker="*", color="black", s=80, label="base")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("feature distance to base (same noises)")
    ax.set_ylabel("held-out reward gain over base")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deploy/configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every method, e.g. trainer.lr=1e-2")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--draft-reward", default="soft_hue", help="the differentiable reward DRaFT trains on")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    from drpo_core.rewards import build_reward

    common = [*args.overrides, "trainer.heldout_eval_seeds=0", "trainer.sample_every=1000000"]
    if args.steps is not None:
        common.append(f"trainer.steps={args.steps}")
    base_cfg = load_config([args.config], common)
    task_reward = build_reward(base_cfg.rewards[0])
    eval_prompts = heldout_prompts(base_cfg.prompts) if not base_cfg.prompts.file else training_prompts(base_cfg.prompts)
    eval_seeds = heldout_seeds(args.eval_seeds, "compare")
    runs = []
    for method in args.methods:
        for seed in range(args.seeds):
            extra = [f"algo.kind={method}", f"trainer.seed={base_cfg.trainer.seed + seed}"]
            if method == "draft":
                extra.append(f"rewards=[{{kind: {args.draft_reward}}}]")
            cfg = load_config([args.config], [*common, *extra])
            runs.append(train_and_evaluate(cfg, method, seed, args.out, eval_prompts, eval_seeds, task_reward))
    summary = {m: summarise([r for r in runs if r["method"] == m]) for m in args.methods}
    t = base_cfg.trainer
    header = (f"{args.config}: {t.steps} steps × {t.prompts_per_step} prompts × K={base_cfg.algo.num_candidates} candidates "
              f"(the same for every method), lr {t.lr}, {args.seeds} training seeds; evaluated with "
              f"{base_cfg.rewards[0].label} on {len(eval_prompts)} held-out prompts × {args.eval_seeds} seeds"
              + (f"; DRaFT trains on {args.draft_reward}" if "draft" in args.methods else ""))
    md = table(summary, header)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "summary": summary, "runs": [
        {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in runs]}, indent=1))
    plot(runs, summary, args.out / "reward_vs_distance.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()

"""The comparison table: base, DrPO and each baseline at the same candidate budget, over training seeds.

    python benchmarks/compare_methods.py --out runs/compare                      # tiny default, 3 seeds
    python benchmarks/compare_methods.py --methods drpo draft dpo grpo raft --lr-grid 3e-3 1e-2 3e-2 \
        --sweep-steps 100 --steps 100 --first-seed 1 --seeds 3 --out runs/compare  # per-method lr, then the table

Every method trains with the same generator, LoRA, prompts, K, prompts per step and steps (``--set`` changes
them for all; ``--method-set METHOD:key=value`` for one method), i.e. the same number of sampled
candidates; only ``algo.kind`` (and, with ``--lr-grid``, the learning rate) differs. DRaFT needs a
differentiable reward: it trains on ``--draft-reward`` (default soft_hue, the smooth version of the hue
fraction) while every method is *evaluated* with the config's first reward.

``--lr-grid``: each method first trains once per grid value (training seed index 0, ``--sweep-steps``) and
is scored on the *training* prompts × ``--sweep-eval-seeds`` validation seeds (never the held-out prompts
of the table); each method's best validation gain picks its lr (``sweep.md``). The table's runs then use
seed indices ``--first-seed`` .. + ``--seeds`` − 1 (start at 1 to keep the selection seed out of the table).

After training, each run is scored on the held-out prompts × ``--eval-seeds`` seeds, paired with the
frozen base on the same (prompt, seed) cells:

    gain       policy − base reward; mean over prompts × eval seeds × training seeds, ± prompt-clustered
               (CR1) standard error (eval seeds and training seeds nested in prompts); also the spread of
               the per-run gains over training seeds
    distance   ‖φ(x_policy) − φ(x_base)‖ / √dim on the same noises (φ = the config's frozen feature encoder,
               mean over its keys), mean ± prompt-clustered SE: how far the method moved from the base
    diversity  mean pairwise per-pixel RMS distance between a prompt's images across eval seeds (base: same
               prompts and seeds)

Nothing computed is lost: each finished run is kept under ``--out`` (``results/``, ``sweep/results/``) and
reused by any later call with the same settings; an interrupted run resumes from its newest checkpoint.
So several processes may split one study (``--methods``, ``--first-seed``/``--seeds``, ``--seeds 0`` = sweep
only) and a last call with every method writes the whole table from what they saved.
Writes ``table.md``, ``results.json`` and ``reward_vs_distance.png`` (one point per run) under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
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


def versus_first(runs: list[dict], methods: list[str]) -> dict[str, dict]:
    """first method − each other method, policy reward on the same held-out (prompt, eval seed) cells, the i-th
    training run of one paired with the i-th of the other; mean ± prompt-clustered SE."""
    mine = {m: [r for r in runs if r["method"] == m] for m in methods}
    out = {}
    for m in methods[1:]:
        n = min(len(mine[methods[0]]), len(mine[m]))
        diff = torch.cat([a["policy"] - b["policy"] for a, b in zip(mine[methods[0]][:n], mine[m][:n])], dim=1)
        c = clustered_mean(diff)
        out[m] = {"mean": c.mean, "se": c.se}
    return out


def fmt(x: float, se: float | None = None) -> str:
    return f"{x:+.4f}" + (f" ± {se:.4f}" if se is not None and se == se else "")


def table(summary: dict[str, dict], header: str) -> str:
    first = next(iter(summary.values()))
    name = next(iter(summary))
    lines = [header, "", "| method | lr | reward | gain ± SE (prompt-clustered) | gain over training seeds (mean, min..max) | "
             f"distance to base ± SE | diversity | {name} − method ± SE (same cells) |", "|---|---|---|---|---|---|---|---|",
             f"| base | | {first['base_mean']:.4f} | 0 | | 0 | {first['base_diversity']:.4f} | {fmt(first['gain'], first['gain_se'])} |"]
    for method, s in summary.items():
        vs = fmt(s["versus_first"]["mean"], s["versus_first"]["se"]) if "versus_first" in s else ""
        spread = s["gain_over_seeds"]
        lr = " ".join(f"{x:g}" for x in s.get("lr", []))
        lines.append(f"| {method} | {lr} | {s['policy_mean']:.4f} | {fmt(s['gain'], s['gain_se'])} | {spread['mean']:+.4f} "
                     f"({spread['min']:+.4f}..{spread['max']:+.4f}, n={spread['n']}) | {s['distance']:.4f} ± {s['distance_se']:.4f} | "
                     f"{s['diversity']:.4f} | {vs} |")
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


def parse_method_sets(items: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``METHOD:key=value`` → {method: [key=value, ...]}; an unknown method or a missing ``:`` exits 2."""
    per: dict[str, list[str]] = {m: [] for m in methods}
    for item in items:
        method, sep, assignment = item.partition(":")
        if not sep or "=" not in assignment:
            raise SystemExit(usage_error(f"--method-set {item!r}: expected METHOD:key=value"))
        if method not in per:
            raise SystemExit(usage_error(f"--method-set {item!r}: {method!r} is not one of --methods {' '.join(methods)}"))
        per[method].append(assignment)
    return per


def usage_error(message: str) -> int:
    print(f"compare_methods: {message}", file=sys.stderr)
    return 2


class Study:
    """Runs (or reloads) one training run per (method, seed, overrides) and evaluates it on one prompt set.

    Every finished run is saved as ``results/<tag>.pt``; the tag hashes everything that decides the run
    (config file, overrides, evaluation prompts and seeds), so a rerun with the same arguments reloads it
    and a run interrupted mid-training resumes from its newest checkpoint in ``runs/<tag>``.
    """

    def __init__(self, config: str, common: list[str], out: Path, eval_prompts: list[str], eval_seeds: list[int], task_reward):
        self.config, self.common, self.out = config, common, out
        self.eval_prompts, self.eval_seeds, self.task_reward = eval_prompts, eval_seeds, task_reward

    def tag(self, method: str, seed: int, overrides: list[str]) -> str:
        key = json.dumps([self.config, self.common, overrides, self.eval_prompts, self.eval_seeds])
        return f"{method}_seed{seed}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def run(self, method: str, seed: int, overrides: list[str], only_finished: bool = False) -> dict | None:
        tag = self.tag(method, seed, overrides)
        saved = self.out / "results" / f"{tag}.pt"
        if saved.is_file():
            print(f"[compare] reusing {saved}", flush=True)
            return torch.load(saved, weights_only=True)  # our own result dict: tensors, numbers, strings
        if only_finished:
            print(f"[compare] not finished, left out: {tag} ({' '.join(overrides)})", flush=True)
            return None
        from drpo_core.training.checkpoint import latest_checkpoint
        from drpo_core.training.trainer import DrpoTrainer

        cfg = load_config([self.config], [*self.common, *overrides])
        run_dir = self.out / "runs" / tag
        resume = latest_checkpoint(run_dir)
        print(f"[compare] {tag}: {' '.join(overrides)}" + (f" (resuming {resume})" if resume else ""), flush=True)
        start = time.process_time()
        trainer = DrpoTrainer(cfg, output_dir=run_dir)
        trainer.run(resume=resume)
        result = evaluate_run(trainer, self.eval_prompts, self.eval_seeds, self.task_reward)
        result.update(method=method, seed=seed, overrides=overrides, lr=cfg.trainer.lr, steps=cfg.trainer.steps,
                      cpu_s=time.process_time() - start, prompts=list(self.eval_prompts))
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, saved.with_suffix(".tmp"))
        saved.with_suffix(".tmp").replace(saved)  # atomic: a killed process never leaves a half-written result
        return result


def evaluate_run(trainer, eval_prompts: list[str], eval_seeds: list[int], task_reward) -> dict:
    gen = trainer.generator
    base = reward_table(gen, task_reward, eval_prompts, eval_seeds, base=True)
    policy = reward_table(gen, task_reward, eval_prompts, eval_seeds, base=False)
    dist = feature_distance(gen, trainer.encoder, eval_prompts, eval_seeds)
    shown = eval_prompts[:4]
    div = {side: sum(diversity(gen, p, eval_seeds, base=side == "base") for p in shown) / len(shown) for side in ("base", "policy")}
    return {"base": base, "policy": policy, "distance": dist, "diversity": div, "gain": paired_gain(base, policy).gain}


def method_overrides(method: str, seed_offset: int, base_seed: int, draft_reward: str, extra: list[str]) -> list[str]:
    out = [f"algo.kind={method}", f"trainer.seed={base_seed + seed_offset}"]
    if method == "draft":
        out.append(f"rewards=[{{kind: {draft_reward}}}]")
    return [*out, *extra]


def sweep_lr(args, base_cfg, per_method: dict[str, list[str]], task_reward, grids: dict[str, list[float]]) -> dict[str, float]:
    """Each method at each ``--lr-grid`` value, training seed 0, ``--sweep-steps`` steps, scored on the
    *training* prompts with validation seeds (never the held-out prompts of the table); best gain wins."""
    prompts = training_prompts(base_cfg.prompts)
    every = sorted({lr for g in grids.values() for lr in g})
    study = Study(args.config, args.common_sweep, args.out / "sweep", prompts, heldout_seeds(args.sweep_eval_seeds, "compare-val"),
                  task_reward)
    lines = [f"lr sweep: {args.sweep_steps} steps, training seed {base_cfg.trainer.seed}, scored on the {len(prompts)} training "
             f"prompts × {args.sweep_eval_seeds} validation seeds (gain ± prompt-clustered SE; distance to base)", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in every) + " | chosen |",
             "|---|" + "---|" * (len(every) + 1)]
    chosen = {}
    for method in [m for m in args.methods if grids[m]]:
        cells = []
        for lr in grids[method]:
            r = study.run(method, 0, method_overrides(method, 0, base_cfg.trainer.seed, args.draft_reward,
                                                      [*per_method[method], f"trainer.lr={lr}"]), args.only_finished)
            if r is None:
                continue
            g = paired_gain(r["base"], r["policy"])
            cells.append((g.gain, lr, f"{g.gain:+.4f} ± {g.gain_se:.4f}, d {float(r['distance'].nanmean()):.3f}"))
        if not cells:
            continue
        chosen[method] = max(cells, key=lambda c: (c[0], -c[1]))[1]  # a tie goes to the smaller lr
        shown = {lr: text for _, lr, text in cells}
        lines.append(f"| {method} | " + " | ".join(shown.get(lr, "not run") for lr in every) + f" | {chosen[method]:g} |")
    md = "\n".join(lines)
    (args.out / "sweep.md").write_text(md + "\n")
    print(md, flush=True)
    return chosen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deploy/configs/tiny.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override for every method, e.g. trainer.lr=1e-2")
    parser.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="override for one method only, e.g. dpo:trainer.lr=1e-3 (after --set and the swept lr)")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per method (0: only the lr sweep)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="train seeds first..first+seeds-1 only (split one study over processes sharing --out; "
                             "a last run with --first-seed 0 reuses every finished run and writes the whole table)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--eval-seeds", type=int, default=16)
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None,
                        help="sweep trainer.lr per method first (training seed 0, --sweep-steps, training prompts) and use each method's best")
    parser.add_argument("--method-lr-grid", action="append", default=[], metavar="METHOD:LR,LR,...",
                        help="this method's own grid instead of --lr-grid, e.g. dpo:3e-3,1e-2,3e-2")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps of a sweep run (default: --steps)")
    parser.add_argument("--sweep-eval-seeds", type=int, default=8, help="validation seeds per training prompt in the sweep")
    parser.add_argument("--only-finished", action="store_true",
                        help="train nothing: write the table from the runs already finished under --out (n per method shown)")
    parser.add_argument("--draft-reward", default="soft_hue", help="the differentiable reward DRaFT trains on")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args(argv)
    from drpo_core.config import ConfigError
    from drpo_core.rewards import build_reward

    per_method = parse_method_sets(args.method_set, args.methods)
    common = [*args.overrides, "trainer.heldout_eval_seeds=0", "trainer.sample_every=1000000"]
    sweep_steps = args.sweep_steps or args.steps
    args.common_sweep = [*common, f"trainer.steps={sweep_steps}"] if sweep_steps else list(common)
    if args.steps is not None:
        common.append(f"trainer.steps={args.steps}")
    try:
        base_cfg = load_config([args.config], common)
        for method in args.methods:  # every method's config is checked before anything trains
            load_config([args.config], [*common, *method_overrides(method, 0, base_cfg.trainer.seed, args.draft_reward, per_method[method])])
    except ConfigError as e:
        raise SystemExit(usage_error(str(e))) from None
    task_reward = build_reward(base_cfg.rewards[0])
    args.out.mkdir(parents=True, exist_ok=True)
    grids = {m: list(args.lr_grid or []) for m in args.methods}
    for item in args.method_lr_grid:
        method, _, values = item.partition(":")
        try:
            grids[method] = [float(v) for v in values.split(",")]
        except ValueError:
            raise SystemExit(usage_error(f"--method-lr-grid {item!r}: expected METHOD:LR,LR,...")) from None
        if method not in args.methods:
            raise SystemExit(usage_error(f"--method-lr-grid {item!r}: {method!r} is not one of --methods {' '.join(args.methods)}"))
    lrs = sweep_lr(args, base_cfg, per_method, task_reward, grids) if any(grids.values()) else {}
    if args.seeds == 0:  # a sweep-only worker
        return {}
    eval_prompts = heldout_prompts(base_cfg.prompts) if not base_cfg.prompts.file else training_prompts(base_cfg.prompts)
    study = Study(args.config, common, args.out, eval_prompts, heldout_seeds(args.eval_seeds, "compare"), task_reward)
    runs = []
    for method in args.methods:
        if grids[method] and method not in lrs:
            continue  # --only-finished and no sweep run of this method finished
        lr = [f"trainer.lr={lrs[method]}"] if method in lrs else []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            r = study.run(method, seed, method_overrides(method, seed, base_cfg.trainer.seed, args.draft_reward,
                                                         [*lr, *per_method[method]]), args.only_finished)
            if r is not None:
                runs.append(r)
    done = [m for m in args.methods if any(r["method"] == m for r in runs)]
    if not done:
        raise SystemExit(usage_error(f"no finished run under {args.out} for these settings"))
    summary = {m: summarise([r for r in runs if r["method"] == m]) for m in done}
    for m, s in summary.items():
        s["lr"] = sorted({r["lr"] for r in runs if r["method"] == m})
    for m, v in versus_first(runs, done).items():
        summary[m]["versus_first"] = v
    t = base_cfg.trainer
    lr_text = ("lr per method from the sweep (sweep.md)" if lrs else f"lr {t.lr}") + (
        "; per-method overrides: " + "; ".join(f"{m}: {' '.join(v)}" for m, v in per_method.items() if v)
        if any(per_method.values()) else "")
    header = (f"{args.config}: {t.steps} steps × {t.prompts_per_step} prompts × K={base_cfg.algo.num_candidates} candidates "
              f"(the same for every method), {lr_text}, {'up to ' if args.only_finished else ''}{args.seeds} training seeds (seed indices {args.first_seed}..{args.first_seed + args.seeds - 1}); evaluated with "
              f"{base_cfg.rewards[0].label} on {len(eval_prompts)} held-out prompts × {args.eval_seeds} seeds"
              + (f"; DRaFT trains on {args.draft_reward}" if "draft" in args.methods else ""))
    md = table(summary, header)
    (args.out / "table.md").write_text(md + "\n")
    (args.out / "results.json").write_text(json.dumps({"header": header, "lr": lrs, "summary": summary, "runs": [
        {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in runs]}, indent=1))
    plot(runs, summary, args.out / "reward_vs_distance.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()

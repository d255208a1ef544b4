"""Where a shapes-world demo step's time goes: seconds per step by stage, and `drpo eval`'s time.

Builds the demo job (`deploy/configs/toy.yaml`) in-process and runs ``--steps`` training steps (after one warm-up
step), timing each stage by wrapping the trainer's own functions:

* **sampling** — ``DrpoTrainer.collect`` minus the time spent waiting for scores (UNet of the policy and of the
  frozen base, VAE decode, uint8 images),
* **scoring** — ``RewardScorer.score`` (detector + GenEval rules of both rewards), as seen by the training thread,
* **φ** — the scene encoder calls of the learner (``learner._phi``: regressed points, anchors, reference),
* **update** — ``DrpoLearner.update`` minus φ and EMA (UNet forward with grad, drift, backward, AdamW),
* **EMA** — ``TrainableEMA.step``,

then (unless ``--eval-seeds 0``) times ``drpo eval --base`` on the held-out prompts, in-process
(``write_eval``, as the CLI runs it, without start-up).

``--dump FILE`` also writes what must not change when the code is made faster: every step's metrics, every
group's latents, images, rewards and scores, the final trainable weights and their moving average, and the eval
tables; ``--compare A B`` checks two dumps for bit-identity (``torch.equal`` on every tensor, ``==`` on every
metric except the ``time/*`` ones).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/toy_step_profile.py [--steps 30] [--eval-seeds 64] [--dump f.pt]
    PYTHONPATH=. python benchmarks/toy_step_profile.py --compare before.pt after.pt
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

STAGES = ("sampling", "scoring", "phi", "update", "ema")


class Clock:
    """Seconds accumulated per stage by wrapping callables: wall seconds, and CPU seconds of the process (on a
    machine shared with other work, CPU seconds say how much work a stage is; wall seconds include waiting)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c0
        return timed


def profile_training(steps: int, overrides: list[str], dump: dict | None = None) -> dict[str, float]:
    from drpo_core.config import load_config
    from drpo_core.training import learner as learner_module
    from drpo_core.training.trainer import DrpoTrainer

    cfg = load_config([str(ROOT / "deploy/configs/toy.yaml")], [f"trainer.steps={steps + 1}", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DrpoTrainer(cfg, output_dir=Path(tmp))
    clock = Clock()
    collect = trainer.collect
    if dump is not None:
        def recording_collect(step, prompts):
            groups, stats = collect(step, prompts)
            dump["groups"].append([{"latents": g.latents.clone(), "images": g.images.clone(),
                                    "base_latents": None if g.base_latents is None else g.base_latents.clone(),
                                    "rewards": {k: v.clone() for k, v in g.rewards.items()}, "scores": g.scores.clone(),
                                    "seeds": list(g.seeds), "prompt": g.prompt} for g in groups])
            return groups, stats
        trainer.collect = recording_collect
    trainer.train_step()  # warm-up (first calls allocate; prompt embeddings get cached)
    if dump is not None:
        dump["metrics"].append(trainer_metrics(trainer, None))
    trainer.collect = clock.wrap("collect", trainer.collect)
    trainer.scorer.score = clock.wrap("scoring", trainer.scorer.score)
    trainer.learner.update = clock.wrap("learner", trainer.learner.update)
    if trainer.learner.ema is not None:
        trainer.learner.ema.step = clock.wrap("ema", trainer.learner.ema.step)
    phi = learner_module._phi
    learner_module._phi = clock.wrap("phi", phi)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            stats = trainer.train_step()
            if dump is not None:
                dump["metrics"].append(trainer_metrics(trainer, stats))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        learner_module._phi = phi
    if dump is not None:
        dump["weights"] = {k: v.clone() for k, v in trainer.generator.trainable_state_dict().items()}
        dump["ema"] = None if trainer.learner.ema is None else trainer.learner.ema.state_dict()
    out = {}
    for kind, t, whole in (("wall", clock.totals, wall), ("cpu", clock.cpu, cpu)):
        per = {"sampling": t.get("collect", 0.0) - t.get("scoring", 0.0), "scoring": t.get("scoring", 0.0),
               "phi": t.get("phi", 0.0), "update": t.get("learner", 0.0) - t.get("phi", 0.0) - t.get("ema", 0.0),
               "ema": t.get("ema", 0.0), "step": whole}
        out[kind] = {k: v / steps for k, v in per.items()}
    return out


def trainer_metrics(trainer, stats: dict | None) -> dict:
    return {k: v for k, v in (stats or {}).items() if not k.startswith("time/")}


def profile_eval(seeds: int, dump: dict | None = None) -> dict[str, float]:
    """Seconds of `drpo eval --base` and of `drpo eval --checkpoint` (here the base weights as the "policy": the
    same work, policy cells plus the base cells again for the distance to the base) on the held-out prompts."""
    from drpo_core.config import load_config
    from drpo_core.models.generator import load_generator
    from drpo_core.training.eval_suite import resolve_prompts
    from services.cli_eval import select_rewards, write_eval

    cfg = load_config([str(ROOT / "deploy/configs/toy.yaml")], [])
    generator = load_generator(cfg.model, cfg.lora)
    rewards = select_rewards(cfg, None)
    prompts = resolve_prompts(None, cfg.prompts)
    walls, records = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, base in (("base", True), ("checkpoint", False)):
            t0 = time.perf_counter()
            records[name] = write_eval(cfg, generator, rewards, prompts, list(range(seeds)), base=base,
                                       output_dir=Path(tmp) / name, source={})
            walls[name] = time.perf_counter() - t0
    if dump is not None:
        dump["eval"] = records
    return walls


def compare(a: Path, b: Path) -> int:
    """0 when every tensor and metric of two dumps is identical, else 1 (and the first differences)."""
    da, db = (torch.load(p, weights_only=True) for p in (a, b))
    problems: list[str] = []

    def same(x, y, where: str) -> None:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape and torch.equal(x, y)):
                problems.append(where)
        elif isinstance(x, dict) and isinstance(y, dict):
            if x.keys() != y.keys():
                problems.append(f"{where}: keys {sorted(set(x) ^ set(y))}")
            for k in x.keys() & y.keys():
                same(x[k], y[k], f"{where}.{k}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                problems.append(f"{where}: length {len(x)} vs {len(y)}")
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        elif isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return
        elif x != y:
            problems.append(f"{where}: {x!r} vs {y!r}")

    same(da, db, "dump")
    counts = {k: len(da.get(k) or []) for k in ("metrics", "groups")}
    if problems:
        print(f"DIFFERENT ({len(problems)}):", *problems[:20], sep="\n  ")
        return 1
    print(f"identical: {counts['metrics']} steps of metrics, {counts['groups']} steps of groups (latents, images, "
          f"rewards, scores), final weights {len(da['weights'])} tensors, EMA, eval tables: {'eval' in da}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed training steps (after one warm-up step)")
    ap.add_argument("--eval-seeds", type=int, default=64, help="seeds per held-out prompt for the eval timing (0: skip)")
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. trainer.seed=43")
    ap.add_argument("--dump", type=Path, help="write metrics, groups, weights and eval tables here (a .pt file)")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two --dump files and exit")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    torch.set_num_threads(int(__import__("os").environ.get("OMP_NUM_THREADS", "1")))
    dump = {"metrics": [], "groups": []} if args.dump else None
    per = profile_training(args.steps, args.set, dump)
    wall, cpu = per["wall"], per["cpu"]
    print(f"training, {args.steps} steps, seconds per step:   wall          CPU (process)")
    for name in (*STAGES, "step"):
        share = (lambda d: f"({100 * d[name] / d['step']:3.0f} %)" if name != "step" else "       ")
        print(f"  {name:9s}                    {wall[name]:6.3f} {share(wall)}  {cpu[name]:6.3f} {share(cpu)}")
    if args.eval_seeds:
        walls = profile_eval(args.eval_seeds, dump)
        for name, wall in walls.items():
            print(f"drpo eval --{name}, held-out prompts × {args.eval_seeds} seeds: {wall:.1f} s (in-process, no start-up)")
    if dump is not None:
        torch.save(dump, args.dump)
        print(f"wrote {args.dump}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

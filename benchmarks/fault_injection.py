"""Fault injection on a real local multi-node Ray cluster: does any fault lose or duplicate a prompt group?

A ``ray.cluster_utils.Cluster`` (a head and one worker node that holds the generators and reward replicas)
runs the tiny model for ``--steps`` synchronous steps of a small job (B = 2, K = 6; max_staleness 0,
deterministic CPU mode), scoring through a real reward server on 127.0.0.1 (benchmarks/fault_server.py). A
fault-free run gives the reference weights; then each fault runs in its own case, and finally all non-disk
faults together at steps drawn from ``--seed``:

    generator / reward replica / learner killed (ray.kill), the worker node removed (a spare joins first),
    the reward server hanging past the deadline, answering 500 / 503 / garbage / too few scores / NaN,
    dropping the connection mid-response, the checkpoint folder read-only or full (a tmpfs mounted over it;
    needs root), SIGKILL of the driver (`drpo train` joined to the cluster) followed by `drpo train --resume`.

Per case, from public outputs only (metrics.jsonl, checkpoints, exit status):

    groups lost        Σ over steps of B − (kept + skipped-with-reason), B for a step with no row
    groups duplicated  Σ over steps of max(0, groups the update saw − B)
    skipped            groups skipped by the learner, with the reason (missing scores → too_few_valid, ...)
    scores missing     candidates the reward gave no score (the group is still trained if enough remain)
    weights            = fault-free: for faults that only delay work this must hold (else counted as lost)
    extra wall s       case wall time − fault-free wall time (a loaded machine makes this an upper bound)

Exits 1 if any case lost or duplicated a group. Runtime ≈ 15 runs of the tiny job (minutes on 2 cores).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/fault_injection.py --steps 3 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from benchmarks.fault_server import FAULTS, RETRIED, FaultyRewardServer  # noqa: E402
from drpo_core.config import load_config  # noqa: E402
from drpo_core.training.reporting import read_metrics  # noqa: E402

MB = 1024 * 1024
ACTOR_FAULTS = ("kill generator", "kill reward replica", "kill learner", "kill worker node")
DISK_FAULTS = ("checkpoints read-only", "checkpoints full")
DELAY_ONLY = set(ACTOR_FAULTS) | {f"server {f}" for f in RETRIED} | {"SIGKILL driver + --resume"}


def overrides(steps: int, url: str) -> list[str]:
    return ["trainer.prompts_per_step=2", "algo.num_candidates=6", "algo.num_anchors=2", "trainer.lr=1e-2",
            f"trainer.steps={steps}", "trainer.checkpoint_every=1", "trainer.sample_every=1000",
            "trainer.heldout_eval_seeds=0", "trainer.eval_seeds=1", "runtime.max_staleness=0",
            "runtime.generator.replicas=2", "runtime.generator.num_cpus=0.2", "runtime.generator.resources={gen_node: 0.3}",
            "runtime.reward.replicas=2", "runtime.reward.num_cpus=0.1", "runtime.reward.resources={gen_node: 0.2}",
            "runtime.learner.num_cpus=0.5", "runtime.start_timeout_s=300", "runtime.request_timeout_s=90",
            "runtime.health_check_interval_s=1",
            f"rewards=[{{kind: http, name: hue_fraction, url: '{url}/score', timeout_s: 20, max_retries: 2, "
            "options: {backoff_s: 0.05, max_backoff_s: 2}}]"]


def count_groups(rows: list[dict], steps: int, B: int, stopped: bool) -> tuple[int, int, Counter, dict]:
    """Lost / duplicated groups and skip reasons from metrics.jsonl rows (a step redone after a rollback: its
    last row counts). A step with no row is B lost groups, unless the run stopped with an error (then it was
    not trained, and the error says why)."""
    last = {int(r["step"]): r for r in rows}
    lost = duplicated = 0
    skipped: Counter = Counter()
    for step in range(1, steps + 1):
        row = last.get(step)
        if row is None:
            lost += 0 if stopped else B
            continue
        reasons = {k.split("/", 1)[1]: int(v) for k, v in row.items() if k.startswith("skipped/") and v}
        skipped.update(reasons)
        lost += max(0, B - int(row["update/kept_groups"]) - sum(reasons.values()))
        duplicated += max(0, int(row["update/groups"]) - B)
    return lost, duplicated, skipped, last


class Bench:
    def __init__(self, args):
        import ray
        from ray.cluster_utils import Cluster

        from tests.reward_servers import uvicorn_server

        self.args, self.ray = args, ray
        self.cluster = Cluster(initialize_head=True, connect=True, head_node_args={
            "num_cpus": 2, "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 500, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}})
        self.worker = self.add_worker()
        self.server = FaultyRewardServer(hang_s=25.0)  # past the client's 20 s deadline
        self._serving = uvicorn_server(self.server.app)
        self.url = self._serving.__enter__()
        self.work = Path(tempfile.mkdtemp(prefix="drpo-faults-"))
        self.rows: list[dict] = []

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, resources={"gen_node": 1}, object_store_memory=80 * MB)
        self.cluster.wait_for_nodes()
        return node

    def config(self, name: str):
        return load_config([], [*overrides(self.args.steps, self.url), f"output.dir={self.work / name}"])

    # -- one in-process run with injections at step boundaries --------------------------------------------
    def run(self, name: str, plan: dict[int, list[str]], label: str | None = None) -> dict:
        from services.runtime.controller import Controller
        from services.runtime.cluster import RayRuntime

        cfg, injections, error, mounts = self.config(name), Counter(), None, []
        out = Path(cfg.output.dir)
        t0 = time.perf_counter()
        rt = RayRuntime.start(cfg, out)
        try:
            def on_step(stats):
                for fault in plan.pop(int(stats["step"]), []):
                    injections[fault] += self.inject(fault, rt, out, mounts)

            Controller(cfg, rt).run(on_step=on_step)
        except Exception as e:  # a fault the run cannot survive: recorded, and the table says so
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            rt.shutdown()
            for m in mounts:
                subprocess.run(["umount", "-l", str(m)], check=False)
        return self.measure(label or name, out, time.perf_counter() - t0, sum(injections.values()), error)

    def inject(self, fault: str, rt, out: Path, mounts: list) -> int:
        ray = self.ray
        if fault == "kill generator":
            ray.kill(rt.generators.replicas[0].handle, no_restart=False)
        elif fault == "kill reward replica":
            ray.kill(rt.rewards.replicas[0].handle, no_restart=False)
        elif fault == "kill learner":
            ray.kill(rt.learner, no_restart=False)  # Ray restarts it; it resumes from its last checkpoint
        elif fault == "kill worker node":
            old, self.worker = self.worker, self.add_worker()
            self.cluster.remove_node(old, allow_graceful=False)
        elif fault.startswith("server "):
            self.server.arm(fault.split(" ", 1)[1])
        elif fault in DISK_FAULTS:
            return self.mount_over(out / "checkpoints", read_only=fault.endswith("read-only"), mounts=mounts)
        return 1

    @staticmethod
    def mount_over(folder: Path, read_only: bool, mounts: list) -> int:
        """A tmpfs over the checkpoint folder holding a copy of what is there: read-only, or with no space left."""
        stash = Path(tempfile.mkdtemp(prefix="ckpt-stash-"))
        folder.mkdir(parents=True, exist_ok=True)  # injected before the first checkpoint: an empty folder
        subprocess.run(["cp", "-a", f"{folder}/.", str(stash)], check=True)
        used = sum(p.stat().st_size for p in stash.rglob("*") if p.is_file())
        size = max(used + 64 * 1024, 256 * 1024)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]).returncode != 0:
            return 0  # not root: the case reports 0 injections
        mounts.append(folder)
        subprocess.run(["cp", "-a", f"{stash}/.", str(folder)], check=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return 1

    # -- SIGKILL of the driver, then `drpo train --resume` ------------------------------------------------
    def driver_kill(self, name: str) -> dict:
        cfg = self.config(name)
        out = Path(cfg.output.dir)
        out.mkdir(parents=True)
        (out.parent / f"{name}.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        env = {**os.environ, "RAY_ADDRESS": self.cluster.address, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "services.cli", "train", "--config", str(out.parent / f"{name}.yaml")]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        injections = 0
        # killed right after the checkpoint of step ⌊S/2⌋ exists (before it, --resume has nothing to resume from)
        written = out / "checkpoints" / f"step_{max(1, self.args.steps // 2)}" / "state.json"
        while proc.poll() is None:
            if written.exists():
                os.kill(proc.pid, signal.SIGKILL)
                injections = 1
                break
            time.sleep(0.05)
        proc.wait()
        resumed = subprocess.run([*cmd, "--resume", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
        said = [line for line in resumed.stderr.splitlines() if line.startswith("drpo: error")] or resumed.stderr.strip().splitlines()[-1:]
        error = None if resumed.returncode == 0 else f"resume exited {resumed.returncode}: {said}"
        return self.measure("SIGKILL driver + --resume", out, time.perf_counter() - t0, injections, error)

    # -- what happened, from the run's outputs --------------------------------------------------------------
    def measure(self, name: str, out: Path, wall: float, injections: int, error: str | None) -> dict:
        S = self.args.steps
        rows = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
        lost, duplicated, skipped, last = count_groups(rows, S, 2, stopped=error is not None)
        final = out / "checkpoints" / f"step_{S}" / "trainable.safetensors"
        weights = load_file(str(final)) if final.exists() else None
        same = None if weights is None or self.reference is None else all(
            torch.allclose(weights[k], self.reference[k], rtol=1e-5, atol=1e-7) for k in self.reference)
        if name in DELAY_ONLY and same is False:
            lost += 1  # a delay-only fault changed the result: some group was lost, duplicated or remade wrongly
        missing = sum(int(v) for r in last.values() for k, v in r.items() if k.startswith("reward/") and k.endswith("/missing"))
        return {"fault": name, "injections": injections, "lost": lost, "duplicated": duplicated, "missing_scores": missing,
                "skipped": ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "0",
                "same_weights": same, "steps": len(last), "wall_s": wall, "error": error,
                "duplicates_dropped": int(rows[-1].get("runtime/duplicates_dropped", 0)) if rows else 0}

    reference = None

    def main(self) -> int:
        S, rng = self.args.steps, random.Random(self.args.seed)
        base = self.run("fault-free", {})
        if base["error"] or base["skipped"] != "0" or base["lost"]:
            print(f"the fault-free run itself skipped or failed ({base}); the machine is too loaded for a reference")
            return 2
        self.reference = load_file(str(self.work / "fault-free" / "checkpoints" / f"step_{S}" / "trainable.safetensors"))
        base["same_weights"] = True
        self.rows.append(base)
        mid = max(1, S // 2)
        cases = [*ACTOR_FAULTS, *(f"server {f}" for f in FAULTS), *DISK_FAULTS]
        only = set(self.args.only.split(",")) if self.args.only else None
        for fault in cases:
            if only and fault not in only:
                continue
            self.rows.append(self.run(fault.replace(" ", "-"), {mid: [fault]}, label=fault))
            print(self.format_row(self.rows[-1]), flush=True)
        if not only or "SIGKILL driver + --resume" in only:
            self.rows.append(self.driver_kill("sigkill-driver"))
            print(self.format_row(self.rows[-1]), flush=True)
        if not only or "all together" in only:
            plan: dict[int, list[str]] = {}
            for fault in [f for f in cases if f not in DISK_FAULTS]:
                plan.setdefault(rng.randint(1, S - 1), []).append(fault)
            self.rows.append(self.run("all-together", plan, label=f"all together (seed {self.args.seed})"))
        self.print_table(base["wall_s"])
        bad = [r["fault"] for r in self.rows if r["lost"] or r["duplicated"]]
        print(f"\n{'FAIL: ' + ', '.join(bad) if bad else 'OK: nothing lost or duplicated'}")
        return 1 if bad else 0

    @staticmethod
    def format_row(r: dict) -> str:
        same = {True: "yes", False: "no", None: "—"}[r["same_weights"]]
        note = r["error"] or ""
        return (f"| {r['fault']} | {r['injections']} | {r['lost']} | {r['duplicated']} | {r['skipped']} | {r['missing_scores']} | {same} | "
                f"{r['steps']} | {{extra}} | {note} |")

    def print_table(self, base_wall: float) -> None:
        print(f"\n{self.args.steps} steps × 2 prompt groups of 6, tiny model, max_staleness 0; "
              f"fault-free wall {base_wall:.0f} s\n")
        print("| fault | injections | groups lost | groups duplicated | skipped (reason) | scores missing | "
              "weights = fault-free | steps done | extra wall s | stopped with |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in self.rows:
            print(self.format_row(r).replace("{extra}", "—" if r is self.rows[0] else f"{r['wall_s'] - base_wall:+.0f}"))
        (self.work / "fault_table.json").write_text(json.dumps(self.rows, indent=1, default=str))
        print(f"\n(rows as JSON: {self.work / 'fault_table.json'})")

    def close(self) -> None:
        self._serving.__exit__(None, None, None)
        self.ray.shutdown()
        self.cluster.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="draws the steps of the all-together case")
    parser.add_argument("--only", default="", help="comma-separated fault names (default: every case)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (faults are injected after step 1)")
    bench = Bench(args)
    try:
        return bench.main()
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())

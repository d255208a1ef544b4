"""Scaling simulation: the real controller, pools and object store, with stage costs from one H200.

Generator, reward and learner actors here sleep for the per-image costs measured in
docs/reference/gpu-anchor-costs.md (SD-Turbo, bf16, H200) instead of computing; everything else is
the production runtime: RayRuntime, ReplicaPool, GroupPipeline, Controller.train_step, weights of the
real LoRA size (3.3 M parameters) through the object store. It runs on a multi-node local cluster
(ray.cluster_utils.Cluster) whose worker nodes advertise fake GPUs, one per replica.

Per candidate (K per prompt, B prompts per step):
    generator: UNet forward, LoRA merged (4.6 ms) + frozen-base forward for the reference drift (4.6 ms)
               + VAE decode at 512 px (11.9 ms)                                  = 21.1 ms
    reward:    open_clip ViT-H-14 (HPSv2 size) 2.0 ms, or a 7B-class VLM reward 8.2 ms
    learner:   LoRA forward + backward (15.9 ms) + latent encoder on K + 2M + K latents (~0.6 ms each)

For each (generators, reward replicas) it reports the step time, the ideal step time of a perfect
pipeline max(T_gen/N_gen, T_reward/N_reward, T_learn), the pipeline efficiency (ideal / measured) and
the bottleneck. ``--time-scale`` shrinks every cost (ratios, not absolute times, matter).

    .venv/bin/python benchmarks/ray_scaling_sim.py [--time-scale 0.5] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MS = 1e-3
GEN_MS = 4.6 + 4.6 + 11.9
REWARD_MS = {"vit-h-14": 2.0, "7b-vlm": 8.2}
LEARN_MS_PER_CANDIDATE = 15.9
ENCODER_MS = 0.6
LORA_PARAMS = 3_319_808


def _sleep(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


class SimGenerator:
    """GeneratorActor's interface; sleeps GEN_MS per candidate; returns a real (tiny) CandidateGroup."""

    def __init__(self, cfg_json: str):
        from drpo_core.config import DrpoConfig

        sim = DrpoConfig.model_validate_json(cfg_json)
        self.scale = float(os.environ["DRPO_SIM_SCALE"])
        self.version, self.K = -1, sim.algo.num_candidates

    def _sync(self, weights) -> float:
        import ray

        if weights.version == self.version:
            return 0.0
        t0 = time.perf_counter()
        ray.get(weights.ref)  # the real LoRA-sized payload, across nodes
        self.version = weights.version
        return time.perf_counter() - t0

    def generate(self, weights, request):
        from drpo_core.algorithms.groups import CandidateGroup
        from services.runtime.actors import GenerationInfo

        sync = self._sync(weights)
        t0 = time.perf_counter()
        _sleep(len(request.seeds) * GEN_MS * MS * self.scale)
        n = len(request.seeds)
        group = CandidateGroup(request.group_id, request.prompt, list(request.seeds), torch.zeros(n, 4, 8, 8),
                               torch.zeros(n, 3, 8, 8, dtype=torch.uint8), version=self.version, base_latents=torch.zeros(n, 4, 8, 8))
        info = GenerationInfo(group.group_id, self.version, n, time.perf_counter() - t0, sync, os.getpid(), None)
        return group.for_reward(), group.for_learner(), info  # GeneratorActor.generate's three returns

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": None}


class SimReward:
    """RewardActor's interface; sleeps the reward's per-image cost; random scores seeded by the group id."""

    def __init__(self, cfg_json: str):
        self.scale = float(os.environ["DRPO_SIM_SCALE"])
        self.per_image = REWARD_MS[os.environ["DRPO_SIM_REWARD"]] * MS

    def score(self, group, budget=None):  # budget: the pool's CallBudget (a simulated reward makes one try)
        from drpo_core.algorithms.groups import stable_seed
        from drpo_core.algorithms.ranking import zscore
        from services.runtime.actors import ScoreResult

        t0 = time.perf_counter()
        _sleep(group.size * self.per_image * self.scale)
        raw = torch.rand(group.size, generator=torch.Generator().manual_seed(stable_seed(group.group_id)))
        return ScoreResult(group.group_id, group.version, {"sim": raw}, zscore(raw[None])[0], {}, time.perf_counter() - t0)

    def ping(self) -> dict:
        return {"pid": os.getpid(), "node": None}


class SimLearner:
    """LearnerActor's interface for train_step; sleeps the LoRA forward/backward + encoder cost of the step."""

    def __init__(self, cfg_json: str, output_dir: str, resume=None):
        from drpo_core.config import DrpoConfig

        self.cfg = DrpoConfig.model_validate_json(cfg_json)
        self.scale, self.version = float(os.environ["DRPO_SIM_SCALE"]), 0
        self.shards = int(os.environ["DRPO_SIM_LEARNER_SHARDS"])  # a data-parallel learner, ideally scaled
        gen = torch.Generator().manual_seed(0)
        self.lora = {"lora": torch.randn(LORA_PARAMS, generator=gen)}

    def restore_point(self) -> dict:
        return {"step": 0, "version": 0, "sampler": {"epoch": 0, "position": 0}, "reward_history": {}, "checkpoint": None}

    def update(self, expect_version: int, scores, *groups) -> dict:
        t0 = time.perf_counter()
        K, M = self.cfg.algo.num_candidates, self.cfg.algo.num_anchors
        per_group = K * LEARN_MS_PER_CANDIDATE + (2 * K + 2 * M) * ENCODER_MS
        _sleep(len(groups) * per_group * MS * self.scale / self.shards)
        self.version += 1
        return {"version": float(self.version), "update/applied": 1.0, "update/groups": float(len(groups)),
                "loss": 0.0, "timing/update_s": time.perf_counter() - t0}

    def publish_weights(self) -> tuple[dict, int]:
        from services.runtime.weights import pack_state

        return pack_state(self.lora), self.version

    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self.version}


def run_config(n_gen: int, n_rew: int, reward: str, args) -> dict:
    from drpo_core.config import load_config
    from services.runtime.controller import Controller
    from services.runtime.cluster import RayRuntime, RoleClasses

    env = (f"{{env_vars: {{DRPO_SIM_SCALE: '{args.time_scale}', DRPO_SIM_REWARD: {reward}, "
           f"DRPO_SIM_LEARNER_SHARDS: '{args.learner_shards}'}}}}")  # passed as each role's runtime_env
    cfg = load_config([], [*(f"runtime.{role}.runtime_env={env}" for role in ("generator", "reward", "learner")),
        f"trainer.prompts_per_step={args.prompts}", f"algo.num_candidates={args.k}", "algo.num_anchors=4",
        "rewards=[{kind: hue_fraction, name: sim}]", f"runtime.max_staleness={args.max_staleness}",
        f"runtime.generator.replicas={n_gen}", "runtime.generator.num_cpus=0.01", "runtime.generator.num_gpus=1",
        f"runtime.reward.replicas={n_rew}", "runtime.reward.num_cpus=0.01", "runtime.reward.num_gpus=1",
        "runtime.learner.num_cpus=0.01", "runtime.learner.num_gpus=1", "runtime.generator.max_in_flight=2",
        "runtime.reward.max_in_flight=4", "runtime.start_timeout_s=300"])
    rt = RayRuntime.start(cfg, Path(tempfile.mkdtemp(prefix="sim-")), classes=RoleClasses(SimGenerator, SimReward, SimLearner))
    try:
        controller = Controller(cfg, rt)
        controller.restore()
        rows, walls = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            rows.append(controller.train_step())
            walls.append(time.perf_counter() - t0)
    finally:
        rt.shutdown()
    steady = rows[args.warmup:]
    step = statistics.median(walls[args.warmup:])
    gen = statistics.median(r["timing/generate_s"] for r in steady) / n_gen
    rew = statistics.median(r["timing/score_s"] for r in steady) / n_rew
    learn = statistics.median(r["timing/update_s"] for r in steady)
    stages = {"generate": gen, "reward": rew, "learn": learn}
    ideal = max(stages.values())
    return {"gen": n_gen, "rew": n_rew, "reward": reward, "step_s": step, "ideal_s": ideal, "efficiency": ideal / step,
            "bottleneck": max(stages, key=stages.get), "stages": stages,
            "candidates_per_s": args.prompts * args.k / (step / args.time_scale),  # in H200 time
            "lag": statistics.mean(r["lag/mean"] for r in steady)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time-scale", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8, help="B, prompts per step")
    ap.add_argument("--k", type=int, default=16, help="K, candidates per prompt")
    ap.add_argument("--max-staleness", type=int, default=1)
    ap.add_argument("--nodes", type=int, default=3, help="worker nodes, 4 fake GPUs each")
    ap.add_argument("--grid", default="1x1,2x1,4x1,2x2,4x2,8x2", help="generators x reward replicas")
    ap.add_argument("--rewards", default="vit-h-14,7b-vlm")
    ap.add_argument("--learner-shards", type=int, default=1,
                    help="simulate a data-parallel learner: its cost divided by this (the runtime has one learner)")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=4, num_gpus=4, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    results = []
    try:
        for reward in args.rewards.split(","):
            for cell in args.grid.split(","):
                n_gen, n_rew = (int(x) for x in cell.split("x"))
                r = run_config(n_gen, n_rew, reward, args)
                results.append(r)
                print(f"{reward} {n_gen}g×{n_rew}r: step {r['step_s']:.3f}s ideal {r['ideal_s']:.3f}s "
                      f"eff {r['efficiency']:.0%} bottleneck {r['bottleneck']}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    g = GEN_MS * args.k * args.prompts
    print(f"\nB={args.prompts} prompts × K={args.k} per step, max_staleness {args.max_staleness}, "
          f"learner cost / {args.learner_shards}, time scale "
          f"{args.time_scale} (times below are scaled back to H200 seconds), {args.nodes} worker nodes × 4 GPUs\n")
    print("| reward | generators | reward replicas | step | ideal step | efficiency | bottleneck | candidates/s | mean lag |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        s = args.time_scale
        print(f"| {r['reward']} | {r['gen']} | {r['rew']} | {r['step_s'] / s:.2f} s | {r['ideal_s'] / s:.2f} s | "
              f"{r['efficiency']:.0%} | {r['bottleneck']} | {r['candidates_per_s']:.0f} | {r['lag']:.2f} |")
    print(f"\n(stage cost per step on one replica: generate {g / 1e3:.2f} s, reward "
          + ", ".join(f"{k} {v * args.k * args.prompts / 1e3:.2f} s" for k, v in REWARD_MS.items())
          + f", learn {(args.k * LEARN_MS_PER_CANDIDATE + (2 * args.k + 8) * ENCODER_MS) * args.prompts / 1e3 / args.learner_shards:.2f} s)")


if __name__ == "__main__":
    main()

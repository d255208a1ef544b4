"""Bytes and time per step moved to the learner (and to the rewards): whole groups vs the role views.

Real sizes through a real multi-node ``ray.cluster_utils.Cluster``: a "generator" node holds the groups in its
object store, the consumer actors run on other nodes (each node has its own object store and raylet, so every
fetch is a node-to-node transfer). A group has SD-Turbo's shapes at ``--resolution`` (latents `[K, 4, r/8, r/8]`
fp32, base latents the same, images `[K, 3, r, r]`); the content is random (shapes, dtypes and the code that
splits a group are the real ones: ``CandidateGroup.for_reward`` / ``for_learner``, as GeneratorActor returns them).

  before: GeneratorActor returned one group (fp32 images + latents + base latents); the learner and each reward
          call fetched all of it.
  after:  two objects: the rewards' view (uint8 images, prompt, metadata) and the learner's view (latents, base
          latents, seeds, prompt, version). The learner recomputes G_θ(ε_i, c) from the seeds, as it always did.

Bytes are exact (tensor bytes of what each consumer receives; the serialized size is within 0.1 %). Times are
the wall time of one consumer call on ``--transfer-groups`` groups (a median over ``--repeats`` paired,
alternating runs), on a loaded 2-core host: an upper bound, and they do not scale to a network link.

    .venv/bin/python benchmarks/learner_traffic.py [--resolution 512] [-K 24] [-B 32] [--transfer-groups 4]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_group(index: int, K: int, resolution: int):
    from drpo_core.algorithms.groups import CandidateGroup

    gen = torch.Generator().manual_seed(index)
    side = resolution // 8
    return CandidateGroup(f"0:{index}", "a photo of a red car", list(range(K)),
                          latents=torch.randn(K, 4, side, side, generator=gen),
                          images=torch.rand(K, 3, resolution, resolution, generator=gen),  # fp32, as the old sampler kept them
                          version=0, base_latents=torch.randn(K, 4, side, side, generator=gen))


def tensor_bytes(group) -> int:
    return sum(t.numel() * t.element_size() for t in (group.latents, group.images, group.base_latents) if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("-K", type=int, default=24)
    ap.add_argument("-B", type=int, default=32, help="prompts per step (bytes per step = B × bytes per group)")
    ap.add_argument("--transfer-groups", type=int, default=4, help="groups per timed transfer (object stores are 2 GiB)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from drpo_core.training.sampler import to_uint8

    store = 2 * 1024 ** 3
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "object_store_memory": store})
    for name in ("gen_node", "learn_node", "reward_node"):
        cluster.add_node(num_cpus=1, resources={name: 1}, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})

    @ray.remote(num_cpus=0)
    class Consumer:
        def take(self, *groups) -> dict:
            return {"bytes": sum(tensor_bytes(g) for g in groups), "pickled": sum(len(pickle.dumps(g, protocol=5)) for g in groups)}

    learner = Consumer.options(resources={"learn_node": 0.1}).remote()
    reward = Consumer.options(resources={"reward_node": 0.1}).remote()

    def one_transfer(split: bool) -> dict:
        n = args.transfer_groups
        # each group as its own object in the generator node's store, as GeneratorActor's returns are
        for_reward, for_learner = [], []
        for i in range(n):
            r, l = make_views.options(resources={"gen_node": 0.1}).remote(i, args.K, args.resolution, split)
            for_reward.append(r)
            for_learner.append(l)
        ray.wait(for_reward + for_learner, num_returns=2 * n, fetch_local=False)
        t0 = time.perf_counter()
        got_learner = ray.get(learner.take.remote(*for_learner))
        learner_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        got_reward = ray.get(reward.take.remote(*for_reward))
        reward_s = time.perf_counter() - t0
        del for_reward, for_learner
        return {"learner_bytes": got_learner["bytes"] / n, "learner_pickled": got_learner["pickled"] / n, "learner_s": learner_s,
                "reward_bytes": got_reward["bytes"] / n, "reward_s": reward_s}

    @ray.remote(num_cpus=0, num_returns=2)
    def make_views(i: int, K: int, resolution: int, split: bool):
        g = make_group(i, K, resolution)
        if not split:
            return g, g  # one object in the old runtime; two refs here only to share the timing code
        g.images = to_uint8(g.images)
        return g.for_reward(), g.for_learner()

    results = {False: [], True: []}
    for _ in range(args.repeats):  # paired, alternating
        for split in (False, True):
            results[split].append(one_transfer(split))

    B, n = args.B, args.transfer_groups
    print(f"\n{args.resolution} px, K={args.K}, B={B} prompts/step; {n} groups per timed transfer, median of {args.repeats} "
          "paired alternating runs; multi-node ray.cluster_utils.Cluster on one 2-core host\n")
    print("| traffic | before (whole group) | after (role views) | ratio |")
    print("|---|---|---|---|")
    med = {s: {k: statistics.median(r[k] for r in results[s]) for k in results[s][0]} for s in results}
    mb = 1024 ** 2
    print(f"| to the learner, per group | {med[False]['learner_bytes'] / mb:.1f} MiB | {med[True]['learner_bytes'] / mb:.2f} MiB | "
          f"{med[False]['learner_bytes'] / med[True]['learner_bytes']:.0f}× |")
    print(f"| to the learner, per step (B={B}) | {B * med[False]['learner_bytes'] / mb:.0f} MiB | "
          f"{B * med[True]['learner_bytes'] / mb:.0f} MiB | {med[False]['learner_bytes'] / med[True]['learner_bytes']:.0f}× |")
    print(f"| to the rewards, per group | {med[False]['reward_bytes'] / mb:.1f} MiB | {med[True]['reward_bytes'] / mb:.1f} MiB | "
          f"{med[False]['reward_bytes'] / med[True]['reward_bytes']:.1f}× |")
    ratio = statistics.median(a["learner_s"] / b["learner_s"] for a, b in zip(results[False], results[True]))
    print(f"| learner fetch of {n} groups, cross-node | {med[False]['learner_s'] * 1e3:.0f} ms | {med[True]['learner_s'] * 1e3:.0f} ms | "
          f"{ratio:.0f}× (median paired ratio) |")
    ratio = statistics.median(a["reward_s"] / b["reward_s"] for a, b in zip(results[False], results[True]))
    print(f"| reward fetch of {n} groups, cross-node | {med[False]['reward_s'] * 1e3:.0f} ms | {med[True]['reward_s'] * 1e3:.0f} ms | "
          f"{ratio:.1f}× (median paired ratio) |")
    print(f"\n(serialized size of the learner's view: {med[True]['learner_pickled'] / mb:.2f} MiB per group)")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

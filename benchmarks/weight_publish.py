"""Weight-publish latency: object store vs collective broadcast, pulled by 1, 2, 4 generators on a multi-node cluster.

Two states with the real SD-Turbo shapes: the LoRA r=16 on to_q/to_k/to_v/to_out.0 of the SD 2.1 UNet
(3.3 M parameters) and the full UNet (866 M parameters, 1.65 GiB in float16). The UNet is built from the SD 2.1
config on the meta device for its shapes only; tensors are random, in float16 for both transports (equal bytes).

A ``ray.cluster_utils.Cluster`` with a head node (the learner) and ``--nodes`` worker nodes, each with its own
raylet and object store; the generators are spread over the worker nodes. Per publish:

- **object store** — the learner actor returns ``pack_state(state)`` (one object-store copy on its node, as
  ``LearnerActor.publish_weights``); every generator ``ray.get``\\ s it (one transfer per node) and copies it into
  its own tensors (``load_state_dict``'s copy).
- **collective** — the learner flattens the state into float16 buckets (``Layout.flatten``, as ``SyncSender``)
  and broadcasts them over a gloo group of learner + generators (drpo_core/training/weight_broadcast.py);
  each generator receives into its own tensors (here: the buckets back its parameters; the runtime's
  generator receives into a staging copy and copies it into the UNet, reported separately as "+ staging copy").

Latency = wall time from the publish call until every generator holds the version. The two transports run in
alternating order (paired), ``--repeats`` each; medians and the median paired ratio. The group is formed once per
generator count (``join``, reported): the runtime re-forms it only after a fault.

    nice -n 15 .venv/bin/python benchmarks/weight_publish.py --repeats 5 [--states lora,full] [--pullers 1,2,4]
    # on GPU nodes: --device cuda (NCCL; one GPU per generator and one for the learner)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# stabilityai/sd-turbo unet/config.json (SD 2.1 architecture)
SD21_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DTYPE = torch.float16


def sd21_shapes(rank: int = 16) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Full-UNet parameter shapes and the LoRA A/B shapes (peft naming) for ``rank``."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET)
    full = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in LORA_TARGETS):
            lora[f"{name}.lora_A.weight"] = (rank, module.in_features)
            lora[f"{name}.lora_B.weight"] = (module.out_features, rank)
    return full, lora


class Learner:
    """Holds a random state; publishes it through the object store or broadcasts it."""

    def __init__(self, shapes: dict, device: str):
        from drpo_core.training.weight_broadcast import Layout

        self.layout, self.device = Layout.of(shapes, DTYPE), torch.device(device)
        gen = torch.Generator().manual_seed(0)
        self.buckets = [torch.empty(n, dtype=DTYPE).normal_(generator=gen).to(self.device) for n in self.layout.bucket_sizes]
        self.state = self.layout.unflatten(self.buckets)

    def publish(self) -> dict:
        from services.runtime.weights import pack_state

        return pack_state(self.state)  # the return value is the one object-store copy (on this node)

    def rendezvous(self, world: int) -> tuple[str, int]:
        from datetime import timedelta

        import ray

        from drpo_core.training.weight_broadcast import BroadcastGroup

        host = ray.util.get_node_ip_address()
        self.store = BroadcastGroup.serve_store(host, world, timedelta(seconds=600))
        return host, self.store.port

    def join(self, world: int) -> float:
        from datetime import timedelta

        from drpo_core.training.weight_broadcast import BroadcastGroup

        t0 = time.perf_counter()
        self.group = BroadcastGroup(self.store, 0, world, "nccl" if self.device.type == "cuda" else "gloo",
                                    timedelta(seconds=600), 1)
        return time.perf_counter() - t0

    def send(self) -> float:
        t0 = time.perf_counter()
        self.group.broadcast(self.layout.flatten(self.state, self.device))  # cast + pack, as SyncSender.send
        return time.perf_counter() - t0

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class Puller:
    """A generator's weights: parameters backed by flat buckets of the sync layout."""

    def __init__(self, shapes: dict, device: str):
        from drpo_core.training.weight_broadcast import Layout

        self.layout, self.device = Layout.of(shapes, DTYPE), torch.device(device)
        self.buckets = self.layout.empty(self.device)
        self.params = self.layout.unflatten(self.buckets)

    def pull(self, handle: list) -> float:
        import ray

        from services.runtime.weights import unpack_state

        t0 = time.perf_counter()
        state = unpack_state(ray.get(handle[0]))
        with torch.no_grad():
            for k, t in state.items():
                self.params[k].copy_(t)
        return time.perf_counter() - t0

    def join(self, address: str, port: int, rank: int, world: int) -> float:
        from datetime import timedelta

        from drpo_core.training.weight_broadcast import BroadcastGroup

        t0 = time.perf_counter()
        store = BroadcastGroup.connect_store(address, port, world, timedelta(seconds=600))
        self.group = BroadcastGroup(store, rank, world, "nccl" if self.device.type == "cuda" else "gloo",
                                    timedelta(seconds=600), 1)
        return time.perf_counter() - t0

    def receive(self) -> float:
        t0 = time.perf_counter()
        self.group.broadcast(self.buckets)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def staging_copy(self) -> float:
        """The runtime's extra step: a staged copy into the model's own tensors."""
        staged = [b.clone() for b in self.buckets]
        t0 = time.perf_counter()
        for b, s in zip(self.buckets, staged):
            b.copy_(s)
        return time.perf_counter() - t0

    def ping(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def measure(shapes: dict, n: int, nodes: list, repeats: int, device: str) -> dict:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On

    gpu = 1 if device == "cuda" else 0
    learner = ray.remote(Learner).options(num_cpus=0.01, num_gpus=gpu, scheduling_strategy=On(nodes[0], soft=False)).remote(shapes, device)
    pullers = [ray.remote(Puller).options(num_cpus=0.01, num_gpus=gpu, scheduling_strategy=On(nodes[1 + i % (len(nodes) - 1)], soft=False))
               .remote(shapes, device) for i in range(n)]
    ray.get([learner.ping.remote(), *[p.ping.remote() for p in pullers]], timeout=900)
    address, port = ray.get(learner.rendezvous.remote(n + 1), timeout=120)
    joins = ray.get([learner.join.remote(n + 1), *[p.join.remote(address, port, r, n + 1) for r, p in enumerate(pullers, 1)]],
                    timeout=600)
    times = {"object store": [], "collective": []}
    for r in range(repeats):
        order = ["object store", "collective"] if r % 2 == 0 else ["collective", "object store"]
        for mode in order:
            t0 = time.perf_counter()
            if mode == "object store":
                ref = learner.publish.remote()
                ray.get([p.pull.remote([ref]) for p in pullers], timeout=900)
                del ref
            else:
                ray.get([learner.send.remote(), *[p.receive.remote() for p in pullers]], timeout=900)
            times[mode].append(time.perf_counter() - t0)
    staging = statistics.median(ray.get([pullers[0].staging_copy.remote() for _ in range(3)], timeout=600))
    for a in [learner, *pullers]:
        ray.kill(a)
    ratios = [c / o for o, c in zip(times["object store"], times["collective"])]
    return {"n": n, "join_s": max(joins), "staging_s": staging, "ratio": statistics.median(ratios),
            **{mode: statistics.median(v) for mode, v in times.items()}, "raw": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", default="lora,full")
    ap.add_argument("--pullers", default="1,2,4")
    ap.add_argument("--nodes", type=int, default=2, help="worker nodes holding the generators (plus the learner's head)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--object-store-gib", type=float, default=2.5, help="object store per node")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL; needs a GPU per actor)")
    args = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    full, lora = sd21_shapes()
    states = {"lora": ("LoRA r=16", lora), "full": ("full UNet", full)}
    gpus = max(int(x) for x in args.pullers.split(",")) + 1 if args.device == "cuda" else 0
    store = int(args.object_store_gib * 2**30)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": gpus, "object_store_memory": store,
                                                            "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=1, num_gpus=gpus, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    head = ray.get_runtime_context().get_node_id()
    nodes = [head] + [n for n in nodes if n != head]
    rows = []
    try:
        for key in args.states.split(","):
            name, shapes = states[key]
            size = sum(torch.Size(s).numel() for s in shapes.values())
            for n in (int(x) for x in args.pullers.split(",")):
                r = measure(shapes, n, nodes, args.repeats, args.device)
                r.update(state=name, params_M=size / 1e6, MiB=size * 2 / 2**20, nodes_used=min(n, args.nodes))
                rows.append(r)
                print(f"{name} × {n}: object store {r['object store'] * 1e3:.0f} ms, collective {r['collective'] * 1e3:.0f} ms "
                      f"(paired ratio {r['ratio']:.2f}); join {r['join_s'] * 1e3:.0f} ms; raw {r['raw']}", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(f"\n{args.device}, head + {args.nodes} worker nodes, float16 state, median of {args.repeats} alternating pairs\n")
    print("| state | bytes to each generator | generators | object store | collective | collective / object store "
          "(median paired) | group join (once) | + staging copy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mib = r["MiB"]
        print(f"| {r['state']} ({r['params_M']:.1f} M) | {mib:.1f} MiB | {r['n']} | {r['object store'] * 1e3:.0f} ms | "
              f"{r['collective'] * 1e3:.0f} ms | {r['ratio']:.2f} | {r['join_s'] * 1e3:.0f} ms | {r['staging_s'] * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()

"""Weight-publish latency through the object store: one ``ray.put`` per version, pulled by 1, 2, 4 generators.

Two states with the real SD-Turbo shapes: the LoRA r=16 on to_q/to_k/to_v/to_out.0 of the SD 2.1 UNet
(3.3 M parameters) and the full UNet (866 M parameters). The UNet is built from the SD 2.1 config on the
meta device for its shapes only; tensors are random. A "generator" here is an actor holding a
preallocated copy of the state: its pull is ``ray.get`` (zero-copy on one node) + ``copy_`` into its
own tensors, exactly what GeneratorActor does through ``load_trainable_state_dict``. CPU, one node.

    .venv/bin/python benchmarks/weight_publish.py [--full-dtype float16] [--repeats 3]
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


class Puller:
    """Holds a preallocated state of the given shapes; ``pull`` loads a published version into it."""

    def __init__(self, shapes: dict[str, tuple], dtype: str):
        self.params = {k: torch.zeros(s, dtype=getattr(torch, dtype)) for k, s in shapes.items()}

    def pull(self, handle: list) -> float:
        import ray

        from services.weights import unpack_state

        t0 = time.perf_counter()
        state = unpack_state(ray.get(handle[0]))
        with torch.no_grad():
            for k, t in state.items():
                self.params[k].copy_(t)
        return time.perf_counter() - t0

    def ping(self) -> bool:
        return True


def measure(shapes: dict, dtype: str, pullers: list[int], repeats: int) -> dict:
    import ray

    from services.weights import pack_state

    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen).to(getattr(torch, dtype)) for k, s in shapes.items()}
    size_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    actor = ray.remote(Puller).options(num_cpus=0.01)
    out = {"params_M": sum(t.numel() for t in state.values()) / 1e6, "size_MiB": size_mb, "put_s": [], "pull_s": {}}
    for n in pullers:
        actors = [actor.remote(shapes, dtype) for _ in range(n)]
        ray.get([a.ping.remote() for a in actors], timeout=600)
        walls, each = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = ray.put(pack_state(state))  # the learner's publish: one object-store copy per version
            put = time.perf_counter() - t0
            t1 = time.perf_counter()
            per_actor = ray.get([a.pull.remote([ref]) for a in actors], timeout=900)
            walls.append(time.perf_counter() - t1)
            each.append(max(per_actor))
            out["put_s"].append(put)
            del ref
        out["pull_s"][n] = {"wall": statistics.median(walls), "slowest_actor": statistics.median(each)}
        for a in actors:
            ray.kill(a)
    out["put_s"] = statistics.median(out["put_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pullers", default="1,2,4")
    ap.add_argument("--full-dtype", default="float16", help="dtype of the full-UNet state (float16 halves the memory)")
    ap.add_argument("--full-pullers", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import ray

    full, lora = sd21_shapes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rows = [("LoRA r=16 (fp32)", measure(lora, "float32", [int(x) for x in args.pullers.split(",")], args.repeats)),
                (f"full UNet ({args.full_dtype})", measure(full, args.full_dtype, [int(x) for x in args.full_pullers.split(",")],
                                                           args.repeats))]
    finally:
        ray.shutdown()
    print("\n| state | parameters | size | ray.put | pull by 1 | pull by 2 | pull by 4 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        pulls = " | ".join(f"{r['pull_s'][n]['wall'] * 1e3:.0f} ms" if n in r["pull_s"] else "—" for n in (1, 2, 4))
        print(f"| {name} | {r['params_M']:.2f} M | {r['size_MiB']:.1f} MiB | {r['put_s'] * 1e3:.0f} ms | {pulls} |")
    print("\n(pull = wall time from the request until every generator has copied the version into its own tensors; "
          "median of repeats; one node, 2 CPUs)")


if __name__ == "__main__":
    main()

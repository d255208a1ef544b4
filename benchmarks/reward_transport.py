"""Scoring throughput of one reward in-process vs. behind HTTP (JSON + base64 PNG) and gRPC (PNG bytes).

    .venv/bin/python benchmarks/reward_transport.py [--repeats 3] [--batch-size 64] [--concurrency 4]

Starts ``drpo serve-reward`` twice (HTTP, then ``--grpc``) as separate processes on loopback, scores the
same images through ``HttpReward`` / ``GrpcReward`` and in-process, and prints a Markdown table of
images/s (median of ``--repeats`` timed runs after one warm-up) and the overhead ratio
(in-process images/s ÷ transport images/s). Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from drpo_core.rewards.hue import HueFractionReward  # noqa: E402
from drpo_core.rewards.http import HttpReward  # noqa: E402
from services.rewards.grpc_reward.client import GrpcReward  # noqa: E402

CASES = [(64, 512), (512, 64)]  # (image side, images per call)
PROMPTS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird", "a photo of a purple boat"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(grpc: bool):
    """``drpo serve-reward`` in a subprocess; yields a client factory; the process is stopped on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "services.cli", "serve-reward", "--reward", "hue_fraction", "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--grpc"] if grpc else []), cwd=ROOT, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    make = (lambda **kw: GrpcReward(f"127.0.0.1:{port}", **kw)) if grpc else \
        (lambda **kw: HttpReward(f"http://127.0.0.1:{port}/score", **kw))
    try:
        probe, deadline = make(timeout_s=1), time.monotonic() + 90
        while True:
            try:
                probe.health()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("reward server did not start") from None
                time.sleep(0.2)
        yield make
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def images_per_second(fn, images: torch.Tensor, prompts: list[str], repeats: int) -> float:
    fn(images, prompts)  # warm-up: connections, allocator, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = fn(images, prompts)
        times.append(time.perf_counter() - start)
        if torch.isnan(scores).any():
            raise RuntimeError(f"{type(fn).__name__} returned missing scores: {getattr(fn, 'pop_stats', dict)()}")
    return images.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reward = HueFractionReward()
    data = {}
    for side, n in CASES:
        gen = torch.Generator().manual_seed(side)
        # smooth colour fields, not white noise: PNG size (and so transfer cost) is closer to real samples
        low = torch.rand(n, 3, 8, 8, generator=gen)
        images = torch.nn.functional.interpolate(low, size=(side, side), mode="bilinear", align_corners=False)
        data[side] = (images, [PROMPTS[i % len(PROMPTS)] for i in range(n)])

    rows = {side: {"in-process": images_per_second(reward, *data[side], args.repeats)} for side, _ in CASES}
    for name, grpc in (("HTTP", False), ("gRPC", True)):
        with served(grpc) as make:
            with make(batch_size=args.batch_size, max_concurrency=args.concurrency, timeout_s=60) as client:
                for side, _ in CASES:
                    rows[side][name] = images_per_second(client, *data[side], args.repeats)

    cpu = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    print(f"reward hue_fraction; batch_size {args.batch_size}, max_concurrency {args.concurrency}; "
          f"median of {args.repeats}; {cpu}; torch {torch.__version__}\n")
    print("| images | per call | in-process img/s | HTTP img/s | gRPC img/s | HTTP overhead | gRPC overhead |")
    print("|---|---|---|---|---|---|---|")
    for side, n in CASES:
        r = rows[side]
        print(f"| {side}×{side} | {n} | {r['in-process']:.0f} | {r['HTTP']:.0f} | {r['gRPC']:.0f} | "
              f"{r['in-process'] / r['HTTP']:.1f}× | {r['in-process'] / r['gRPC']:.1f}× |")
    print("\n" + json.dumps({f"{side}px": {k: round(v, 1) for k, v in rows[side].items()} for side, _ in CASES}))


if __name__ == "__main__":
    main()

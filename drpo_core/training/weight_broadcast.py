"""Weights from one sender to many receivers by a collective broadcast (gloo on CPU, NCCL on GPU).

The sender (learner rank 0) casts its trainable state to a 16-bit sync dtype and packs it into flat buckets
of at most ``BUCKET_BYTES``; every receiver (a generator) holds buckets of the same layout and receives
them in place. The layout is the sorted parameter names with their shapes, computed by each side from its
own model; its digest is compared at join time, so a receiver built from another architecture fails in one
line instead of loading garbage.

The process group is *stateless*: a ``TCPStore`` (served by the sender) plus ``ProcessGroupGloo`` /
``ProcessGroupNCCL`` constructed directly, not ``init_process_group``. It therefore lives next to a
data-parallel learner's default group, and a new group (a new epoch, after a receiver died or restarted)
is a new object on a new store prefix, with every operation bounded by ``timeout``. Who joins and when is
the runtime's business (services/runtime/weight_sync.py); nothing here knows about Ray.

    state {name: [shape]} ──cast(dtype)──► buckets b_1..b_m (flat, ≤ BUCKET_BYTES each) ──broadcast(src=0)──►
    receivers' buckets ──unflatten──► {name: [shape]} (dtype) ──load_state_dict──► generator
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 * 2**20  # bounds the sender's extra memory per collective call, not the total


@dataclass(frozen=True)
class Layout:
    """Which slice of which bucket holds each tensor: ``entries[i] = (name, shape, bucket, offset)``."""

    dtype: torch.dtype
    entries: tuple[tuple[str, tuple[int, ...], int, int], ...]
    bucket_sizes: tuple[int, ...]

    @classmethod
    def of(cls, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> "Layout":
        """Tensors in sorted name order, a new bucket whenever the current one would pass BUCKET_BYTES."""
        per_bucket = max(1, BUCKET_BYTES // torch.empty((), dtype=dtype).element_size())
        entries, sizes, used = [], [], per_bucket  # used = per_bucket opens the first bucket
        for name in sorted(shapes):
            n = int(torch.Size(shapes[name]).numel())
            if used + n > per_bucket and used > 0:
                sizes.append(0)
                used = 0
            entries.append((name, tuple(shapes[name]), len(sizes) - 1, used))
            used += n
            sizes[-1] = used
        return cls(dtype, tuple(entries), tuple(sizes))

    @property
    def digest(self) -> str:
        return hashlib.sha256(repr((str(self.dtype), self.entries)).encode()).hexdigest()[:16]

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_sizes) * torch.empty((), dtype=self.dtype).element_size()

    def empty(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        return [torch.empty(n, dtype=self.dtype, device=device) for n in self.bucket_sizes]

    def flatten(self, state: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """1. cast each tensor to the sync dtype; 2. copy it into its slice of its bucket."""
        buckets = self.empty(device)
        with torch.no_grad():
            for name, shape, b, offset in self.entries:
                t = state[name]
                if not t.is_floating_point():
                    raise TypeError(f"weight sync carries floating-point tensors only; {name} is {t.dtype}")
                buckets[b][offset:offset + t.numel()].copy_(t.detach().reshape(-1))
        return buckets

    def unflatten(self, buckets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views into the buckets, ``{name: [shape]}`` in the sync dtype (no copy)."""
        return {name: buckets[b][offset:offset + torch.Size(shape).numel()].view(shape)
                for name, shape, b, offset in self.entries}


def layout_of(state: dict[str, torch.Tensor], dtype: torch.dtype) -> Layout:
    return Layout.of({k: tuple(v.shape) for k, v in state.items()}, dtype)


class BroadcastGroup:
    """One epoch of the sender + receivers group; rank 0 sends. Every call is bounded by ``timeout``."""

    def __init__(self, store: dist.Store, rank: int, world: int, backend: str, timeout: timedelta, epoch: int):
        self.rank, self.world, self.backend, self.epoch = rank, world, backend, epoch
        store = dist.PrefixStore(f"drpo-weights/{epoch}/", store)
        if backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world, options)
        else:
            self.pg = dist.ProcessGroupGloo(store, rank, world, timeout)
        self.timeout = timeout

    @staticmethod
    def serve_store(host: str, world: int, timeout: timedelta) -> dist.TCPStore:
        """The sender's store on a free port (``store.port``); receivers connect with :meth:`connect_store`."""
        return dist.TCPStore(host, 0, world, True, timeout=timeout, wait_for_workers=False)

    @staticmethod
    def connect_store(host: str, port: int, world: int, timeout: timedelta) -> dist.TCPStore:
        return dist.TCPStore(host, port, world, False, timeout=timeout)

    def broadcast(self, buckets: list[torch.Tensor]) -> None:
        """Bucket by bucket from rank 0, in place on the receivers; raises on a lost peer or after the timeout."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for bucket in buckets:
            self.pg.broadcast([bucket], opts).wait(self.timeout)

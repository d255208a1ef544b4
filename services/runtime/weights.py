"""Policy weights on the object store: one immutable copy per version, pulled by generators (IMPALA).

The learner returns its trainable state (LoRA tensors, or the full UNet) as a dict of numpy arrays;
Ray stores an actor call's return value once in the object store, owned by the driver, so the copy
survives a learner restart. The driver passes a :class:`WeightsHandle` (version + reference) with
every generate request; a generator pulls only when its version differs, and readers on the same
node map the arrays without copying. :class:`WeightStore` keeps only the newest handle, so older
versions are freed as soon as no queued request refers to them any more.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# numpy has no bfloat16: such tensors travel as their int16 bit pattern and are viewed back.
_VIA_INT16 = {torch.bfloat16}


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """``{name: tensor}`` → ``{name: (array, dtype name)}``, contiguous CPU arrays the object store maps zero-copy."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        array = t.view(torch.int16).numpy() if t.dtype in _VIA_INT16 else t.numpy()
        out[name] = (array, str(t.dtype).removeprefix("torch."))
    return out


def unpack_state(payload: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state`. Tensors share the (read-only) object-store buffers: the caller copies them
    into its parameters (``load_state_dict``), which is the only copy a generator makes."""
    out = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")  # we only read before copying
        for name, (array, dtype) in payload.items():
            t = torch.from_numpy(array)
            out[name] = t.view(getattr(torch, dtype)) if getattr(torch, dtype) in _VIA_INT16 else t
    return out


@dataclass(frozen=True)
class WeightsHandle:
    """A published policy version. ``ref`` is a Ray ObjectRef to a :func:`pack_state` payload (or, in-process,
    the payload itself). Passed inside a request object, Ray does not resolve it: the receiver decides.

    Collective weight sync (services/runtime/weight_sync.py) sends no payload: ``ref`` is None, ``source`` is the
    learner to fetch a missed broadcast from, and ``serial`` (the publish count, monotonic across learner
    rollbacks) orders publishes."""

    version: int
    ref: Any
    serial: int = -1
    source: Any = None


class WeightStore:
    """Driver-side registry holding only the newest published version (older refs are dropped)."""

    def __init__(self):
        self._newest: WeightsHandle | None = None
        self.published = 0

    def publish(self, version: int, ref: Any, source: Any = None) -> WeightsHandle:
        self.published += 1
        self._newest = WeightsHandle(version, ref, self.published, source)
        return self._newest

    @property
    def newest(self) -> WeightsHandle:
        if self._newest is None:
            raise RuntimeError("no weights published yet")
        return self._newest

    @property
    def version(self) -> int:
        return -1 if self._newest is None else self._newest.version

    def clear(self) -> None:
        self._newest = None

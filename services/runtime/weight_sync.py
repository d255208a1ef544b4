"""How a new policy version reaches the generators: the object store, or a collective broadcast.

``runtime.weight_sync``:

- ``object_store`` — the learner's trainable state is one object-store copy per version (services/runtime/weights.py);
  each generator pulls it when a request carries a version it does not hold. Cheap for a LoRA (13 MiB).
- ``collective`` — learner rank 0 casts the state to ``runtime.weight_sync_dtype`` and broadcasts it to every
  live generator over a torch.distributed group of its own (gloo on CPU, NCCL on GPU;
  drpo_core/training/weight_broadcast.py). Generators receive into a staging copy on a separate thread
  (the ``weights`` concurrency group), so sampling goes on meanwhile, and switch to it when a request
  carries that publish. Nothing goes through the object store unless a generator missed the broadcast.
- ``auto`` (default) — collective for full fine-tuning (``lora.enabled: false``), object store for LoRA.

Faults never stall a publish: every collective call is bounded by ``runtime.weight_sync_timeout_s``. A
failed broadcast (a generator died or restarted, a join timed out) marks the group broken; the next publish
forms a new one (a new *epoch*: fresh store prefix, the generators alive then). A generator that does not
hold a request's publish (it missed the broadcast, or restarted since) fetches the learner's kept copy of
the newest broadcast version through the object store (``LearnerActor.sync_payload``): the fallback for
that version. Handles carry a publish *serial* (monotonic across learner rollbacks); a generator never
goes back to an older serial in collective mode (a re-issued old request is served with the newer weights,
and its group records the version it actually used).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any, Callable

import torch

from drpo_core.training.weight_broadcast import BroadcastGroup, Layout, layout_of
from services.runtime.weights import WeightsHandle, pack_state, unpack_state

log = logging.getLogger("drpo.weight_sync")
WEIGHTS_GROUP = {"weights": 1}  # concurrency group for receiving / serving weights next to the actor's main work


def sync_mode(cfg) -> str:
    """``collective`` or ``object_store`` for this config (``auto``: collective only for full fine-tuning)."""
    mode = cfg.runtime.weight_sync
    return ("object_store" if cfg.lora.enabled else "collective") if mode == "auto" else mode


def sync_dtype(cfg) -> torch.dtype:
    """``weight_sync_dtype``; ``auto``: the model's dtype, so the generators sample with exactly the learner's weights
    (a float16 broadcast of an fp32 model rounds them: the candidates then differ from the local trainer's from
    the first step on, and a step at max_staleness 0 is no longer the local trainer's step)."""
    name = cfg.runtime.weight_sync_dtype
    return getattr(torch, cfg.model.dtype if name == "auto" else name)


# -- actor side ------------------------------------------------------------------------------------------
class SyncSender:
    """Learner rank 0's end: serves the store, broadcasts each publish, keeps the newest broadcast buffers
    (CPU) for generators that missed it."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.store, self.group, self.kept = None, None, None  # kept: (serial, version, layout, buckets on CPU)
        self.lock = threading.Lock()

    def rendezvous(self, state: dict, world: int, timeout_s: float) -> tuple[str, int, str]:
        import ray

        host = ray.util.get_node_ip_address()
        self.group, self.store = None, BroadcastGroup.serve_store(host, world, timedelta(seconds=timeout_s))
        return host, self.store.port, layout_of(state, self.dtype).digest

    def send(self, state: dict, epoch: int, world: int, serial: int, version: int, timeout_s: float) -> dict:
        """Keep this version for the fallback first, then broadcast it; a failure is reported, not raised
        (it is the generators' fault, not the learner's: the controller must not roll the learner back)."""
        t0 = time.perf_counter()
        layout = layout_of(state, self.dtype)
        buckets = layout.flatten(state, self.device)  # NCCL sends from the GPU; the kept copy lives on the CPU
        with self.lock:
            self.kept = (serial, version, layout, [b.cpu() for b in buckets])
        try:
            if self.group is None or self.group.epoch != epoch:
                self.group = BroadcastGroup(self.store, 0, world, self._backend(), timedelta(seconds=timeout_s), epoch)
            self.group.broadcast(buckets)
            return {"ok": True, "seconds": time.perf_counter() - t0, "bytes": layout.nbytes}
        except Exception as e:  # a lost or late receiver: gloo/NCCL raise; this group is done
            self.group = None
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}

    def payload(self) -> tuple[int, int, dict]:
        """The newest broadcast version as (serial, version, packed state): the object-store fallback."""
        with self.lock:
            if self.kept is None:
                raise RuntimeError("no weights broadcast yet")
            serial, version, layout, buckets = self.kept
        return serial, version, pack_state(layout.unflatten(buckets))

    def _backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


class SyncReceiver:
    """A generator's end: joins each epoch, receives into fresh buffers on the ``weights`` thread, and hands
    the newest staged publish to the sampling thread."""

    def __init__(self, dtype: torch.dtype, device: torch.device, state_shapes: dict):
        self.device = device
        self.layout = Layout.of(state_shapes, dtype)
        self.group, self.staged = None, None  # staged: (serial, version, buckets)
        self.lock = threading.Lock()
        self.stats = {"received": 0, "fallback_pulls": 0}

    def receive(self, epoch: int, address: str, port: int, rank: int, world: int, digest: str, serial: int,
                version: int, timeout_s: float) -> dict:
        t0 = time.perf_counter()
        if digest != self.layout.digest:
            raise ValueError(f"the learner's weight layout {digest} differs from this generator's {self.layout.digest} "
                             "(another model architecture or trainable set)")
        timeout = timedelta(seconds=timeout_s)
        try:
            if self.group is None or self.group.epoch != epoch:
                self.group = None
                store = BroadcastGroup.connect_store(address, port, world, timeout)
                backend = "nccl" if self.device.type == "cuda" else "gloo"
                self.group = BroadcastGroup(store, rank, world, backend, timeout, epoch)
            buckets = self.layout.empty(self.device)
            self.group.broadcast(buckets)
        except Exception as e:
            self.group = None
            return {"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:200]}"}
        with self.lock:
            if self.staged is None or self.staged[0] < serial:
                self.staged = (serial, version, buckets)
        self.stats["received"] += 1
        return {"ok": True, "seconds": time.perf_counter() - t0}

    def weights_for(self, handle: WeightsHandle, timeout_s: float) -> tuple[int, int, dict]:
        """(serial, version, state) at least as new as ``handle``: the staged broadcast, else the fallback pull."""
        with self.lock:
            staged = self.staged
        if staged is not None and staged[0] >= handle.serial:
            return staged[0], staged[1], self.layout.unflatten(staged[2])
        import ray

        serial, version, packed = ray.get(handle.source.sync_payload.options(concurrency_group="weights").remote(),
                                          timeout=timeout_s)
        if serial < handle.serial:
            raise RuntimeError(f"the learner holds publish {serial}, the request needs {handle.serial} (learner restarted?)")
        self.stats["fallback_pulls"] += 1
        return serial, version, unpack_state(packed)


# -- driver side -----------------------------------------------------------------------------------------
class CollectivePublisher:
    """Forms the broadcast group (learner rank 0 + live generators) and runs one broadcast per publish.

    ``members()`` lists the live generators as ``(key, actor handle)``; a key changes when a replica
    restarts (its pid), so a changed list, like any failure, starts a new epoch at the next publish.
    """

    def __init__(self, timeout_s: float, members: Callable[[], list[tuple[Any, Any]]]):
        self.timeout_s, self.members = timeout_s, members
        self.epoch, self.formed_with, self.broken = 0, None, True
        self.counters = {"epochs": 0, "failures": 0}
        self._rendezvous = None

    def reset(self) -> None:
        """After a learner rollback/restart: its side of the group is gone."""
        self.broken = True

    def publish(self, learner, serial: int, version: int, wait: Callable[[Any, float], Any]) -> dict:
        """Broadcast ``version`` from ``learner`` to the live generators; ``wait(ref, timeout)`` waits for a
        learner call (the controller's, which keeps the pipeline moving and turns a dead learner into a
        rollback). Returns the sender's report; a failed broadcast marks the group broken."""
        members = self.members()
        keys = [k for k, _ in members]
        world = len(members) + 1
        if self.broken or keys != self.formed_with:
            self.epoch += 1
            self.counters["epochs"] += 1
            self._rendezvous = wait(learner.sync_rendezvous.remote(world, self.timeout_s), self.timeout_s + 30)
            self.formed_with, self.broken = keys, False
        address, port, digest = self._rendezvous
        receives = [h.sync_receive.options(concurrency_group="weights").remote(
            self.epoch, address, port, rank, world, digest, serial, version, self.timeout_s)
            for rank, (_, h) in enumerate(members, start=1)]
        report = wait(learner.sync_send.remote(self.epoch, world, serial, version, self.timeout_s), 2 * self.timeout_s + 30)
        import ray

        done, _ = ray.wait(receives, num_returns=len(receives), timeout=self.timeout_s if report.get("ok") else 1.0)
        received = []
        for ref in done:
            try:
                received.append(ray.get(ref).get("ok", False))
            except Exception:  # a dead or restarted generator
                received.append(False)
        if not report.get("ok") or len(received) < len(receives) or not all(received):
            self.broken = True
            self.counters["failures"] += 1
            log.warning("weight broadcast of version %d failed (%s); generators that missed it fetch it from the learner",
                        version, report.get("error") or f"{sum(received)}/{len(receives)} generators received it")
        return report


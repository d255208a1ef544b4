"""Black-box rewards behind a network boundary: the machinery every remote client shares.

:class:`RemoteReward` holds what every remote client shares (the HTTP client in drpo_core/rewards/http.py, the gRPC client in
``services/rewards/grpc_reward/client.py`` and the flow_grpo client in ``services/rewards/flow_grpo_client.py``):

- batching by ``batch_size`` with at most ``max_concurrency`` batches in flight;
- a per-request deadline ``timeout_s`` and at most ``max_retries`` retries, with exponential back-off, of
  *transient* failures only (HTTP: connection errors, 429, 502, 503, 504). A deterministic failure
  (other 4xx, 500) is not retried: retrying a server-side bug forever is how flow_grpo's
  ``Retry(total=1000, status_forcelist=[500])`` turns a bug into a hang;
- any failure, malformed answer or non-finite score becomes NaN (a missing score) and is counted; the
  reward never raises on a server problem, so a bad server costs ranking signal, not the run;
- async I/O on a private event loop in a daemon thread, driven from the synchronous ``__call__``, so the
  same object works from a plain thread, from code already inside an event loop, and in a Ray actor
  (it pickles without its loop and connections, which are recreated on first use).

Under the Ray runtime the replica pool sets a :class:`~drpo_core.rewards.budget.CallBudget` around each call
(:meth:`RemoteReward.budgeted`): tries and a deadline shared with the pool's own re-issues.

``pop_stats()`` counters (since the last call): ``requests`` (attempts sent), ``retries`` (attempts
that repeated an earlier one), ``timeouts`` (attempts past the deadline), ``errors`` (batches given up
on, for any reason) and ``missing`` (candidates returned as NaN, whatever the cause).
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
import os
import random
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from drpo_core.rewards.budget import CallBudget

log = logging.getLogger("drpo.rewards.remote")

STAT_KEYS = ("requests", "errors", "timeouts", "retries", "missing")


class TransientFailure(Exception):
    """A failure worth retrying (the server or the path to it may recover)."""

    def __init__(self, reason: str, retry_after_s: float | None = None, timeout: bool = False):
        super().__init__(reason)
        self.retry_after_s, self.timeout = retry_after_s, timeout


class BatchFailure(Exception):
    """A failure that a retry would repeat: the batch is given up on and its candidates are missing."""

    def __init__(self, reason: str, timeout: bool = False):
        super().__init__(reason)
        self.timeout = timeout


@dataclass
class Batch:
    """Candidates ``start:stop`` of one call: images `[n, 3, H, W]` uint8, their prompts and metadata."""

    start: int
    stop: int
    images: torch.Tensor
    prompts: list[str]
    metadata: list


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """`[N, 3, H, W]` float in [0, 1] → uint8 on the CPU, rounded like PIL/torchvision image savers."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def encode_png(image: torch.Tensor, compression_level: int = 1) -> bytes:
    """`[3, H, W]` uint8 → PNG bytes (lossless, so the server scores exactly the candidate).

    Level 1 encodes about 3× faster than zlib's default 6 for ~1.4× the bytes at 512 px: on a cluster
    network the encoder, not the wire, is the bottleneck. Raise it for slow links.
    """
    from torchvision.io import encode_png as _encode

    return _encode(image.contiguous(), compression_level=compression_level).numpy().tobytes()


def as_score(value: Any) -> float:
    """A finite real number → float; anything else (null, NaN, ±inf, text, bool) → NaN."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


def token_from_env(token_env: str | None, label: str) -> str | None:
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"rewards[{label}].token_env: environment variable {token_env} is not set")
    return token


class RemoteReward:
    """Batching, concurrency, deadlines, retries and missing-score accounting for remote rewards.

    Subclasses implement ``_encode(batch) -> payload`` (runs in a worker thread), ``async _send(payload,
    n) -> list`` of ``n`` raw scores (raising :class:`TransientFailure` / :class:`BatchFailure`), and
    ``async _open()`` / ``async _aclose()`` for connections, which live on the private loop.
    """

    transport = "remote"

    def __init__(self, *, timeout_s: float = 30.0, max_retries: int = 3, batch_size: int = 64,
                 max_concurrency: int = 4, backoff_s: float = 0.2, max_backoff_s: float = 10.0,
                 png_compression_level: int = 1, label: str | None = None):
        if timeout_s <= 0 or batch_size < 1 or max_concurrency < 1 or max_retries < 0 or backoff_s < 0:
            raise ValueError(f"{type(self).__name__}: need timeout_s > 0, batch_size >= 1, max_concurrency >= 1, "
                             f"max_retries >= 0, backoff_s >= 0 (got {timeout_s}, {batch_size}, {max_concurrency}, "
                             f"{max_retries}, {backoff_s})")
        if not 0 <= png_compression_level <= 9:
            raise ValueError(f"{type(self).__name__}: png_compression_level must be 0..9, got {png_compression_level}")
        self.png_compression_level = int(png_compression_level)
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.batch_size, self.max_concurrency = int(batch_size), int(max_concurrency)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self.label = label or self.transport
        self._init_runtime()

    # -- the reward protocol ---------------------------------------------------------------------
    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        """`[N, 3, H, W]` in [0, 1] → scores `[N]` float32, NaN where the server gave no usable score."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
        n = images.shape[0]
        if len(prompts) != n or (metadata is not None and len(metadata) != n):
            raise ValueError(f"{n} images but {len(prompts)} prompts and "
                             f"{'no' if metadata is None else len(metadata)} metadata entries")
        scores = torch.full((n,), math.nan, dtype=torch.float32)
        if n == 0:
            return scores
        pixels, metadata = to_uint8(images), list(metadata) if metadata is not None else [None] * n
        self.last_attempts = 0
        batches = [Batch(i, min(i + self.batch_size, n), pixels[i:i + self.batch_size],
                         list(prompts[i:i + self.batch_size]), metadata[i:i + self.batch_size])
                   for i in range(0, n, self.batch_size)]
        for batch, values in zip(batches, self._run(self._score_batches(batches))):
            scores[batch.start:batch.stop] = torch.tensor(values, dtype=torch.float32)
        self._count("missing", int(torch.isnan(scores).sum()))
        return scores

    def pop_stats(self) -> dict[str, float]:
        with self._stats_lock:
            stats, self._stats = {k: float(v) for k, v in self._stats.items()}, dict.fromkeys(STAT_KEYS, 0)
        return stats

    @contextmanager
    def budgeted(self, budget: CallBudget | None):
        """Calls inside the block spend at most ``budget`` (tries per batch, deadline); ``last_attempts`` = the most
        tries any batch of the last call made."""
        self._budget = budget
        try:
            yield self
        finally:
            self._budget = None

    def close(self) -> None:
        """Close connections and stop the private loop (a later call starts a fresh one)."""
        loop, thread = self._loop, self._thread
        if loop is None or not loop.is_running():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._aclose(), loop).result(timeout=5)
        except Exception as e:  # closing is best effort; the thread is a daemon
            log.debug("closing %s: %r", self.label, e)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
        self._loop = self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Ray ships rewards to actors by pickling: drop the loop, thread and connections, rebuild lazily.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in self._runtime_keys():
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- machinery -------------------------------------------------------------------------------
    def _runtime_keys(self) -> tuple[str, ...]:
        return ("_loop", "_thread", "_loop_lock", "_stats", "_stats_lock", "_opened", "_budget", "last_attempts")

    def _init_runtime(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._loop_lock, self._stats_lock = threading.Lock(), threading.Lock()
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._opened = False
        self._budget: CallBudget | None = None
        self.last_attempts = 0

    def _count(self, key: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += amount

    def _run(self, coro):
        """Run ``coro`` on the private loop and wait: works whether or not the caller's thread has a loop."""
        with self._loop_lock:
            if self._loop is None or not self._thread.is_alive():
                self._loop, self._opened = asyncio.new_event_loop(), False
                self._thread = threading.Thread(target=self._loop.run_forever, name=f"drpo-reward-{self.label}",
                                                daemon=True)
                self._thread.start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _score_batches(self, batches: list[Batch]) -> list[list[float]]:
        if not self._opened:
            try:
                await self._open()
            except Exception as e:  # e.g. a malformed target: every candidate is missing, the run goes on
                return [self._give_up(b.stop - b.start, f"{self.label}: cannot connect ({type(e).__name__}: {e})")
                        for b in batches]
            self._opened = True
        in_flight = asyncio.Semaphore(self.max_concurrency)
        return await asyncio.gather(*(self._score_batch(b, in_flight) for b in batches))

    def _deadline_s(self) -> float:
        return self.timeout_s

    async def _score_batch(self, batch: Batch, in_flight: asyncio.Semaphore) -> list[float]:
        n, where = batch.stop - batch.start, f"{self.label}: candidates {batch.start}:{batch.stop}"
        async with in_flight:
            try:
                payload = await asyncio.to_thread(self._encode, batch)
            except Exception as e:  # e.g. metadata that JSON cannot carry: this batch only
                return self._give_up(n, f"{where}: cannot encode the request ({type(e).__name__}: {e})")
            budget = self._budget or CallBudget(self.max_retries + 1)
            tries = budget.tries(self.max_retries + 1)
            for attempt in range(tries):
                if budget.seconds_left() <= 0:  # the request's deadline (the pool's): no new try
                    return self._give_up(n, f"{where}: the request's deadline passed after {attempt} attempts")
                self._count("requests")
                self.last_attempts = max(self.last_attempts, attempt + 1)
                limit = min(self._deadline_s(), budget.seconds_left())
                try:
                    async with asyncio.timeout(limit):
                        values = await self._send(payload, n)
                    return [as_score(v) for v in values]
                except TimeoutError:
                    self._count("timeouts")
                    cut = " (the request's deadline)" if limit < self._deadline_s() else ""
                    return self._give_up(n, f"{where}: no answer within {min(limit, self.timeout_s):g}s{cut}")
                except TransientFailure as e:
                    self._count("timeouts", int(e.timeout))
                    if attempt == tries - 1:
                        return self._give_up(n, f"{where}: {e} (gave up after {attempt + 1} attempts)")
                    self._count("retries")
                    await asyncio.sleep(max(0.0, min(self._backoff_s(attempt, e.retry_after_s), budget.seconds_left())))
                except BatchFailure as e:
                    self._count("timeouts", int(e.timeout))
                    return self._give_up(n, f"{where}: {e}")
                except Exception as e:  # an unforeseen client-side error must not end the run either
                    return self._give_up(n, f"{where}: unexpected {type(e).__name__}: {e}")
        raise AssertionError("unreachable: the retry loop always returns")

    def _give_up(self, n: int, reason: str) -> list[float]:
        self._count("errors")
        log.warning("reward %s; %d candidates get no score", reason, n)
        return [math.nan] * n

    def _backoff_s(self, attempt: int, retry_after_s: float | None) -> float:
        # exponential with jitter (replicas that failed together do not retry together), at least what the
        # server asked for in Retry-After, never more than max_backoff_s
        wait = self.backoff_s * 2 ** attempt * random.uniform(0.5, 1.0)
        return min(self.max_backoff_s, max(wait, retry_after_s or 0.0))

    # -- transport hooks -------------------------------------------------------------------------
    def _encode(self, batch: Batch) -> Any:
        raise NotImplementedError

    async def _send(self, payload: Any, n: int) -> list:
        raise NotImplementedError

    async def _open(self) -> None:
        pass

    async def _aclose(self) -> None:
        pass

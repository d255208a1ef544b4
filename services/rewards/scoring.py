"""The transport-independent half of a reward server: limits, PNG decoding, the reward call, metrics.

Both front ends (JSON over HTTP in ``services/rewards/server.py``, gRPC in ``services/rewards/grpc_reward/server.py``)
hand :meth:`ScoringCore.score` the prompts, raw PNG bytes and metadata of one request and get back one
``float | None`` per image (None = the reward gave no finite score).
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ScoreRequestError(ValueError):
    """The client sent something the server will not score; ``too_large`` → HTTP 413, else 422."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


class RewardFailed(RuntimeError):
    """The reward itself raised or broke its contract (a server-side bug: HTTP 500, gRPC INTERNAL)."""


@dataclass(frozen=True)
class ServerLimits:
    max_images: int = 256            # images per request
    max_body_bytes: int = 64 << 20   # request body (HTTP) / message (gRPC)
    max_side: int = 2048             # pixels per image side, checked before decoding (no decompression bombs)


class RewardServerMetrics:
    """Prometheus metrics of one server, in their own registry (several servers may share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.requests = Counter("drpo_reward_server_requests", "Requests by transport, route and status",
                                ["transport", "route", "status"], registry=self.registry)
        self.latency = Histogram("drpo_reward_server_request_seconds", "Request latency",
                                 ["transport", "route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.images = Counter("drpo_reward_server_images_scored", "Images scored", registry=self.registry)
        self.missing = Counter("drpo_reward_server_missing_scores", "Images the reward gave no finite score",
                               registry=self.registry)

    def observe(self, transport: str, route: str, status: str, seconds: float) -> None:
        self.requests.labels(transport, route, status).inc()
        self.latency.labels(transport, route).observe(seconds)


def png_size(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding the pixels."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ScoreRequestError(f"{where} is not a PNG image")
    return struct.unpack(">II", data[16:24])


class ScoringCore:
    """Validates one request, decodes its PNGs and scores them with ``reward_fn``.

    Images of different sizes are scored in one reward call per size. Calls into the reward are
    serialised: a model reward on one device gains nothing from concurrent calls, and a reward need
    not be thread-safe. Decoding happens outside the lock, in the caller's thread.
    """

    def __init__(self, reward_fn, limits: ServerLimits = ServerLimits(), metrics: RewardServerMetrics | None = None):
        self.reward_fn, self.limits = reward_fn, limits
        self.metrics = metrics or RewardServerMetrics()
        self._reward_lock = threading.Lock()

    def check_counts(self, prompts: list, images: list, metadata: list | None) -> None:
        if len(images) > self.limits.max_images:
            raise ScoreRequestError(f"{len(images)} images in one request; the limit is {self.limits.max_images} "
                                    "(lower the client's batch_size)", too_large=True)
        if len(prompts) != len(images):
            raise ScoreRequestError(f"{len(prompts)} prompts for {len(images)} images; send one prompt per image")
        if metadata is not None and len(metadata) != len(images):
            raise ScoreRequestError(f"{len(metadata)} metadata entries for {len(images)} images; "
                                    "send one per image or none")

    def decode(self, data: bytes, where: str) -> torch.Tensor:
        """PNG bytes → `[3, H, W]` uint8 (grey and alpha PNGs are converted to RGB)."""
        from torchvision.io import ImageReadMode, decode_png

        width, height = png_size(data, where)
        if max(width, height) > self.limits.max_side or min(width, height) < 1:
            raise ScoreRequestError(f"{where} is {width}x{height} pixels; each side must be 1..{self.limits.max_side}",
                                    too_large=max(width, height) > self.limits.max_side)
        try:
            pixels = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise ScoreRequestError(f"{where} is not a valid PNG ({str(e).splitlines()[0][:80]})") from None
        if pixels.dtype == torch.uint16:  # 16-bit PNG: scale 0..65535 to 0..255, or the reward sees values up to 257
            pixels = ((pixels.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
        return pixels

    def score(self, prompts: list[str], pngs: list[bytes], metadata: list | None) -> list[float | None]:
        self.check_counts(prompts, pngs, metadata)
        pixels = [self.decode(data, f"images[{i}]") for i, data in enumerate(pngs)]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(pixels):
            by_size.setdefault(tuple(image.shape[1:]), []).append(i)
        scores: list[float | None] = [None] * len(pixels)
        for indices in by_size.values():
            images = torch.stack([pixels[i] for i in indices]).float() / 255.0
            subset = [metadata[i] for i in indices] if metadata is not None else None
            values = self._call_reward(images, [prompts[i] for i in indices], subset)
            for i, value in zip(indices, values.tolist()):
                scores[i] = value if math.isfinite(value) else None
        self.metrics.images.inc(len(scores))
        self.metrics.missing.inc(sum(s is None for s in scores))
        return scores

    def _call_reward(self, images: torch.Tensor, prompts: list[str], metadata: list | None) -> torch.Tensor:
        try:
            with self._reward_lock:
                values = torch.as_tensor(self.reward_fn(images, prompts, metadata), dtype=torch.float64).flatten()
        except Exception as e:
            raise RewardFailed(f"the reward raised {type(e).__name__}: {str(e)[:200]}") from e
        if values.shape[0] != images.shape[0]:
            raise RewardFailed(f"the reward returned {values.shape[0]} scores for {images.shape[0]} images")
        return values

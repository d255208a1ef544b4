"""``GrpcReward``: the reward protocol over ``drpo.reward.v1.RewardService`` (kind "grpc", url = host:port).

Same batching, concurrency, missing-score accounting and ``pop_stats`` as the HTTP client (both are a
:class:`drpo_core.rewards.remote.RemoteReward`). Each call carries a gRPC deadline of ``timeout_s``; only
UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED are retried (``max_retries`` times, exponential
back-off). UNAUTHENTICATED, INVALID_ARGUMENT, INTERNAL and the rest are deterministic and are not.
"""

from __future__ import annotations

import json

import grpc

from drpo_core.config import RewardConfig
from drpo_core.rewards.http import Batch, BatchFailure, RemoteReward, TransientFailure, encode_png, token_from_env
from services.rewards.grpc_reward import reward_pb2, reward_pb2_grpc

RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                         grpc.StatusCode.RESOURCE_EXHAUSTED})
MAX_MESSAGE_BYTES = 256 << 20
# the client-side asyncio deadline sits a little past the gRPC deadline, so that an expiry arrives as
# DEADLINE_EXCEEDED (retried, like the gRPC retry policy says) rather than as a local cancellation
DEADLINE_GRACE_S = 0.5


class GrpcReward(RemoteReward):
    """A reward served by ``drpo serve-reward --grpc``.

    Example::

        reward = GrpcReward("127.0.0.1:50051", timeout_s=5)
        scores = reward(images, prompts)          # [N] float32, NaN = missing
    """

    transport = "grpc"

    def __init__(self, target: str, token: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if "://" in target or ":" not in target:
            raise ValueError(f"GrpcReward: url must be host:port (no scheme), got {target!r}")
        self.target, self.token = target, token

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "GrpcReward":
        """Build from a ``rewards:`` entry; ``options`` may set ``backoff_s``, ``max_backoff_s`` and
        ``png_compression_level``."""
        try:
            return cls(cfg.url, token=token_from_env(cfg.token_env, cfg.label), timeout_s=cfg.timeout_s,
                       max_retries=cfg.max_retries, batch_size=cfg.batch_size, max_concurrency=cfg.max_concurrency,
                       label=cfg.label, **cfg.options)
        except TypeError as e:
            raise ValueError(f"rewards[{cfg.label}].options: {e}") from None

    def health(self) -> reward_pb2.HealthResponse:
        """The server's Health rpc (raises ``grpc.RpcError`` when it does not answer within ``timeout_s``)."""
        with grpc.insecure_channel(self.target) as channel:
            return reward_pb2_grpc.RewardServiceStub(channel).Health(reward_pb2.HealthRequest(), timeout=self.timeout_s)

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_channel", "_stub")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._channel = self._stub = None

    def _deadline_s(self) -> float:
        return self.timeout_s + DEADLINE_GRACE_S

    async def _open(self) -> None:
        # an aio channel belongs to the loop it was made on: the private loop of this reward
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        self._channel = grpc.aio.insecure_channel(self.target, options=options)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def _aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def _encode(self, batch: Batch) -> reward_pb2.ScoreRequest:
        metadata = [] if all(m is None for m in batch.metadata) else \
            [json.dumps(m, allow_nan=False) if m is not None else "" for m in batch.metadata]
        pngs = [encode_png(image, self.png_compression_level) for image in batch.images]
        return reward_pb2.ScoreRequest(prompts=batch.prompts, png_images=pngs, metadata_json=metadata)

    async def _send(self, request: reward_pb2.ScoreRequest, n: int) -> list:
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else None
        try:
            response = await self._stub.Score(request, timeout=self.timeout_s, metadata=auth)
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
            if e.code() in RETRY_CODES:
                raise TransientFailure(reason, timeout=e.code() == grpc.StatusCode.DEADLINE_EXCEEDED) from None
            raise BatchFailure(reason) from None
        if len(response.scores) != n or len(response.missing) not in (0, n):
            raise BatchFailure(f"answer has {len(response.scores)} scores and {len(response.missing)} missing flags "
                               f"for {n} images")
        missing = list(response.missing) or [False] * n
        return [None if gone else score for score, gone in zip(response.scores, missing)]

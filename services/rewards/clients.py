"""``build_reward`` for the services layer: the kinds whose clients the core must not import, then the core.

"grpc" needs grpcio (banned from ``drpo_core``) and "flow_grpo" unpickles server answers, so both are
built here; every other kind is delegated to :func:`drpo_core.rewards.build_reward`. Services pass this
function as the ``builder`` of :func:`drpo_core.training.trainer.build_rewards`.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from drpo_core.config import DrpoConfig, RewardConfig
from drpo_core.rewards import RewardFn
from drpo_core.rewards import build_reward as build_core_reward


def build_reward(cfg: RewardConfig) -> RewardFn:
    if cfg.kind == "grpc":
        from services.rewards.grpc_reward.client import GrpcReward

        return GrpcReward.from_config(cfg)
    if cfg.kind == "flow_grpo":
        from services.rewards.flow_grpo_client import FlowGrpoReward

        return FlowGrpoReward.from_config(cfg)
    return build_core_reward(cfg)


REMOTE_KINDS = ("http", "grpc", "flow_grpo")


def endpoint_of(cfg: RewardConfig) -> tuple[str, int]:
    """(host, port) of a remote reward's ``url``: ``http(s)://host[:port]/path`` or gRPC's ``host:port``."""
    url = cfg.url if "://" in cfg.url else f"grpc://{cfg.url}"
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError(f"rewards[{cfg.label}].url {cfg.url!r}: expected http(s)://host[:port]/path or host:port")
    return parts.hostname, port


def check_reward_endpoints(cfg: DrpoConfig, timeout_s: float = 5.0) -> None:
    """Fail at start-up, in one line, when a remote reward's server does not accept connections.

    Only a TCP connect (no request, no token sent): a server that is up but unhealthy is the client's
    business at run time (missing scores, counted). A run with no reachable reward would only log NaNs.
    """
    for reward in cfg.rewards:
        if reward.kind not in REMOTE_KINDS:
            continue
        host, port = endpoint_of(reward)
        try:
            with socket.create_connection((host, port), timeout=min(timeout_s, reward.timeout_s)):
                pass
        except OSError as e:
            why = e.strerror or type(e).__name__
            raise ValueError(f"rewards[{reward.label}].url {reward.url}: cannot connect to {host}:{port} ({why}); "
                             "start the reward server first") from None

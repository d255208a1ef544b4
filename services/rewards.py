"""``build_reward`` for the services layer: the kinds whose clients the core must not import, then the core.

"grpc" needs grpcio (banned from ``drpo_core``) and "flow_grpo" unpickles server answers, so both are
built here; every other kind is delegated to :func:`drpo_core.rewards.build_reward`. Services pass this
function as the ``builder`` of :func:`drpo_core.training.trainer.build_rewards`.
"""

from __future__ import annotations

from drpo_core.config import RewardConfig
from drpo_core.rewards import RewardFn
from drpo_core.rewards import build_reward as build_core_reward


def build_reward(cfg: RewardConfig) -> RewardFn:
    if cfg.kind == "grpc":
        from services.grpc_reward.client import GrpcReward

        return GrpcReward.from_config(cfg)
    if cfg.kind == "flow_grpo":
        from services.flow_grpo_reward import FlowGrpoReward

        return FlowGrpoReward.from_config(cfg)
    return build_core_reward(cfg)

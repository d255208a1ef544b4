"""Rewards across the network: ``server.py`` serves any reward over HTTP (JSON) or gRPC (``grpc_reward/``) on top of
``scoring.py``; ``clients.py`` builds the reward kinds whose clients ``drpo_core`` must not import (gRPC,
``flow_grpo_client.py``) and checks remote endpoints (docs/rewards.md)."""

"""gRPC front end of a reward server (``drpo serve-reward --grpc``): same limits, scoring and metrics as HTTP."""

from __future__ import annotations

import hmac
import json
import math
import signal
import sys
import threading
import time
from concurrent import futures

import grpc

from services.rewards.grpc_reward import reward_pb2, reward_pb2_grpc
from services.rewards.scoring import RewardFailed, RewardServerMetrics, ScoreRequestError, ScoringCore, ServerLimits


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    """Score: UNAUTHENTICATED on a missing/wrong token, INVALID_ARGUMENT on bad input, INTERNAL if the reward fails."""

    def __init__(self, core: ScoringCore, name: str, version: str | None, token: str | None):
        self.core, self.name, self.version, self.token = core, name, version or "", token

    def Score(self, request: reward_pb2.ScoreRequest, context: grpc.ServicerContext) -> reward_pb2.ScoreResponse:
        start, code, message = time.perf_counter(), grpc.StatusCode.UNKNOWN, ""
        try:
            self._check_token(context)
            metadata = self._metadata(request)
            scores = self.core.score(list(request.prompts), list(request.png_images), metadata)
            code = grpc.StatusCode.OK
            return reward_pb2.ScoreResponse(scores=[math.nan if s is None else s for s in scores],
                                            missing=[s is None for s in scores], reward=self.name, version=self.version)
        except PermissionError as e:
            code, message = grpc.StatusCode.UNAUTHENTICATED, str(e)
        except ScoreRequestError as e:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(e)
        except RewardFailed as e:
            code, message = grpc.StatusCode.INTERNAL, str(e)
        finally:
            self.core.metrics.observe("grpc", "Score", code.name, time.perf_counter() - start)
        context.abort(code, message)

    def Health(self, request: reward_pb2.HealthRequest, context) -> reward_pb2.HealthResponse:
        return reward_pb2.HealthResponse(status="SERVING", reward=self.name, version=self.version)

    def _check_token(self, context: grpc.ServicerContext) -> None:
        if self.token is None:
            return
        sent = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            raise PermissionError("missing or wrong bearer token")

    def _metadata(self, request: reward_pb2.ScoreRequest) -> list | None:
        if not request.metadata_json:
            return None
        entries = []
        for i, text in enumerate(request.metadata_json):
            try:
                entry = json.loads(text) if text else None
            except ValueError:
                raise ScoreRequestError(f"metadata_json[{i}] is not JSON") from None
            if entry is not None and not isinstance(entry, dict):
                raise ScoreRequestError(f"metadata_json[{i}] must be a JSON object or null")
            entries.append(entry)
        return entries


def build_grpc_server(reward_fn, *, name: str, version: str | None = None, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None, limits: ServerLimits = ServerLimits(),
                      metrics: RewardServerMetrics | None = None, max_workers: int = 8) -> tuple[grpc.Server, int]:
    """A started-ready (not yet started) server and the port it bound (``port=0`` picks a free one)."""
    core = ScoringCore(reward_fn, limits, metrics)
    options = [("grpc.max_receive_message_length", limits.max_body_bytes),
               ("grpc.max_send_message_length", limits.max_body_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="drpo-reward-grpc"),
                         options=options)
    server.core = core  # for tests and the metrics exporter
    reward_pb2_grpc.add_RewardServiceServicer_to_server(RewardServicer(core, name, version, token), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise ValueError(f"cannot listen on {host}:{port}; choose another --port")
    return server, bound


def serve_grpc(reward_fn, *, name: str, version: str | None, host: str, port: int, token: str | None,
               limits: ServerLimits, metrics_port: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then let in-flight calls finish (5 s grace).

    gRPC has no /metrics route: with ``metrics_port`` the Prometheus text is served on that port.
    """
    server, bound = build_grpc_server(reward_fn, name=name, version=version, host=host, port=port, token=token,
                                      limits=limits)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=host, registry=server.core.metrics.registry)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    print(f"drpo: serving reward {name!r} over gRPC at {host}:{bound} (drpo.reward.v1.RewardService"
          f"{', bearer token required' if token else ''})", file=sys.stderr, flush=True)
    stop.wait()
    server.stop(grace=5).wait()

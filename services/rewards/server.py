"""Serve any reward callable over the project's JSON protocol (FastAPI) or gRPC: ``drpo serve-reward``.

    POST /score     ScoreRequest → ScoreResponse        (Authorization: Bearer <token> when a token is set)
    GET  /healthz   HealthResponse                      (no token: for probes)
    GET  /metrics   Prometheus text                     (no token: for scrapers)
    GET  /openapi.json

Status codes: 401 missing/wrong token, 413 body or image count or image side over the limit, 422 a
malformed request (one-line ``detail`` naming the field), 500 the reward itself failed. The client
(``drpo_core/rewards/http.py``) retries none of these.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import socket
import sys
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from drpo_core.config import RewardConfig
from services.rewards.scoring import RewardFailed, RewardServerMetrics, ScoreRequestError, ScoringCore, ServerLimits

ROUTES = ("/score", "/healthz", "/metrics", "/openapi.json")


class ScoreRequest(BaseModel):
    """One batch to score: ``images[i]`` is a candidate for ``prompts[i]``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompts": ["a photo of a red car"], "images": ["iVBORw0KGgo..."], "metadata": [None]}]})
    prompts: list[str] = Field(description="one text prompt per image")
    images: list[str] = Field(description="base64-encoded PNG images (RGB, grey or RGBA), one per prompt")
    metadata: list[dict[str, Any] | None] | None = Field(
        None, description="optional per-image metadata object (e.g. a GenEval record), one per image or omitted")


class ScoreResponse(BaseModel):
    scores: list[float | None] = Field(description="one score per image, in request order; null = no score")
    reward: str = Field(description="name of the reward that produced the scores")
    version: str | None = Field(None, description="version of that reward (scores of two versions are not comparable)")


class HealthResponse(BaseModel):
    status: str = "ok"
    reward: str
    version: str | None = None


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line saying what is wrong")


class BodySizeLimit:
    """ASGI middleware: 413 for bodies over ``max_bytes``, by Content-Length or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse({"detail": self._message(int(declared))}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI passes an HTTPException raised while reading through
                raise HTTPException(413, self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return (f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes; "
                "lower the client's batch_size")


def validation_message(exc: RequestValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def create_app(reward_fn, *, name: str, version: str | None = None, token: str | None = None,
               limits: ServerLimits = ServerLimits(), metrics: RewardServerMetrics | None = None) -> FastAPI:
    """A FastAPI app serving ``reward_fn`` (any reward-protocol callable) at ``POST /score``."""
    core = ScoringCore(reward_fn, limits, metrics)
    app = FastAPI(title=f"drpo reward server: {name}", version="1",
                  description="Scores text-to-image candidates for DrPO. JSON in, JSON out; images as base64 PNG.")
    app.state.core = core
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="set when the server was started with --token-env")

    def check_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is not None and (credentials is None or not hmac.compare_digest(credentials.credentials, token)):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.middleware("http")
    async def record_metrics(request: Request, call_next):
        start, route = time.perf_counter(), request.url.path if request.url.path in ROUTES else "other"
        status = "500"
        try:
            response = await call_next(request)
            status = str(response.status_code)
            return response
        finally:
            core.metrics.observe("http", route, status, time.perf_counter() - start)

    @app.exception_handler(RequestValidationError)
    async def one_line_422(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc)}, status_code=422)

    errors = {code: {"model": ErrorResponse, "description": text} for code, text in
              [(401, "missing or wrong bearer token"), (413, "body, image count or image size over the limit"),
               (422, "malformed request"), (500, "the reward failed")]}

    # the security scheme appears in the OpenAPI spec only when a token is actually required
    @app.post("/score", response_model=ScoreResponse, responses=errors,
              dependencies=[Depends(check_token)] if token is not None else [])
    def score(request: ScoreRequest) -> ScoreResponse:
        # a plain def: FastAPI runs it in its thread pool, so decoding and scoring never block the event loop
        try:
            core.check_counts(request.prompts, request.images, request.metadata)
            pngs = [_b64decode(data, f"images[{i}]") for i, data in enumerate(request.images)]
            scores = core.score(request.prompts, pngs, request.metadata)
        except ScoreRequestError as e:
            raise HTTPException(413 if e.too_large else 422, str(e)) from None
        except RewardFailed as e:
            raise HTTPException(500, str(e)) from None
        return ScoreResponse(scores=scores, reward=name, version=version)

    @app.get("/healthz", response_model=HealthResponse)
    def healthz() -> HealthResponse:
        return HealthResponse(reward=name, version=version)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics_text() -> Response:
        return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _b64decode(data: str, where: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ScoreRequestError(f"{where} is not valid base64") from None


# -- drpo serve-reward -----------------------------------------------------------------------------
def reward_config_from_cli(kind: str, overrides: list[str]) -> RewardConfig:
    """``--reward KIND --set key=value ...`` → a validated RewardConfig (raises ConfigError, one line)."""
    from pydantic import ValidationError

    from drpo_core.config import ConfigError, format_validation_error
    from drpo_core.config.overrides import _apply_override

    tree: dict = {"kind": kind}
    for assignment in overrides:
        tree = _apply_override(tree, assignment)
    try:
        return RewardConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"reward {format_validation_error(e)}") from None


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"{option} {port}: not a TCP port (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}); choose another {option}") from None


def serve_reward(cfg: RewardConfig, host: str, port: int, token_env: str | None = None, use_grpc: bool = False,
                 limits: ServerLimits = ServerLimits(), metrics_port: int | None = None) -> None:
    """Build the reward of ``cfg`` and serve it until interrupted (raises ValueError on a user error).

    ``metrics_port`` (gRPC only; HTTP serves /metrics itself) exports the Prometheus metrics there.
    """
    from services.rewards.clients import build_reward

    token = os.environ.get(token_env) if token_env else None
    if token_env and not token:
        raise ValueError(f"--token-env: environment variable {token_env} is not set")
    if metrics_port is not None and not use_grpc:
        raise ValueError("--metrics-port is for --grpc; the HTTP server serves /metrics on its own port")
    for needed, option in ((port, "--port"), (metrics_port, "--metrics-port")):  # before building the reward (a large model)
        if needed is not None:
            check_port_free(host, needed, option)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"drpo: warning: serving on {host} without --token-env: anyone who can reach the port can use it",
              file=sys.stderr, flush=True)
    reward_fn = build_reward(cfg)
    version = getattr(reward_fn, "version", None)
    if use_grpc:
        from services.rewards.grpc_reward.server import serve_grpc

        return serve_grpc(reward_fn, name=cfg.label, version=version, host=host, port=port, token=token, limits=limits,
                          metrics_port=metrics_port)
    import uvicorn

    app = create_app(reward_fn, name=cfg.label, version=version, token=token, limits=limits)
    print(f"drpo: serving reward {cfg.label!r} over HTTP at http://{host}:{port}/score (health /healthz, "
          f"metrics /metrics{', bearer token required' if token else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)

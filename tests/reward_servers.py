"""Real servers on 127.0.0.1 for the reward-transport tests: our own app, a misbehaving one, a flow_grpo one.

Every server here runs in a daemon thread of the test process on a port the OS picked, and stops when its
context manager exits; nothing outlives a test module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import pickle
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request, Response

from drpo_core.rewards.hue import HueFractionReward
from services.rewards.scoring import ScoringCore


def exact_images(n: int, side: int = 16, seed: int = 0) -> torch.Tensor:
    """`[n, 3, side, side]` images whose values are exact multiples of 1/255 (PNG carries them losslessly)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, side, side), generator=gen).float() / 255.0


@contextlib.contextmanager
def uvicorn_server(app):
    """Serve ``app`` on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FaultyServer:
    """A JSON reward server that misbehaves in the way its route names say; it counts every request.

    ``/ok`` scores with the hue reward; ``/sleep`` answers after 2 s; ``/status/<code>`` always answers
    that code; ``/flaky`` answers 503 to the first copy of each distinct body and scores the second;
    ``/garbage`` answers 200 with text that is not JSON; ``/short`` one score too few; ``/weird`` a fixed
    mix of valid and invalid score values; ``/slow`` scores after 0.1 s and records peak concurrency.
    """

    WEIRD = '{"scores": [0.25, null, NaN, "0.7", true, Infinity, 0.5, {"x": 1}]}'
    WEIRD_VALID = {0: 0.25, 6: 0.5}

    def __init__(self):
        self.hits: Counter = Counter()
        self.seen: set[str] = set()
        self.in_flight = self.peak_in_flight = 0
        self.core = ScoringCore(HueFractionReward())
        self.app = self._build()

    def score(self, body: dict) -> dict:
        pngs = [base64.b64decode(s) for s in body["images"]]
        return {"scores": self.core.score(body["prompts"], pngs, body.get("metadata"))}

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/{mode}")
        @app.post("/{mode}/{code}")
        async def handle(mode: str, request: Request, code: int = 0):
            body = await request.body()
            self.hits[mode] += 1
            if mode == "sleep":
                await asyncio.sleep(2.0)
            elif mode == "status":
                return Response(json.dumps({"detail": f"forced {code}"}), status_code=code,
                                headers={"retry-after": "0"}, media_type="application/json")
            elif mode == "flaky":
                key = hashlib.sha256(body).hexdigest()
                if key not in self.seen:
                    self.seen.add(key)
                    return Response("busy", status_code=503, headers={"retry-after": "0"})
            elif mode == "garbage":
                return Response("<html>not json{", media_type="application/json")
            elif mode == "short":
                return {"scores": self.score(json.loads(body))["scores"][:-1]}
            elif mode == "weird":
                return Response(self.WEIRD, media_type="application/json")
            elif mode == "slow":
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                await asyncio.sleep(0.1)
                self.in_flight -= 1
            return self.score(json.loads(body))

        return app


class FlowGrpoStyleServer:
    """A tiny server of flow_grpo's reward-server format: pickled dict in, pickled dict out, 500 + traceback.

    Like yifan123/reward-server's Flask apps, it reads ``images`` (JPEG bytes) and ``meta_datas``; it
    scores with the hue reward using ``prompts`` and answers ``{"scores": np.ndarray, ...}``. ``mode``
    switches it to answering a malicious pickle, a 500 with a traceback, or an error dict.
    """

    def __init__(self):
        self.mode, self.requests, self.last_body = "ok", 0, None
        self.reward = HueFractionReward()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                outer.requests += 1
                data = self.rfile.read(int(self.headers["Content-Length"]))
                status, answer = outer.answer(data)
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def answer(self, data: bytes) -> tuple[int, bytes]:
        from torchvision.io import decode_jpeg

        body = pickle.loads(data)  # the test server trusts its client, like the real ones do
        self.last_body = body
        if self.mode == "traceback":
            return 500, b"Traceback (most recent call last):\n  ...\nKeyError: 'meta_datas'"
        if self.mode == "error":
            return 200, pickle.dumps({"error": "detector crashed"})
        if self.mode == "malicious":
            return 200, pickle.dumps(_Exploit())
        images = torch.stack([decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in body["images"]])
        scores = self.reward(images.float() / 255.0, list(body["prompts"]), body["meta_datas"])
        return 200, pickle.dumps({"scores": scores.numpy().astype(np.float32), "strict_rewards": [0] * len(scores)})

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Exploit:
    """Unpickles into ``exec("print('pwned')")``: visible proof of code execution if it is ever loaded.

    (``exec`` rather than ``print`` itself: importing Ray can swap ``builtins.print`` for its own.)
    """

    def __reduce__(self):
        return (exec, ("print('pwned')",))


class MetadataEchoReward:
    """A reward whose score is ``metadata["target"]`` (NaN without metadata): proves metadata arrives intact."""

    version = "echo-v1"

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list | None = None) -> torch.Tensor:
        metadata = metadata or [None] * images.shape[0]
        return torch.tensor([float(m["target"]) if m else float("nan") for m in metadata])

"""Retry-After from a real server on 127.0.0.1: the client waits at least what the server asks, never more
than ``max_backoff_s``, and accepts both forms of the header (seconds and HTTP-date)."""

from __future__ import annotations

import email.utils
import time

import pytest
from fastapi import FastAPI, Request, Response

from drpo_core.rewards.http import HttpReward
from tests.reward_servers import exact_images, uvicorn_server

PROMPTS = ["a photo of a red car", "a photo of a blue cup"]


class BusyOnceServer:
    """Answers 503 with ``Retry-After: <delay>`` (as seconds or an HTTP-date) to the first request, then scores 0.5 each.

    It records when each request arrived, so the test measures the client's wait on the server's clock.
    """

    def __init__(self):
        self.arrivals: list[float] = []
        self.app = FastAPI()

        @self.app.post("/busy")
        async def busy(request: Request, delay: float, form: str):
            body = await request.json()
            self.arrivals.append(time.monotonic())
            if len(self.arrivals) == 1:
                # an HTTP-date is written when the answer is sent, as a real server would
                value = f"{delay:g}" if form == "seconds" else email.utils.formatdate(time.time() + delay, usegmt=True)
                return Response("busy", status_code=503, headers={"retry-after": value})
            return {"scores": [0.5] * len(body["prompts"])}

    def gap_s(self) -> float:
        assert len(self.arrivals) == 2, self.arrivals
        return self.arrivals[1] - self.arrivals[0]


def score_after_one_503(delay: float, form: str = "seconds", **client_kwargs) -> tuple[BusyOnceServer, float, list[float]]:
    server = BusyOnceServer()
    with uvicorn_server(server.app) as url:
        kwargs = {"timeout_s": 5.0, "max_retries": 1, "batch_size": 8, "backoff_s": 0.001, **client_kwargs}
        start = time.monotonic()
        with HttpReward(f"{url}/busy?delay={delay}&form={form}", **kwargs) as reward:
            scores = reward(exact_images(2), PROMPTS).tolist()
        return server, time.monotonic() - start, scores


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured(form):
    # back-off alone would wait ~1 ms; the server asks for 1.2 s (an HTTP-date has 1 s resolution: 2 s, ≥ 1 s left)
    server, _, scores = score_after_one_503(1.2 if form == "seconds" else 2.0, form, max_backoff_s=10.0)
    assert scores == [0.5, 0.5]
    assert server.gap_s() >= 1.0


def test_retry_after_is_capped_by_max_backoff():
    # a server asking for 30 s must not stall the run: the client waits max_backoff_s at most
    server, elapsed, scores = score_after_one_503(30, max_backoff_s=0.3)
    assert scores == [0.5, 0.5]
    assert 0.25 <= server.gap_s() < 2.0 and elapsed < 5.0

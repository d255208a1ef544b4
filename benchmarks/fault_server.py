"""A real reward server on 127.0.0.1 (JSON protocol, hue reward) that misbehaves on demand, for fault injection.

``arm(fault)`` queues one fault; the next ``/score`` request gets it, later ones are answered normally. Faults:

    hang       answer after ``hang_s`` (past the client's deadline)      → batch missing, not retried
    500        HTTP 500                                                → batch missing, not retried
    503        HTTP 503 with Retry-After: 1                            → retried, scores as without the fault
    garbage    200 with a body that is not JSON                        → batch missing
    short      200 with one score too few                              → batch missing
    nan        200 with NaN as the first score                         → that candidate missing
    drop       200 headers, half the body, then the connection closes  → retried, scores as without the fault
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections import Counter

from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

from drpo_core.rewards.hue import HueFractionReward
from services.rewards.scoring import ScoringCore

FAULTS = ("hang", "500", "503", "garbage", "short", "nan", "drop")
RETRIED = {"503", "drop"}  # faults that only delay: the run must end with the fault-free weights


class FaultyRewardServer:
    def __init__(self, hang_s: float = 4.0):
        self.core, self.hang_s = ScoringCore(HueFractionReward()), hang_s
        self.armed: list[str] = []
        self.fired: Counter = Counter()
        self.lock = threading.Lock()
        self.app = self._build()

    def arm(self, fault: str) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        with self.lock:
            self.armed.append(fault)

    def _next_fault(self) -> str | None:
        with self.lock:
            if not self.armed:
                return None
            fault = self.armed.pop(0)
            self.fired[fault] += 1
            return fault

    def _scores(self, body: dict) -> list:
        pngs = [base64.b64decode(s) for s in body["images"]]
        return self.core.score(body["prompts"], pngs, body.get("metadata"))

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/healthz")
        async def healthz():
            return {"status": "ok", "reward": "hue_fraction"}

        @app.post("/score")
        async def score(request: Request):
            body = json.loads(await request.body())
            fault = self._next_fault()
            if fault == "hang":
                await asyncio.sleep(self.hang_s)
            elif fault in ("500", "503"):
                return Response('{"detail": "injected"}', status_code=int(fault), media_type="application/json",
                                headers={"retry-after": "1"} if fault == "503" else {})
            elif fault == "garbage":
                return Response("<html>oops", media_type="application/json")
            scores = await asyncio.to_thread(self._scores, body)
            if fault == "short":
                scores = scores[:-1]
            elif fault == "nan":
                text = json.dumps({"scores": scores}).replace("[", "[NaN, ", 1)
                text = text.replace(json.dumps(scores[0]) + ", ", "", 1) if scores else text
                return Response(text, media_type="application/json")
            elif fault == "drop":
                payload = json.dumps({"scores": scores}).encode()

                async def half_then_close():
                    yield payload[: len(payload) // 2]
                    raise ConnectionResetError("injected: connection dropped mid-response")

                return StreamingResponse(half_then_close(), media_type="application/json")
            return {"scores": scores}

        return app

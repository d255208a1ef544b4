"""The JSON-over-HTTP reward client (:class:`HttpReward`); the shared machinery (batching, deadlines, retries
within a budget, missing scores) is :class:`~drpo_core.rewards.remote.RemoteReward`.

The project's own wire protocol (JSON, never pickle)::

    POST <url>     {"prompts": [str], "images": [base64 PNG], "metadata": [object | null]}
      → 200        {"scores": [number | null], ...}         same length as the request; null = no score
    GET  /healthz  → 200 {"status": "ok", ...}
    Authorization: Bearer <token>                            optional
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import json

import httpx

from drpo_core.config import RewardConfig
from drpo_core.rewards.remote import (STAT_KEYS, Batch, BatchFailure, RemoteReward, TransientFailure,  # noqa: F401 (re-exported)
                                      as_score, encode_png, to_uint8, token_from_env)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


class HttpReward(RemoteReward):
    """A reward served over the project's JSON protocol (see the module docstring).

    Example::

        reward = HttpReward("http://127.0.0.1:8000/score", timeout_s=5, batch_size=32)
        scores = reward(images, prompts)          # [N] float32, NaN = missing
        reward.pop_stats()                        # {"requests": 2.0, "errors": 0.0, ...}
    """

    transport = "http"
    content_type = "application/json"

    def __init__(self, url: str, token: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{type(self).__name__}: url must start with http:// or https://, got {url!r}")
        self.url, self.token = url, token
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_config(cls, cfg: RewardConfig, **extra) -> "HttpReward":
        """Build from a ``rewards:`` entry; ``options`` may set ``backoff_s``, ``max_backoff_s`` and
        ``png_compression_level``."""
        try:
            return cls(cfg.url, token=token_from_env(cfg.token_env, cfg.label), timeout_s=cfg.timeout_s,
                       max_retries=cfg.max_retries, batch_size=cfg.batch_size, max_concurrency=cfg.max_concurrency,
                       label=cfg.label, **extra, **cfg.options)
        except TypeError as e:
            raise ValueError(f"rewards[{cfg.label}].options: {e}") from None

    def health(self) -> dict:
        """``GET /healthz`` on the server's origin (raises ``httpx.HTTPError`` if it is not healthy)."""
        origin = httpx.URL(self.url).copy_with(path="/healthz", query=None)
        response = httpx.get(origin, timeout=self.timeout_s)
        response.raise_for_status()
        return response.json()

    def _runtime_keys(self) -> tuple[str, ...]:
        return (*super()._runtime_keys(), "_client")

    def _init_runtime(self) -> None:
        super()._init_runtime()
        self._client = None

    async def _open(self) -> None:
        headers = {"content-type": self.content_type}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        self._client = httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(self.timeout_s))

    async def _aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _encode(self, batch: Batch) -> bytes:
        images = [base64.b64encode(encode_png(image, self.png_compression_level)).decode("ascii")
                  for image in batch.images]
        body = {"prompts": batch.prompts, "images": images, "metadata": batch.metadata}
        return json.dumps(body, allow_nan=False).encode()

    async def _send(self, payload: bytes, n: int) -> list:
        try:
            response = await self._client.post(self.url, content=payload)
        except (httpx.ConnectTimeout, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise TransientFailure(f"connection to {self.url} failed ({type(e).__name__}: {e})") from None
        except httpx.TimeoutException:
            raise BatchFailure(f"no answer within {self.timeout_s:g}s", timeout=True) from None
        if response.status_code in RETRY_STATUSES:
            raise TransientFailure(f"HTTP {response.status_code}", retry_after_s=_retry_after_s(response))
        if response.status_code != 200:
            raise BatchFailure(f"HTTP {response.status_code}: {_detail(response)}")
        return self._parse(response.content, n)

    def _parse(self, content: bytes, n: int) -> list:
        try:
            answer = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            raise BatchFailure(f"answer is not JSON: {content[:80]!r}") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list):
            raise BatchFailure(f"answer has no 'scores' list: {str(answer)[:80]}")
        if len(scores) != n:
            raise BatchFailure(f"answer has {len(scores)} scores for {n} images")
        return scores


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds the server asked us to wait (RFC 9110 §10.2.3: delay-seconds or an HTTP-date), None if absent/invalid."""
    value = response.headers.get("retry-after", "").strip()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail).replace("\n", " ")[:200]

"""Property-based fuzzing (hypothesis) of the JSON reward protocol on both sides.

Client (``drpo_core/rewards/http.py``): whatever bytes a server answers, parsing gives exactly n scores or a
BatchFailure (the batch becomes missing) — never another exception, never a non-finite score; whatever a
Retry-After header holds, the wait is a finite number in [0, max_backoff_s].
Server (``services/rewards/server.py``, the real FastAPI app in-process): whatever JSON or bytes a client
posts, the answer is 200 with one finite-or-null score per image, or 400/413/422 with a one-line detail —
never a 500 (a 500 would mean the server, not the client, is broken).
"""

from __future__ import annotations

import base64
import json
import math

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drpo_core.rewards.http import BatchFailure, HttpReward, _retry_after_s, as_score, encode_png
from drpo_core.rewards.hue import HueFractionReward
from services.rewards.scoring import ServerLimits
from services.rewards.server import create_app
from tests.reward_servers import exact_images

JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def reward() -> HttpReward:
    client = HttpReward("http://127.0.0.1:9/score", timeout_s=1.0, max_retries=0, backoff_s=0.01, max_backoff_s=2.0)
    yield client
    client.close()


def check_parse(reward: HttpReward, content: bytes, n: int) -> None:
    try:
        values = reward._parse(content, n)
    except BatchFailure as e:
        assert "\n" not in str(e)
        return
    assert len(values) == n
    for v in values:
        score = as_score(v)
        assert math.isnan(score) or math.isfinite(score)


@FUZZ
@given(content=st.binary(max_size=200), n=st.integers(0, 5))
def test_client_parses_arbitrary_bytes_into_n_scores_or_a_batch_failure(reward, content, n):
    check_parse(reward, content, n)


@FUZZ
@given(scores=st.lists(JSON_VALUES, max_size=6), extra=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
       n=st.integers(0, 6), wrap=st.sampled_from(["object", "list", "bare"]))
def test_client_parses_arbitrary_json_answers_into_n_scores_or_a_batch_failure(reward, scores, extra, n, wrap):
    answer = {**extra, "scores": scores} if wrap == "object" else [scores] if wrap == "list" else scores
    check_parse(reward, json.dumps(answer).encode(), n)  # json.dumps writes NaN/Infinity, as a sloppy server might


@FUZZ
@given(header=st.text(max_size=40) | st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{0,6})?\Z"),
       attempt=st.integers(0, 30))
def test_client_back_off_is_finite_and_capped_whatever_retry_after_says(reward, header, attempt):
    try:
        response = httpx.Response(503, headers={"retry-after": header})
    except (UnicodeEncodeError, ValueError):  # not a header httpx can carry at all
        return
    wait = reward._backoff_s(attempt, _retry_after_s(response))
    assert 0.0 <= wait <= reward.max_backoff_s


@pytest.fixture(scope="module")
def server() -> TestClient:
    limits = ServerLimits(max_images=8, max_body_bytes=50_000, max_side=32)
    with TestClient(create_app(HueFractionReward(), name="hue", limits=limits), raise_server_exceptions=False) as client:
        yield client


def assert_well_formed(answer: httpx.Response, n_images: int | None) -> None:
    assert answer.status_code in (200, 400, 413, 422), (answer.status_code, answer.text[:300])
    body = answer.json()
    if answer.status_code == 200:
        assert n_images is not None and len(body["scores"]) == n_images
        assert all(s is None or math.isfinite(s) for s in body["scores"])
    else:
        assert isinstance(body["detail"], str) and "\n" not in body["detail"]


PNG = base64.b64encode(encode_png((exact_images(1, 8)[0] * 255).byte())).decode()
IMAGE_STRINGS = st.sampled_from([PNG, "", "%%%", "AAAA", base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20).decode()]) | st.text(max_size=12)


@FUZZ
@given(prompts=st.lists(st.text(max_size=20), max_size=4), images=st.lists(IMAGE_STRINGS, max_size=4),
       metadata=st.none() | st.lists(st.none() | st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=2), max_size=4))
def test_server_answers_well_formed_requests_with_scores_or_one_line_422(server, prompts, images, metadata):
    body = {"prompts": prompts, "images": images}
    if metadata is not None:
        body["metadata"] = metadata
    answer = server.post("/score", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_well_formed(answer, len(images) if len(prompts) == len(images) else None)


@FUZZ
@given(body=JSON_VALUES | st.dictionaries(st.sampled_from(["prompts", "images", "metadata", "x"]), JSON_VALUES, max_size=4))
def test_server_answers_arbitrary_json_without_a_500(server, body):
    answer = server.post("/score", content=json.dumps(body), headers={"content-type": "application/json"})
    assert_well_formed(answer, len(body["images"]) if isinstance(body, dict) and isinstance(body.get("images"), list) else None)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_server_answers_arbitrary_bytes_without_a_500(server, raw):
    answer = server.post("/score", content=raw, headers={"content-type": "application/json"})
    assert_well_formed(answer, None)

"""HTTP reward transport: JSON server ↔ HttpReward round trips, fault handling, server checks, CLI, flow_grpo."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from drpo_core.config import RewardConfig
from drpo_core.rewards import build_reward as build_core_reward
from drpo_core.rewards.hue import HueFractionReward
from drpo_core.rewards.http import HttpReward, encode_png
from services.rewards.flow_grpo_client import FlowGrpoReward
from services.rewards.scoring import ServerLimits
from services.rewards.server import create_app
from services.rewards.clients import build_reward
from tests.reward_servers import (FaultyServer, FlowGrpoStyleServer, MetadataEchoReward, exact_images, free_port,
                                  uvicorn_server)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird", "a cat"]  # "a cat": no colour


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


@pytest.fixture(scope="module")
def hue_server():
    reward = HueFractionReward()
    limits = ServerLimits(max_images=16, max_body_bytes=200_000, max_side=64)
    with uvicorn_server(create_app(reward, name="hue_fraction", version=reward.version, limits=limits)) as url:
        yield url


@pytest.fixture(scope="module")
def token_server():
    with uvicorn_server(create_app(HueFractionReward(), name="hue_fraction", token="s3cret")) as url:
        yield url


@pytest.fixture(scope="module")
def faulty():
    server = FaultyServer()
    with uvicorn_server(server.app) as url:
        server.url = url
        yield server


def client(url: str, **kwargs) -> HttpReward:
    kwargs = {"timeout_s": 5.0, "max_retries": 2, "batch_size": 8, "backoff_s": 0.01, **kwargs}
    return HttpReward(url, **kwargs)


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_equals_in_process_scores_and_keeps_missing(hue_server):
    images, prompts = exact_images(11), prompts_for(11)
    with client(f"{hue_server}/score", batch_size=4) as reward:
        remote = reward(images, prompts, [{"i": i} for i in range(11)])
        stats = reward.pop_stats()
    local = HueFractionReward()(images, prompts)
    torch.testing.assert_close(remote, local, equal_nan=True)
    assert remote.dtype == torch.float32 and torch.isnan(remote).sum() == 2  # the two colourless prompts
    assert stats == {"requests": 3.0, "errors": 0.0, "timeouts": 0.0, "retries": 0.0, "missing": 2.0}
    assert reward.pop_stats()["requests"] == 0  # counters are per step


def test_any_reward_callable_is_served_and_metadata_arrives_intact():
    metadata = [{"target": 0.5, "nested": {"k": [1, 2]}}, None, {"target": -3}]
    with uvicorn_server(create_app(MetadataEchoReward(), name="echo")) as url, client(f"{url}/score") as reward:
        scores = reward(exact_images(3), prompts_for(3), metadata)
    assert scores[0] == 0.5 and math.isnan(scores[1]) and scores[2] == -3


def test_batching_and_concurrency_do_not_change_scores(hue_server):
    images, prompts = exact_images(10, seed=3), prompts_for(10)
    with client(f"{hue_server}/score", batch_size=1, max_concurrency=3) as one, \
            client(f"{hue_server}/score", batch_size=8, max_concurrency=1) as eight:
        by_one, by_eight = one(images, prompts), eight(images, prompts)
        assert one.pop_stats()["requests"] == 10 and eight.pop_stats()["requests"] == 2
    torch.testing.assert_close(by_one, by_eight, equal_nan=True)
    assert not torch.isnan(by_one[:3]).any()


def test_concurrency_is_bounded(faulty):
    with client(f"{faulty.url}/slow", batch_size=1, max_concurrency=2) as reward:
        reward(exact_images(6), prompts_for(6))
    assert faulty.peak_in_flight == 2


def test_works_from_plain_threads_and_from_inside_a_running_event_loop(hue_server):
    images, prompts = exact_images(6, seed=5), prompts_for(6)
    expected = HueFractionReward()(images, prompts)
    reward = client(f"{hue_server}/score", batch_size=2)
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(reward(images, prompts))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    async def inside_a_loop():  # an async Ray actor calls rewards like this
        return reward(images, prompts)

    results.append(asyncio.run(inside_a_loop()))
    reward.close()
    assert len(results) == 4
    for scores in results:
        torch.testing.assert_close(scores, expected, equal_nan=True)


def test_survives_pickling_with_a_live_connection(hue_server):
    import pickle

    images, prompts = exact_images(3), prompts_for(3)
    with client(f"{hue_server}/score") as reward:
        first = reward(images, prompts)
        copy = pickle.loads(pickle.dumps(reward))  # what Ray does when it ships a reward to an actor
    with copy:
        torch.testing.assert_close(copy(images, prompts), first, equal_nan=True)


def test_works_inside_a_ray_actor(hue_server):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        # address="local": always a private cluster, never one that another process left running
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}})
    try:
        @ray.remote
        class RewardActor:  # the reward is pickled into the actor, as a reward worker would receive it
            def __init__(self, reward):
                self.reward = reward

            def score(self, images, prompts):
                return self.reward(images, prompts), self.reward.pop_stats()

        images, prompts = exact_images(5, seed=9), prompts_for(5)
        actor = RewardActor.remote(client(f"{hue_server}/score", batch_size=2))
        scores, stats = ray.get(actor.score.remote(images, prompts), timeout=120)
        torch.testing.assert_close(scores, HueFractionReward()(images, prompts), equal_nan=True)
        assert stats["requests"] == 3 and stats["errors"] == 0
        ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()


# -- faults: each ends in NaN + counters, never an exception or a hang ------------------------------
def test_timeout_is_not_retried_and_does_not_hang(faulty):
    start = time.monotonic()
    with client(f"{faulty.url}/sleep", timeout_s=0.3, max_retries=3) as reward:
        scores = reward(exact_images(3), prompts_for(3))
        stats = reward.pop_stats()
    assert time.monotonic() - start < 1.5
    assert torch.isnan(scores).all()
    assert stats == {"requests": 1.0, "errors": 1.0, "timeouts": 1.0, "retries": 0.0, "missing": 3.0}


def test_server_error_500_is_not_retried(faulty):
    before = faulty.hits["status"]
    with client(f"{faulty.url}/status/500", max_retries=3) as reward:
        scores = reward(exact_images(3), prompts_for(3))
        stats = reward.pop_stats()
    assert torch.isnan(scores).all() and faulty.hits["status"] - before == 1
    assert stats["requests"] == 1 and stats["retries"] == 0 and stats["errors"] == 1 and stats["missing"] == 3


def test_503_then_200_is_retried_and_scores_are_correct(faulty):
    images, prompts = exact_images(12, seed=7), prompts_for(12)
    with client(f"{faulty.url}/flaky", batch_size=4, max_retries=1) as reward:
        scores = reward(images, prompts)
        stats = reward.pop_stats()
    torch.testing.assert_close(scores, HueFractionReward()(images, prompts), equal_nan=True)
    assert stats == {"requests": 6.0, "errors": 0.0, "timeouts": 0.0, "retries": 3.0, "missing": 3.0}


@pytest.mark.parametrize("status,retried", [(429, True), (502, True), (503, True), (504, True),
                                            (400, False), (401, False), (404, False), (422, False)])
def test_only_transient_statuses_are_retried_and_retries_are_bounded(faulty, status, retried):
    before = faulty.hits["status"]
    with client(f"{faulty.url}/status/{status}", max_retries=2) as reward:
        scores = reward(exact_images(2), prompts_for(2))
        stats = reward.pop_stats()
    attempts = 3 if retried else 1
    assert torch.isnan(scores).all() and faulty.hits["status"] - before == attempts
    assert stats["requests"] == attempts and stats["retries"] == attempts - 1 and stats["errors"] == 1


def test_connection_refused_is_retried_then_missing():
    with client(f"http://127.0.0.1:{free_port()}/score", max_retries=2, timeout_s=1) as reward:
        scores = reward(exact_images(2), prompts_for(2))
        stats = reward.pop_stats()
    assert torch.isnan(scores).all()
    assert stats == {"requests": 3.0, "errors": 1.0, "timeouts": 0.0, "retries": 2.0, "missing": 2.0}


@pytest.mark.parametrize("route", ["garbage", "short"])
def test_malformed_or_wrong_length_answers_mark_the_batch_missing(faulty, route):
    with client(f"{faulty.url}/{route}", batch_size=3) as reward:
        scores = reward(exact_images(5), prompts_for(5))
        stats = reward.pop_stats()
    assert torch.isnan(scores).all()
    assert stats["errors"] == 2 and stats["missing"] == 5 and stats["retries"] == 0


def test_null_nan_and_non_number_scores_are_missing_the_rest_kept(faulty):
    with client(f"{faulty.url}/weird") as reward:
        scores = reward(exact_images(8), prompts_for(8))
        stats = reward.pop_stats()
    valid = {i: v for i, v in enumerate(scores.tolist()) if not math.isnan(v)}
    assert valid == FaultyServer.WEIRD_VALID
    assert stats["missing"] == 6 and stats["errors"] == 0


def test_metadata_that_json_cannot_carry_costs_only_that_batch(hue_server):
    metadata = [{"ok": 1}, {"ok": 2}, {"bad": object()}, {"ok": 3}]
    with client(f"{hue_server}/score", batch_size=2) as reward:
        scores = reward(exact_images(4), prompts_for(4), metadata)
        stats = reward.pop_stats()
    assert not torch.isnan(scores[:2]).any() and torch.isnan(scores[2:]).all()
    assert stats["errors"] == 1 and stats["requests"] == 1


def test_token_missing_or_wrong_is_401_not_retried_right_token_scores(token_server):
    images, prompts = exact_images(3), prompts_for(3)
    for token in (None, "wrong"):
        with client(f"{token_server}/score", token=token, max_retries=3) as reward:
            assert torch.isnan(reward(images, prompts)).all()
            stats = reward.pop_stats()
            assert stats["requests"] == 1 and stats["errors"] == 1
    with client(f"{token_server}/score", token="s3cret") as reward:
        torch.testing.assert_close(reward(images, prompts), HueFractionReward()(images, prompts), equal_nan=True)
    answer = httpx.post(f"{token_server}/score", json={"prompts": [], "images": []})
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{token_server}/healthz").status_code == 200  # probes need no token


def test_build_reward_http_from_config(hue_server, monkeypatch):
    monkeypatch.setenv("DRPO_TEST_REWARD_TOKEN", "unused-by-this-server")
    cfg = RewardConfig(kind="http", url=f"{hue_server}/score", token_env="DRPO_TEST_REWARD_TOKEN", batch_size=2,
                       timeout_s=3, max_retries=1, max_concurrency=2, options={"backoff_s": 0.01})
    reward = build_core_reward(cfg)
    assert isinstance(reward, HttpReward) and reward.token == "unused-by-this-server" and reward.batch_size == 2
    assert build_reward(cfg).url == reward.url  # services.rewards.clients delegates http to the core
    assert not torch.isnan(reward(exact_images(2), prompts_for(2))).any()
    reward.close()
    monkeypatch.delenv("DRPO_TEST_REWARD_TOKEN")
    with pytest.raises(ValueError, match="environment variable DRPO_TEST_REWARD_TOKEN is not set"):
        build_core_reward(cfg)
    with pytest.raises(ValueError, match=r"rewards\[http\].options"):
        build_core_reward(cfg.model_copy(update={"token_env": None, "options": {"colour": 1}}))


# -- the server's own checks -----------------------------------------------------------------------
def png_b64(side: int = 8) -> str:
    return base64.b64encode(encode_png((exact_images(1, side)[0] * 255).to(torch.uint8))).decode()


@pytest.mark.parametrize("body,status,message", [
    ({"prompts": ["a red car"], "images": []}, 422, "1 prompts for 0 images"),
    ({"prompts": ["a"], "images": ["%%%"]}, 422, "images[0] is not valid base64"),
    ({"prompts": ["a"], "images": [base64.b64encode(b"GIF89a....").decode()]}, 422, "images[0] is not a PNG"),
    ({"prompts": ["a"], "images": [png_b64()], "metadata": [None, None]}, 422, "2 metadata entries for 1 images"),
    ({"prompts": ["a"], "images": [png_b64()], "extra": 1}, 422, "body.extra"),
    ({"prompts": "a", "images": [png_b64()]}, 422, "body.prompts"),
    ({"prompts": ["a"] * 17, "images": [png_b64()] * 17}, 413, "17 images in one request; the limit is 16"),
    ({"prompts": ["a"], "images": [png_b64(65)]}, 413, "images[0] is 65x65 pixels"),
])
def test_server_rejects_bad_requests_with_one_line(hue_server, body, status, message):
    answer = httpx.post(f"{hue_server}/score", json=body)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert message in detail and "\n" not in detail


def test_server_limits_body_size_declared_or_streamed(hue_server):
    big = b'{"prompts": [], "images": ["' + b"A" * 300_000 + b'"]}'
    declared = httpx.post(f"{hue_server}/score", content=big, headers={"content-type": "application/json"})
    streamed = httpx.post(f"{hue_server}/score", content=iter([big[:150_000], big[150_000:]]),
                          headers={"content-type": "application/json"})  # chunked: no Content-Length
    for answer in (declared, streamed):
        assert answer.status_code == 413 and "exceeds the limit of 200000 bytes" in answer.json()["detail"]


def test_mixed_image_sizes_and_grey_pngs_are_scored(hue_server):
    grey = base64.b64encode(encode_png(torch.full((1, 4, 4), 200, dtype=torch.uint8))).decode()
    answer = httpx.post(f"{hue_server}/score", json={"prompts": ["a red car", "a red car", "a cat"],
                                                     "images": [png_b64(8), grey, png_b64(16)]})
    assert answer.status_code == 200
    scores = answer.json()["scores"]
    assert scores[1] == 0.0 and isinstance(scores[0], float) and scores[2] is None  # grey has no hue; cat no colour


def test_openapi_and_metrics(hue_server):
    from prometheus_client.parser import text_string_to_metric_families

    spec = httpx.get(f"{hue_server}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert {"ScoreRequest", "ScoreResponse", "ErrorResponse", "HealthResponse"} <= set(schemas)
    assert set(spec["paths"]["/score"]["post"]["responses"]) >= {"200", "401", "413", "422", "500"}
    with client(f"{hue_server}/score", batch_size=4) as reward:
        reward(exact_images(4), prompts_for(4))
    httpx.post(f"{hue_server}/score", json={"prompts": [1], "images": []})
    text = httpx.get(f"{hue_server}/metrics").text
    assert 'drpo_reward_server_requests_total{route="/score",status="200",transport="http"}' in text
    assert 'drpo_reward_server_requests_total{route="/score",status="422",transport="http"}' in text
    assert "drpo_reward_server_request_seconds_bucket" in text
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert values["drpo_reward_server_images_scored_total"] >= 4
    assert values["drpo_reward_server_missing_scores_total"] >= 1  # "a cat" names no colour


@pytest.mark.parametrize("server,headers", [("hue_server", {}), ("token_server", {"Authorization": "Bearer s3cret"})])
def test_schemathesis_property_run_against_the_openapi_spec(server, headers, request):
    """Requests generated from the spec: no 5xx, answers match the documented schemas, and (token
    server) a request with wrong credentials is refused."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    url = request.getfixturevalue(server)
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    for path, method in [("/score", "POST"), ("/healthz", "GET")]:
        operation = schema[path][method]

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            # positive_data_acceptance is off: JSON Schema cannot say "one prompt per image" or "a decodable
            # PNG", so schema-valid random requests are rightly refused with 422 (tested one by one above)
            case.call_and_validate(base_url=url, headers=headers,
                                   excluded_checks=[schemathesis.checks.positive_data_acceptance])

        check()


# -- drpo serve-reward ---------------------------------------------------------------------------
def drpo(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DRPO_SERVE_TOKEN": "t0k"}
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_serve_reward_cli_answers_healthz_and_scores():
    port = free_port()
    proc = drpo("serve-reward", "--reward", "hue_fraction", "--set", "options.min_saturation=0.3",
                "--port", str(port), "--token-env", "DRPO_SERVE_TOKEN")
    try:
        deadline, health = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert health is not None and health.json() == {"status": "ok", "reward": "hue_fraction",
                                                        "version": "hue-fraction-v1"}, proc.stderr
        images, prompts = exact_images(4), prompts_for(4)
        with client(f"http://127.0.0.1:{port}/score", token="t0k") as reward:
            scores = reward(images, prompts)
        torch.testing.assert_close(scores, HueFractionReward(min_saturation=0.3)(images, prompts), equal_nan=True)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.mark.parametrize("args,message", [
    (["--reward", "nonsense"], "reward kind: Input should be"),
    (["--reward", "hue_fraction", "--set", "options.colour=1"], "rewards[hue_fraction].options"),
    (["--reward", "hue_fraction", "--token-env", "DRPO_UNSET_VARIABLE_X"], "DRPO_UNSET_VARIABLE_X is not set"),
    (["--metrics-port", "9"], "--metrics-port is for --grpc"),
    (["--port", "BUSY"], "choose another --port"),
])
def test_serve_reward_cli_bad_input_exits_2_with_one_line(args, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in args]
        proc = drpo("serve-reward", *(args if "--port" in args else [*args, "--port", str(free_port())]))
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err and err.startswith("drpo: error:")


# -- flow_grpo compatibility -----------------------------------------------------------------------
def flow_grpo_config(url: str, **options) -> RewardConfig:
    return RewardConfig(kind="flow_grpo", url=url, allow_unsafe_pickle=True, timeout_s=5, max_retries=2,
                        batch_size=4, options={"backoff_s": 0.01, **options})


def test_flow_grpo_round_trip_against_a_server_of_that_format():
    images, prompts = exact_images(6, side=32, seed=11), prompts_for(6)
    metadata = [{"tag": "color", "include": [{"class": "car", "count": 1}]}] * 6
    with FlowGrpoStyleServer() as server:
        reward = build_reward(flow_grpo_config(server.url, only_strict=True, jpeg_quality=95))
        assert isinstance(reward, FlowGrpoReward)
        with reward:
            scores = reward(images, prompts, metadata)
            stats = reward.pop_stats()
        body = server.last_body
    assert set(body) == {"images", "prompts", "meta_datas", "only_strict"} and body["only_strict"] is True
    assert body["images"][0][:2] == b"\xff\xd8" and body["meta_datas"] == metadata[:len(body["images"])]  # JPEG
    local = HueFractionReward()(images, prompts)
    assert torch.equal(torch.isnan(scores), torch.isnan(local))
    assert (scores - local).nan_to_num().abs().max() < 0.1  # JPEG is lossy; the ranking signal survives
    assert stats["requests"] == 2 and stats["errors"] == 0 and stats["missing"] == 1


@pytest.mark.parametrize("mode,reason", [("malicious", "builtins.exec"), ("traceback", "HTTP 500"),
                                         ("error", "detector crashed")])
def test_flow_grpo_bad_answers_are_missing_not_executed_nor_retried(mode, reason, capsys, caplog):
    with FlowGrpoStyleServer() as server:
        server.mode = mode
        with build_reward(flow_grpo_config(server.url)) as reward:
            scores = reward(exact_images(3), prompts_for(3))
            stats = reward.pop_stats()
        assert server.requests == 1
    assert torch.isnan(scores).all() and stats["errors"] == 1
    assert "pwned" not in capsys.readouterr().out
    assert reason in caplog.text


def test_flow_grpo_requires_explicit_opt_in():
    with pytest.raises(ValueError, match="allow_unsafe_pickle"):
        RewardConfig(kind="flow_grpo", url="http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="allow_unsafe_pickle=True"):
        FlowGrpoReward("http://127.0.0.1:1/")

"""gRPC reward transport: in-process servers ↔ GrpcReward, retry policy by status code, server checks, CLI."""

from __future__ import annotations

import hashlib
import math
import os
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import torch

from drpo_core.config import RewardConfig
from drpo_core.rewards.hue import HueFractionReward
from drpo_core.rewards.http import encode_png
from services.rewards.grpc_reward import reward_pb2, reward_pb2_grpc
from services.rewards.grpc_reward.client import GrpcReward
from services.rewards.grpc_reward.server import build_grpc_server
from services.rewards.scoring import ScoringCore, ServerLimits
from services.rewards.clients import build_reward
from tests.reward_servers import MetadataEchoReward, exact_images, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a photo of a red car", "a photo of a blue cup", "a photo of a green bird", "a cat"]


def prompts_for(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def client(target: str, **kwargs) -> GrpcReward:
    return GrpcReward(target, **{"timeout_s": 5.0, "max_retries": 2, "batch_size": 8, "backoff_s": 0.01, **kwargs})


@pytest.fixture(scope="module")
def hue_server():
    reward = HueFractionReward()
    server, port = build_grpc_server(reward, name="hue_fraction", version=reward.version,
                                     limits=ServerLimits(max_images=16, max_side=64))
    server.start()
    yield f"127.0.0.1:{port}", server
    server.stop(grace=None)


@pytest.fixture(scope="module")
def token_server():
    server, port = build_grpc_server(HueFractionReward(), name="hue_fraction", token="s3cret")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


class FaultyServicer(reward_pb2_grpc.RewardServiceServicer):
    """Misbehaves as ``mode`` says: "unavailable_once" (per distinct request), "sleep" (past the deadline),
    a status-code name (always aborts with it), "short" (one score too few), "weird" (NaN / missing flags)."""

    def __init__(self):
        self.mode, self.calls, self.seen = "ok", 0, set()
        self.core = ScoringCore(HueFractionReward())

    def Score(self, request, context):
        self.calls += 1
        n = len(request.prompts)
        if self.mode == "unavailable_once":
            key = hashlib.sha256(request.SerializeToString()).hexdigest()
            if key not in self.seen:
                self.seen.add(key)
                context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        elif self.mode == "sleep":
            time.sleep(1.0)
        elif self.mode in grpc.StatusCode.__members__:
            context.abort(grpc.StatusCode[self.mode], f"forced {self.mode}")
        elif self.mode == "short":
            return reward_pb2.ScoreResponse(scores=[0.5] * (n - 1))
        elif self.mode == "weird":  # 0: fine; 1: flagged missing; 2: NaN without the flag; 3: inf
            return reward_pb2.ScoreResponse(scores=[0.25, 0.9, math.nan, math.inf], missing=[False, True, False, False])
        scores = self.core.score(list(request.prompts), list(request.png_images), None)
        return reward_pb2.ScoreResponse(scores=[math.nan if s is None else s for s in scores],
                                        missing=[s is None for s in scores])


@pytest.fixture(scope="module")
def faulty():
    servicer = FaultyServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    servicer.target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield servicer
    server.stop(grace=None)


# -- round trips ----------------------------------------------------------------------------------
def test_round_trip_equals_in_process_and_health(hue_server):
    target, _ = hue_server
    images, prompts = exact_images(11), prompts_for(11)
    with client(target, batch_size=4) as reward:
        scores = reward(images, prompts)
        stats = reward.pop_stats()
        health = reward.health()
    torch.testing.assert_close(scores, HueFractionReward()(images, prompts), equal_nan=True)
    assert stats == {"requests": 3.0, "errors": 0.0, "timeouts": 0.0, "retries": 0.0, "missing": 2.0}
    assert (health.status, health.reward, health.version) == ("SERVING", "hue_fraction", "hue-fraction-v1")


def test_batching_invariance(hue_server):
    target, _ = hue_server
    images, prompts = exact_images(10, seed=4), prompts_for(10)
    with client(target, batch_size=1, max_concurrency=4) as one, client(target, batch_size=8) as eight:
        torch.testing.assert_close(one(images, prompts), eight(images, prompts), equal_nan=True)
        assert one.pop_stats()["requests"] == 10 and eight.pop_stats()["requests"] == 2


def test_any_reward_and_metadata_json_round_trip():
    server, port = build_grpc_server(MetadataEchoReward(), name="echo")
    server.start()
    try:
        with client(f"127.0.0.1:{port}") as reward:
            scores = reward(exact_images(3), prompts_for(3), [{"target": 2.5}, None, {"target": 7, "x": [1]}])
    finally:
        server.stop(grace=None)
    assert scores[0] == 2.5 and math.isnan(scores[1]) and scores[2] == 7


def test_token(token_server):
    images, prompts = exact_images(3), prompts_for(3)
    for token in (None, "wrong"):
        with client(token_server, token=token, max_retries=3) as reward:
            assert torch.isnan(reward(images, prompts)).all()
            stats = reward.pop_stats()
        assert stats["requests"] == 1 and stats["errors"] == 1  # UNAUTHENTICATED is not retried
    with client(token_server, token="s3cret") as reward:
        torch.testing.assert_close(reward(images, prompts), HueFractionReward()(images, prompts), equal_nan=True)


# -- retry policy and faults -----------------------------------------------------------------------
def test_unavailable_then_ok_is_retried_and_scores_are_correct(faulty):
    faulty.mode = "unavailable_once"
    images, prompts = exact_images(8, seed=2), prompts_for(8)
    with client(faulty.target, batch_size=4, max_retries=1) as reward:
        scores = reward(images, prompts)
        stats = reward.pop_stats()
    torch.testing.assert_close(scores, HueFractionReward()(images, prompts), equal_nan=True)
    assert stats == {"requests": 4.0, "errors": 0.0, "timeouts": 0.0, "retries": 2.0, "missing": 2.0}


@pytest.mark.parametrize("code,retried", [("UNAVAILABLE", True), ("RESOURCE_EXHAUSTED", True),
                                          ("INTERNAL", False), ("INVALID_ARGUMENT", False),
                                          ("UNAUTHENTICATED", False), ("UNKNOWN", False)])
def test_only_transient_codes_are_retried_and_retries_are_bounded(faulty, code, retried):
    faulty.mode, before = code, faulty.calls
    with client(faulty.target, max_retries=2) as reward:
        scores = reward(exact_images(2), prompts_for(2))
        stats = reward.pop_stats()
    attempts = 3 if retried else 1
    assert torch.isnan(scores).all() and faulty.calls - before == attempts
    assert stats["requests"] == attempts and stats["retries"] == attempts - 1 and stats["errors"] == 1


def test_deadline_exceeded_is_retried_a_bounded_number_of_times(faulty):
    faulty.mode = "sleep"
    start = time.monotonic()
    with client(faulty.target, timeout_s=0.3, max_retries=1) as reward:
        scores = reward(exact_images(2), prompts_for(2))
        stats = reward.pop_stats()
    assert time.monotonic() - start < 2.0
    assert torch.isnan(scores).all()
    assert stats == {"requests": 2.0, "errors": 1.0, "timeouts": 2.0, "retries": 1.0, "missing": 2.0}


def test_no_server_is_unavailable_retried_then_missing():
    with client(f"127.0.0.1:{free_port()}", max_retries=1, timeout_s=1) as reward:
        scores = reward(exact_images(2), prompts_for(2))
        stats = reward.pop_stats()
    assert torch.isnan(scores).all() and stats["requests"] == 2 and stats["errors"] == 1


def test_wrong_length_and_invalid_values(faulty):
    faulty.mode = "short"
    with client(faulty.target) as reward:
        assert torch.isnan(reward(exact_images(3), prompts_for(3))).all()
        assert reward.pop_stats()["errors"] == 1
        faulty.mode = "weird"
        scores = reward(exact_images(4), prompts_for(4))
        stats = reward.pop_stats()
    assert scores[0] == 0.25 and torch.isnan(scores[1:]).all()
    assert stats["missing"] == 3 and stats["errors"] == 0


# -- the server's own checks -----------------------------------------------------------------------
def png(side: int = 8) -> bytes:
    return encode_png((exact_images(1, side)[0] * 255).to(torch.uint8))


@pytest.mark.parametrize("request_fields,message", [
    ({"prompts": ["a"], "png_images": [b"GIF89a...."]}, "png_images"),
    ({"prompts": ["a", "b"], "png_images": [png()]}, "2 prompts for 1 images"),
    ({"prompts": ["a"], "png_images": [png()], "metadata_json": ["{not json"]}, "metadata_json[0] is not JSON"),
    ({"prompts": ["a"], "png_images": [png()], "metadata_json": ["[1]"]}, "must be a JSON object or null"),
    ({"prompts": ["a"] * 17, "png_images": [png()] * 17}, "17 images in one request; the limit is 16"),
    ({"prompts": ["a"], "png_images": [png(65)]}, "is 65x65 pixels"),
])
def test_server_rejects_bad_requests_with_invalid_argument(hue_server, request_fields, message):
    target, _ = hue_server
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(**request_fields), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.replace("png_images", "images[0] is not a PNG") in caught.value.details()


def test_server_metrics_count_calls_by_code(hue_server):
    from prometheus_client import generate_latest

    target, server = hue_server
    with client(target) as reward:
        reward(exact_images(2), prompts_for(2))
    text = generate_latest(server.core.metrics.registry).decode()
    assert 'drpo_reward_server_requests_total{route="Score",status="OK",transport="grpc"}' in text
    assert 'status="INVALID_ARGUMENT",transport="grpc"' in text  # from the test above, same module server


def test_services_build_reward_builds_grpc_and_delegates_the_rest(hue_server, monkeypatch):
    target, _ = hue_server
    monkeypatch.setenv("DRPO_TEST_GRPC_TOKEN", "abc")
    reward = build_reward(RewardConfig(kind="grpc", url=target, token_env="DRPO_TEST_GRPC_TOKEN", batch_size=3,
                                       timeout_s=2, options={"backoff_s": 0.05}))
    assert isinstance(reward, GrpcReward) and reward.token == "abc" and reward.backoff_s == 0.05
    with reward:
        assert not torch.isnan(reward(exact_images(2), prompts_for(2))).any()
    assert isinstance(build_reward(RewardConfig(kind="hue_fraction")), HueFractionReward)
    with pytest.raises(ValueError, match="host:port"):
        build_reward(RewardConfig(kind="grpc", url="http://127.0.0.1:1"))


def test_serve_reward_grpc_cli_answers_health_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve-reward", "--reward", "hue_fraction",
                             "--grpc", "--port", str(port)], cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reward, health, deadline = client(f"127.0.0.1:{port}", timeout_s=1), None, time.monotonic() + 60
        while health is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                health = reward.health()
            except grpc.RpcError:
                time.sleep(0.2)
        assert health is not None and health.status == "SERVING"
        images, prompts = exact_images(3), prompts_for(3)
        with reward:
            torch.testing.assert_close(reward(images, prompts), HueFractionReward()(images, prompts), equal_nan=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert f"over gRPC at 127.0.0.1:{port}" in proc.stderr.read()


def test_committed_stubs_match_the_proto(tmp_path):
    """`make protos` output, regenerated into a temporary folder, equals the committed files."""
    proto = "services/rewards/grpc_reward/reward.proto"
    (tmp_path / "services" / "rewards" / "grpc_reward").mkdir(parents=True)
    (tmp_path / proto).write_bytes((Path(ROOT) / proto).read_bytes())
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", proto], cwd=tmp_path, check=True, timeout=60)
    for name in ("reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py"):
        generated = (tmp_path / "services" / "rewards" / "grpc_reward" / name).read_text()
        assert generated == (Path(ROOT) / "services" / "rewards" / "grpc_reward" / name).read_text(), f"{name}: run `make protos`"

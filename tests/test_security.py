"""Security properties as tests: no unpickling of untrusted bytes, loopback by default, tokens only from the
environment and never in logs, and Kubernetes pods that run without root.

The source scan is an AST walk (comments and docstrings that *mention* pickle do not count); the network
checks read the kernel's table of listening sockets (/proc/net/tcp) for servers started the way users start them.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from drpo_core.config import ConfigError, load_config
from drpo_core.rewards.http import HttpReward, encode_png
from tests.deploy_checks import load_yaml_documents
from tests.reward_servers import exact_images, free_port

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("drpo_core", "services", "benchmarks")
# the only module allowed to unpickle: flow_grpo's protocol IS pickle; it needs allow_unsafe_pickle: true and
# loads answers with a restricted unpickler that admits containers, numbers and numpy arrays only
PICKLE_ALLOWED = {"services/rewards/flow_grpo_client.py",
                  "benchmarks/learner_traffic.py"}  # pickle.dumps only: the serialized size Ray would ship (checked below)


def python_files() -> list[Path]:
    return [p for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py")) if "_pb2" not in p.name]


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def unsafe_loads(tree: ast.AST) -> list[str]:
    """Calls that can execute code while loading bytes: pickle/dill/joblib/cloudpickle loads, torch.load without
    weights_only=True, numpy loads with allow_pickle=True, yaml.load / unsafe_load, eval / exec."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal") for n in names):
                found.append(f"line {node.lineno}: imports {names}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords}
        if name.endswith("torch.load"):
            safe = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
            if not safe:
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif name in ("np.load", "numpy.load") and isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value:
            found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(f"line {node.lineno}: {name} (use yaml.safe_load)")
        elif name in ("eval", "exec"):
            found.append(f"line {node.lineno}: {name}()")
    return found


def test_nothing_is_unpickled_from_the_network_or_from_checkpoints():
    problems = {}
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        found = unsafe_loads(ast.parse(path.read_text(), filename=rel))
        if found and rel not in PICKLE_ALLOWED:
            problems[rel] = found
    assert not problems, problems
    traffic = (ROOT / "benchmarks" / "learner_traffic.py").read_text()
    assert "pickle.load" not in traffic and "Unpickler" not in traffic
    # the allowed module unpickles only through its restricted unpickler, behind an explicit opt-in
    text = (ROOT / "services" / "rewards" / "flow_grpo_client.py").read_text()
    assert "class RestrictedUnpickler(pickle.Unpickler)" in text and "pickle.loads(" not in text
    assert "allow_unsafe_pickle" in text


def test_the_scan_finds_each_unsafe_load():
    bad = ("import pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
           "yaml.load(s)\neval(s)\n")
    assert len(unsafe_loads(ast.parse(bad))) == 6
    assert unsafe_loads(ast.parse("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\n")) == []


def test_checkpoint_code_reads_only_safetensors_and_json():
    text = (ROOT / "drpo_core" / "training" / "checkpoint.py").read_text()
    tree = ast.parse(text)
    calls = {dotted(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "load_file" in calls and "json.loads" in calls
    assert not {c for c in calls if c.endswith("torch.load") or "pickle" in c}


# -- listening sockets ------------------------------------------------------------------------------
def listening_addresses(port: int) -> set[str]:
    """IPs with a socket listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            ip_hex, port_hex = address.split(":")
            if state != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(ip_hex)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


LOOPBACK = {"127.0.0.1", "::1"}


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_serve_reward_binds_loopback_by_default_and_never_logs_tokens_or_images(tmp_path):
    """`drpo serve-reward` without --host: listening on 127.0.0.1 only. With a token from the environment,
    requests with a wrong token, a malformed image and a good one leave neither the token nor image bytes in
    its output, and the client's warnings (failed batches) do not carry them either."""
    port, secret = free_port(), "tok-" + os.urandom(8).hex()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "DRPO_SECRET_FOR_TEST": secret}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve-reward", "--port", str(port),
                                 "--token-env", "DRPO_SECRET_FOR_TEST"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        assert listening_addresses(port) and listening_addresses(port) <= LOOPBACK, listening_addresses(port)

        image = base64.b64encode(encode_png((exact_images(1, 8)[0] * 255).byte())).decode()
        url = f"http://127.0.0.1:{port}/score"
        body = {"prompts": ["a photo of a red car"], "images": [image]}
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {secret}x"}, timeout=60).status_code == 401
        bad = {"prompts": ["a photo of a red car"], "images": [image[:40] + "!!"]}
        assert httpx.post(url, json=bad, headers={"authorization": f"Bearer {secret}"}, timeout=60).status_code == 422
        assert httpx.post(url, json=body, headers={"authorization": f"Bearer {secret}"}, timeout=60).status_code == 200

        import logging

        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("drpo").addHandler(handler)
        try:
            os.environ["DRPO_SECRET_FOR_TEST"] = secret + "wrong"
            with HttpReward(url, token=os.environ["DRPO_SECRET_FOR_TEST"], max_retries=0) as client:
                assert torch.isnan(client(exact_images(2), ["a photo of a red car"] * 2)).all()  # 401: batch missing
        finally:
            del os.environ["DRPO_SECRET_FOR_TEST"]
            logging.getLogger("drpo").removeHandler(handler)
        assert records, "the failed batch was not logged at all"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    server_output = log.read_text()
    for text in (server_output, "\n".join(records)):
        assert secret not in text and image[:24] not in text, text[-2000:]


def test_bearer_tokens_come_only_from_the_environment():
    with pytest.raises(ConfigError, match="rewards.0.token: unknown key"):
        load_config([], ["rewards=[{kind: http, url: 'http://127.0.0.1:1/score', token: abc}]"])
    cfg = load_config([], ["rewards=[{kind: http, url: 'http://127.0.0.1:1/score', token_env: MY_TOKEN}]"])
    assert "abc" not in str(cfg.model_dump()) and cfg.rewards[0].token_env == "MY_TOKEN"
    from services.cli.main import serve_reward

    options = {p.name for p in __import__("inspect").signature(serve_reward).parameters.values()}
    assert "token_env" in options and "token" not in options  # no --token: a token never sits in argv or ps


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_controller_metrics_bind_loopback_by_default():
    from services.observability.metrics import MetricsExporter

    cfg = load_config([], [])
    assert cfg.runtime.metrics_host == "127.0.0.1"
    exporter = MetricsExporter()
    port = exporter.serve(free_port(), cfg.runtime.metrics_host)
    try:
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        exporter.close()


def test_the_embedded_local_ray_cluster_starts_no_dashboard():
    """services.runtime.cluster.connect starts the local default cluster with include_dashboard=False (Ray's internal
    GCS/raylet ports are Ray's own, protected by its token authentication, on by default in Ray 2.60)."""
    tree = ast.parse((ROOT / "services" / "runtime" / "cluster.py").read_text())
    inits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and dotted(n.func) == "ray.init"
             and any(k.arg == "num_cpus" for k in n.keywords)]
    assert inits, "no embedded-cluster ray.init found"
    for call in inits:
        kwargs = {k.arg: k.value for k in call.keywords}
        assert isinstance(kwargs.get("include_dashboard"), ast.Constant) and kwargs["include_dashboard"].value is False
        assert "dashboard_host" not in kwargs


# -- Kubernetes ------------------------------------------------------------------------------------
def containers(node, path=""):
    """Every container (and initContainer) in a manifest, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    yield f"{path}.{key}[{c.get('name')}]", c
            else:
                yield from containers(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from containers(value, f"{path}[{i}]")


def manifests():
    return [(p.name, d) for p in sorted((ROOT / "k8s").glob("*.yaml")) for d in load_yaml_documents(p) if d]


def test_every_kubernetes_container_runs_non_root_without_privilege_escalation():
    seen = 0
    for name, doc in manifests():
        for where, c in containers(doc):
            seen += 1
            sc = c.get("securityContext") or {}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1000) != 0, (name, where)
            assert sc.get("allowPrivilegeEscalation") is False and sc.get("privileged", False) is False, (name, where)
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), (name, where)
    assert seen >= 9  # head + 3 worker groups, twice (RayCluster, RayJob), + the reward server


SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|API_KEY)(_|$)")  # not TOKENIZERS_PARALLELISM


def test_tokens_in_kubernetes_come_from_secrets_never_literals():
    for name, doc in manifests():
        for where, c in containers(doc):
            for var in c.get("env", []):
                if SECRET_NAME.search(var["name"].upper()):
                    assert "value" not in var and "secretKeyRef" in var.get("valueFrom", {}), (name, where, var["name"])
            args = " ".join(str(a) for a in c.get("command", []) + c.get("args", []))
            assert "--token " not in args and "Bearer" not in args, (name, where)
    # the training config names the variable, never the token
    for doc in load_yaml_documents(ROOT / "k8s" / "configmap.drpo-config.yaml"):
        for key, text in (doc or {}).get("data", {}).items():
            assert "token:" not in text.replace("token_env:", ""), key

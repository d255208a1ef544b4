"""Deployment artefacts (deploy/, k8s/), checked offline with the real tools that run here.

* KubeRay manifests: the ``v1`` schemas of the v1.7.0 CRDs (strict, like ``kubectl apply``) and KubeRay's
  admission rules (tests/deploy_checks.py); deliberately broken copies must fail both.
* The ConfigMap's drpo config: loads with ``load_config``, equals the SD-Turbo preset, its resource plan
  fits the RayCluster's pods (``ResourcePlan.check``), and the RayJob mounts it where the entrypoint reads it.
* Prometheus: ``promtool check config/rules``, ``promtool test rules`` (every alert fires on its condition
  and stays quiet otherwise), then a real ``prometheus`` scraping our real exporters (services/observability/metrics.py
  fed by real drpo_core code paths, services/rewards/server.py answering a real HTTP reward client) and
  evaluating every PromQL expression of the Grafana dashboard and of the rules.

Not possible here, so not claimed: building the image (no Docker engine), ``kubectl apply`` (no cluster),
rendering the dashboard (Grafana is not packaged for this machine). docs/deploy.md says how to do those.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from drpo_core.config import load_config
from services.runtime.roles import PlacementError, ResourcePlan
from tests.deploy_alert_cases import ALERT_CASES, promtool_tests
from tests.deploy_checks import (CRD_FILES, load_yaml_documents, manifest_errors, mutated, promql_metric_names,
                                 ray_nodes)
from tests.deploy_live import LiveStack, training_stats

ROOT = Path(__file__).resolve().parents[1]
K8S, PROM, GRAFANA = ROOT / "k8s", ROOT / "deploy" / "prometheus", ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "drpo_training.json"
RAY_MARK = "[Ray system metrics]"
ACTOR_MARK = "[drpo actor metrics]"


def docs(name: str) -> list[dict]:
    return load_yaml_documents(K8S / name)


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in docs(name) if d["kind"] == kind]
    return doc


def ray_manifests() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_documents(p) if d.get("kind") in CRD_FILES]


def container(pod_spec: dict) -> dict:
    return pod_spec["template"]["spec"]["containers"][0] if "template" in pod_spec else pod_spec["containers"][0]


def head_spec(cluster_spec: dict) -> dict:
    return cluster_spec["headGroupSpec"]["template"]["spec"]


def configmap_config(tmp_path: Path, key: str = "config.yaml") -> Path:
    path = tmp_path / key
    path.write_text(one("configmap.drpo-config.yaml", "ConfigMap")["data"][key])
    return path


# -- KubeRay manifests ------------------------------------------------------------------------------

CRD_SHA1 = {"ray.io_rayclusters.yaml": "a76858808024607780ff6bd4580da2d0d31ef21e",
            "ray.io_rayjobs.yaml": "42081e2bc447ff021fb5a4f45ec72381b97c66ef",
            "ray.io_rayservices.yaml": "7f0d6a19807a71a084438fe61de233602ffde6ba"}


def test_kuberay_crds_are_the_unmodified_v1_7_0_files_inside_the_repository():
    import hashlib

    from tests.deploy_checks import CRD_DIR

    assert CRD_DIR.is_relative_to(ROOT), "the CRD copies must live inside the repository (a fresh clone has nothing beside it)"
    assert {name: hashlib.sha1((CRD_DIR / name).read_bytes()).hexdigest() for name in CRD_SHA1} == CRD_SHA1

def test_every_ray_manifest_passes_the_crd_schema_and_kuberay_rules():
    found = ray_manifests()
    assert {d["kind"] for _, d in found} >= {"RayCluster", "RayJob"}
    for name, doc in found:
        assert doc["apiVersion"] == "ray.io/v1", name
        assert manifest_errors(doc) == [], name


def group(doc: dict, i: int) -> dict:
    return doc["spec"]["workerGroupSpecs"][i]


# what → (how the copy is broken, a phrase the error must contain)
CLUSTER_BREAKS = {
    "worker group without groupName": (lambda d: group(d, 0).pop("groupName"), "'groupName' is a required property"),
    "minReplicas as a string": (lambda d: group(d, 0).update(minReplicas="1"), "is not of type 'integer'"),
    "misspelt field": (lambda d: group(d, 1).update(maxReplica=2), "Additional properties are not allowed"),
    "containerPort as a string": (lambda d: container(d["spec"]["headGroupSpec"])["ports"][0].update(containerPort="6379"),
                                  "is not of type 'integer'"),
    "min above max": (lambda d: group(d, 0).update(minReplicas=9), "minReplicas 9 > maxReplicas 8"),
    "no container": (lambda d: group(d, 2)["template"]["spec"].update(containers=[]), "at least one container"),
    "resources twice": (lambda d: group(d, 0)["rayStartParams"].update({"num-gpus": "1"}),
                        "both rayStartParams and resources"),
    "duplicate group": (lambda d: group(d, 1).update(groupName="generator"), "group names must be unique"),
    "name not DNS-1035": (lambda d: d["metadata"].update(name="DrPO_cluster"), "not a DNS-1035 label"),
    "unknown upscaling mode": (lambda d: d["spec"]["autoscalerOptions"].update(upscalingMode="Fast"), "is not one of"),
    "restartPolicy Always with autoscaler v2": (lambda d: group(d, 0)["template"]["spec"].update(restartPolicy="Always"),
                                                "restartPolicy of generator should be Never or unset"),
}
JOB_BREAKS = {
    "neither rayClusterSpec nor clusterSelector": (lambda d: d["spec"].pop("rayClusterSpec"),
                                                   "needs rayClusterSpec or clusterSelector"),
    "name of 48 characters": (lambda d: d["metadata"].update(name="d" * 48), "at most 47 characters"),
    "TTL without shutdown": (lambda d: d["spec"].update(shutdownAfterJobFinishes=False), "needs shutdownAfterJobFinishes"),
    "runtimeEnvYAML not YAML": (lambda d: d["spec"].update(runtimeEnvYAML="env_vars: [unclosed"),
                                "runtimeEnvYAML is not valid YAML"),
    "entrypoint as a list": (lambda d: d["spec"].update(entrypoint=["drpo", "train"]), "is not of type 'string'"),
    "embedded group without template": (lambda d: d["spec"]["rayClusterSpec"]["workerGroupSpecs"][1].pop("template"),
                                        "'template' is a required property"),
}


@pytest.mark.parametrize("what", sorted(CLUSTER_BREAKS))
def test_a_broken_ray_cluster_fails_validation(what):
    change, message = CLUSTER_BREAKS[what]
    original = one("ray-cluster.drpo.yaml", "RayCluster")
    errors = manifest_errors(mutated(original, change))
    assert any(message in e for e in errors), f"{what}: {errors}"


@pytest.mark.parametrize("what", sorted(JOB_BREAKS))
def test_a_broken_ray_job_fails_validation(what):
    change, message = JOB_BREAKS[what]
    errors = manifest_errors(mutated(one("ray-job.drpo-train.yaml", "RayJob"), change))
    assert any(message in e for e in errors), f"{what}: {errors}"


def test_ray_job_embeds_exactly_the_ray_cluster_spec():
    embedded = one("ray-job.drpo-train.yaml", "RayJob")["spec"]["rayClusterSpec"]
    assert embedded == one("ray-cluster.drpo.yaml", "RayCluster")["spec"]


def test_gpu_groups_request_gpus_tolerate_the_gpu_taint_and_each_role_has_its_own_resource():
    spec = one("ray-cluster.drpo.yaml", "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"generator", "learner", "reward"}
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    for name, g in groups.items():
        assert int(container(g)["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
        assert gpu_toleration in g["template"]["spec"]["tolerations"], name
        assert g["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"], f"{name}: no GPU type selected"
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] > g["minReplicas"], name
        assert set(g["resources"]) == {name}, f"{name} must advertise only its own custom resource"
        assert {"name": "metrics", "containerPort": 8080} in container(g)["ports"]
    assert "nvidia.com/gpu" not in container(spec["headGroupSpec"])["resources"]["limits"]


# -- the drpo config in the ConfigMap ---------------------------------------------------------------
def test_configmap_config_is_the_sd_turbo_preset_with_a_cluster_runtime(tmp_path):
    cfg = load_config([configmap_config(tmp_path)])
    preset = load_config([ROOT / "deploy" / "configs" / "sd-turbo.yaml"])
    ours, theirs = cfg.model_dump(mode="json"), preset.model_dump(mode="json")
    for section in ("runtime", "output"):
        ours.pop(section), theirs.pop(section)
    assert ours == theirs
    assert cfg.output.dir.startswith("/mnt/runs/")
    overlay = load_config([configmap_config(tmp_path), configmap_config(tmp_path, "reward-http.yaml")])
    assert [r.kind for r in overlay.rewards] == ["http"] and overlay.runtime.reward.num_gpus == 0


def test_ray_job_mounts_the_configmap_where_its_entrypoint_reads_the_config():
    job = one("ray-job.drpo-train.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["drpo", "train"]
    config_paths = [argv[i + 1] for i, a in enumerate(argv) if a in ("--config", "-c")]
    assert config_paths == ["/etc/drpo/config.yaml"]
    pod = head_spec(job["spec"]["rayClusterSpec"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap = one("configmap.drpo-config.yaml", "ConfigMap")
    for path in config_paths:
        mounts = [m for m in container(pod)["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, f"{path} is not under exactly one volume mount of the head"
        assert volumes[mounts[0]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        assert path[len(mounts[0]["mountPath"].rstrip("/")) + 1:] in configmap["data"]


def test_the_cluster_autoscales_and_the_config_lists_exactly_what_its_autoscaler_can_add(tmp_path):
    """runtime.autoscaling (what the plan check counts) == every worker group: its pods' Ray resources, maxReplicas."""
    spec = one("ray-job.drpo-train.yaml", "RayJob")["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"]["version"] == "v2"
    cfg = load_config([configmap_config(tmp_path)])
    declared = {name: (nt.resources, nt.max_workers) for name, nt in cfg.runtime.autoscaling.items()}
    assert declared == {g["groupName"]: (ray_nodes({"headGroupSpec": g})[0], g["maxReplicas"]) for g in spec["workerGroupSpecs"]}
    learner, pod = cfg.runtime.learner, declared["learner"][0]
    assert learner.replicas > 1 and pod["GPU"] > 1, "the learner is data parallel across the GPUs of a multi-GPU pod"
    assert learner.replicas * learner.num_gpus <= pod["GPU"] and learner.replicas * learner.resources["learner"] <= pod["learner"]


@pytest.mark.parametrize("layers", [["config.yaml"], ["config.yaml", "reward-http.yaml"]])
def test_the_config_plan_needs_the_autoscaler_fits_what_it_can_add_and_no_more(tmp_path, layers):
    cfg = load_config([configmap_config(tmp_path, key) for key in layers])
    nodes = ray_nodes(one("ray-job.drpo-train.yaml", "RayJob")["spec"]["rayClusterSpec"])  # the pods that start
    totals = {k: sum(n.get(k, 0.0) for n in nodes) for n in nodes for k in n}
    assert nodes[0]["CPU"] == 0, "the head runs the controller and no actors"
    plan = ResourcePlan.from_config(cfg.runtime)
    with pytest.raises(PlacementError, match="generator"):  # more generators than pods start with...
        plan.check(totals, nodes)
    plan.check(totals, nodes, cfg.runtime.autoscaling)  # ...which the autoscaler adds
    rt, most = cfg.runtime, cfg.runtime.autoscaling["generator"].max_workers
    grown = rt.model_copy(update={"generator": rt.generator.model_copy(update={"replicas": most + 1})})
    with pytest.raises(PlacementError, match=rf"needs {most + 1} generator .* can grow it to {most} \(runtime.autoscaling\)"):
        ResourcePlan.from_config(grown).check(totals, nodes, rt.autoscaling)
    wide = rt.model_copy(update={"learner": rt.learner.model_copy(update={"replicas": 1, "num_gpus": 8})})
    with pytest.raises(PlacementError, match="no node type the autoscaler can add, can hold one learner replica"):
        ResourcePlan.from_config(wide).check(totals, nodes, rt.autoscaling)


def test_metrics_ports_and_thresholds_agree_across_files(tmp_path):
    cfg = load_config([configmap_config(tmp_path)])
    spec = one("ray-cluster.drpo.yaml", "RayCluster")["spec"]
    head_ports = {p["name"]: p["containerPort"] for p in container(spec["headGroupSpec"])["ports"]}
    assert head_ports["drpo-metrics"] == cfg.runtime.metrics_port and head_ports["metrics"] == 8080
    monitors = {d["metadata"]["name"]: d for d in docs("podmonitor.yaml")}
    head_monitor = monitors["ray-head-monitor"]
    assert head_monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert [e["port"] for e in head_monitor["spec"]["podMetricsEndpoints"]] == ["metrics", "drpo-metrics"]
    assert monitors["ray-workers-monitor"]["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "worker"}
    assert all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors.values())
    prometheus = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["drpo-controller"]["static_configs"][0]["targets"] == [f"ray-head:{cfg.runtime.metrics_port}"]
    rules = {r.get("alert"): r for g in yaml.safe_load((PROM / "rules.yml").read_text())["groups"] for r in g["rules"]}
    lag_rule = rules["DrpoPolicyLagAboveMaxStaleness"]["expr"]
    lag_threshold = re.fullmatch(r"min_over_time\(drpo_lag_max\[\w+\]\) > (\d+)", lag_rule)
    assert lag_threshold and int(lag_threshold.group(1)) == cfg.runtime.max_staleness
    ttl = one("ray-job.drpo-train.yaml", "RayJob")["spec"]["ttlSecondsAfterFinished"]
    assert int(rules["DrpoTrainingMetricsAbsent"]["for"].rstrip("m")) * 60 > ttl


def test_reward_server_manifest_serves_a_valid_reward_with_token_probes_and_service(tmp_path):
    from services.rewards.server import ROUTES, reward_config_from_cli

    objects = {d["kind"]: d for d in docs("reward-server.yaml")}
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    c = container(pod)
    argv = c["command"]
    assert argv[:2] == ["drpo", "serve-reward"]
    flags = dict(zip(argv[2::2], argv[3::2]))
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert reward_config_from_cli(flags["--reward"], sets).path == "yuvalkirstain/PickScore_v1"  # from the HF cache on /models
    assert flags["--host"] == "0.0.0.0"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert int(flags["--port"]) == port
    token = [e for e in c["env"] if e["name"] == flags["--token-env"]]
    assert token and token[0]["valueFrom"]["secretKeyRef"]["name"] == "drpo-reward-token"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"} and "/healthz" in ROUTES
    service = objects["Service"]
    assert service["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    overlay = load_config([configmap_config(tmp_path), configmap_config(tmp_path, "reward-http.yaml")])
    url = httpx.URL(overlay.rewards[0].url)
    assert (url.host, url.port, url.path) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"], "/score")
    reward_env = container(one("ray-cluster.drpo.yaml", "RayCluster")["spec"]["workerGroupSpecs"][2])["env"]
    assert any(e["name"] == overlay.rewards[0].token_env for e in reward_env)


# -- image and compose ------------------------------------------------------------------------------
def test_dockerfile_installs_pinned_torch_first_then_requirements_then_the_project():
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    runs = [i for i, l in enumerate(lines) if l.startswith("RUN pip install")]
    torch_pins = re.findall(r"(torch(?:vision)?==[\d.]+)", (ROOT / "Makefile").read_text())
    assert lines[runs[0]] == f"RUN pip install {' '.join(torch_pins)}"
    assert lines[runs[1]] == "RUN pip install -r requirements.txt -c constraints.txt"
    assert lines[runs[2]].startswith("RUN pip install --no-deps .")
    for line in lines:
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    ray_pin = re.search(r"^ray\[default\]==([\d.]+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    for _, doc in ray_manifests():
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray_pin


def test_compose_stack_mounts_existing_files_and_matches_the_prometheus_targets():
    compose = yaml.safe_load((ROOT / "deploy" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"ray-head", "reward-server", "prometheus", "grafana"}
    build = services["ray-head"]["build"]
    assert (ROOT / "deploy" / build["context"]).resolve() == ROOT and (ROOT / build["dockerfile"]).is_file()
    for svc in services.values():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / "deploy" / source).exists(), source
    prometheus = yaml.safe_load((PROM / "prometheus.yml").read_text())
    statics = [s for job in prometheus["scrape_configs"] for s in job.get("static_configs", [])]
    hosts = {target.split(":")[0] for s in statics for target in s["targets"]}
    assert hosts <= set(services)
    assert "--metrics-export-port=8080" in services["ray-head"]["command"]
    provisioning = GRAFANA / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert httpx.URL(source["url"]).host == "prometheus" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "drpo.yml").read_text())["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/drpo_training.json"] == f"{provider['options']['path']}/{DASHBOARD.name}"


# -- dashboard and rules: names and structure ---------------------------------------------------------
def known_metric_names() -> set[str]:
    """Every sample name our exporters produce (prometheus_client naming, from a full set of stats)."""
    from services.observability.metrics import METRICS, MetricsExporter, spec_for
    from services.rewards.scoring import RewardServerMetrics

    exporter = MetricsExporter()
    scores = torch.cat([torch.linspace(0, 1, 8), torch.full((8,), 0.5)]).view(2, 8)  # the second group is skipped
    stats = training_stats(3, {"hue_fraction": scores}, {"hue_fraction": {"requests": 1.0}})
    assert exporter.export(stats) == []
    assert {spec_for(k)[0].name for k in stats} == {s.name for s in METRICS}, "the stats must reach every metric"
    server = RewardServerMetrics()
    server.observe("http", "/score", "200", 0.01)
    registries = (exporter.registry, server.registry)
    return {s.name for r in registries for m in r.collect() for s in m.samples} | {"up"}


def ray_dashboard_metric_names() -> set[str]:
    """Metric names Ray's own Grafana panels query (from the installed ray package)."""
    import importlib.util

    boards = Path(importlib.util.find_spec("ray").origin).parent / "dashboard" / "modules" / "metrics" / "dashboards"
    text = "".join(p.read_text() for p in boards.glob("*_panels.py"))
    return set(re.findall(r"\b(ray_[a-z0-9_]+)\{", text))


def dashboard_targets() -> list[tuple[dict, dict]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p, t) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROM / "rules.yml").read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def test_dashboard_layout_datasource_and_variables():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "drpo-training"
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered
    defined = {v["name"] for v in dash["templating"]["list"]}
    for panel, target in dashboard_targets():
        assert panel["datasource"] == target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval"} <= defined
    refs = [(p["id"], t["refId"]) for p, t in dashboard_targets()]
    assert len(refs) == len(set(refs))


def test_every_query_uses_only_metric_names_that_exist():
    ours, ray = known_metric_names(), ray_dashboard_metric_names()
    from services.observability.actor_metrics import exported_names

    actor_names = exported_names()
    assert {"ray_node_gpus_utilization", "ray_object_store_memory"} <= ray  # the lookup itself works
    for panel, target in dashboard_targets():
        names = promql_metric_names(target["expr"])
        marked = panel.get("description", "").startswith(RAY_MARK)
        if panel.get("description", "").startswith(ACTOR_MARK):  # the actors' own series (tests/test_actor_metrics.py)
            assert names and names <= actor_names, f"{panel['title']}: {names - actor_names} are exported by no actor"
        elif marked:
            assert names and names <= ray, f"{panel['title']}: {names - ray} are not Ray metrics"
        else:
            assert names and names <= ours, f"{panel['title']}: {names - ours} are exported by no drpo service"
    recorded = {name for name, expr in rule_expressions() if ":" in name}
    for name, expr in rule_expressions():
        assert promql_metric_names(expr) <= ours | recorded, name
    covered = {n for _, t in dashboard_targets() for n in promql_metric_names(t["expr"])}
    from services.observability.metrics import METRICS

    missing = {s.name for s in METRICS} - {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in covered}
    assert not missing, f"metrics without a dashboard panel: {missing}"


# -- promtool ------------------------------------------------------------------------------------------
def prometheus_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: run `make sysdeps` (installs Debian's prometheus package)")
    return path


def test_promtool_checks_the_config_and_the_rules():
    promtool = prometheus_tool("promtool")
    config = subprocess.run([promtool, "check", "config", str(PROM / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run([promtool, "check", "rules", str(PROM / "rules.yml")], capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in rules.stdout


def test_every_alert_fires_on_its_condition_and_stays_quiet_otherwise(tmp_path):
    promtool = prometheus_tool("promtool")
    alerts = {name for name, _ in rule_expressions() if ":" not in name}
    assert {c["alert"] for c in ALERT_CASES} == alerts, "every alert needs a case"
    rules_file, tests_file = promtool_tests(PROM / "rules.yml", tmp_path)
    result = subprocess.run([promtool, "test", "rules", str(tests_file)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "SUCCESS" in result.stdout


# -- a real Prometheus over our real exporters --------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = LiveStack(prometheus_tool("prometheus"), PROM, tmp_path_factory.mktemp("prometheus"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def substitute(expr: str) -> str:
    """Grafana's variables as an "All" selection would expand them."""
    expansions = {"$__rate_interval": "20s", "$controller": ".*", "$run": ".*", "$reward_server": ".*", "$ray_cluster": ".*"}
    for variable, value in expansions.items():
        expr = expr.replace(variable, value)
    return expr


def test_every_dashboard_query_returns_series_from_a_real_prometheus(live):
    empty = []
    for panel, target in dashboard_targets():
        result = live.query(substitute(target["expr"]))
        if not result and not panel.get("description", "").startswith((RAY_MARK, ACTOR_MARK)):  # those need a Ray head
            empty.append(f"{panel['title']}: {target['expr']}")
    assert not empty, "queries without data:\n" + "\n".join(empty)
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable.get("definition", ""))
        if match and not match.group(1).startswith("ray_"):
            assert live.label_values(match.group(2), match.group(1)), variable["name"]


def test_every_rule_expression_evaluates_and_the_rule_manager_reports_no_error(live):
    for name, expr in rule_expressions():
        live.query(expr)  # raises on a parse or evaluation error
    health = live.rule_health()
    assert len(health) == len(rule_expressions())
    assert all(h == "ok" for h in health.values()), health
    assert live.query("instance:drpo_reward_server_missing_scores:ratio_rate10m"), "the recording rule produced nothing"


def test_exported_values_arrive_with_their_labels(live):
    assert live.feed_error is None, live.feed_error
    labelled = {(s["metric"].get("reward"), s["metric"].get("stat")) for s in live.query("drpo_reward_model_stat")}
    assert ("hue_fraction", "requests") in labelled and ("bad_token", "errors") in labelled
    features = {s["metric"]["feature"] for s in live.query("drpo_drift_pref_norm")}
    assert {"layer2_mean", "layer2_std_2"} <= features
    reasons = {s["metric"]["reason"] for s in live.query("drpo_skipped_groups")}
    assert {"too_few_valid", "constant_scores"} <= reasons
    statuses = {s["metric"]["status"] for s in live.query('drpo_reward_server_requests_total{route="/score"}')}
    assert {"200", "401"} <= statuses
    assert float(live.query("max(drpo_reward_server_missing_scores_total)")[0]["value"][1]) > 0

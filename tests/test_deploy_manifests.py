"""Two more k8s/ manifests, checked like the others (tests/test_deploy.py): the Job that fills the model volume
downloads exactly what the config and the reward server name, and the PrometheusRule is deploy/prometheus/rules.yml."""

from __future__ import annotations

import re
import subprocess

import yaml

from drpo_core.config import load_config
from tests.test_deploy import PROM, configmap_config, container, docs, one, prometheus_tool


def test_fill_models_job_downloads_what_the_config_and_reward_server_name(tmp_path):
    job = one("job.fill-models.yaml", "Job")
    pod = job["spec"]["template"]["spec"]
    c = container(pod)
    script = c["args"][0]
    repos = set(re.search(r"for repo in ([^;]+); do", script).group(1).split())
    cfg = load_config([configmap_config(tmp_path)])
    wanted = {cfg.model.path, cfg.rewards[0].path, cfg.rewards[0].options["processor_path"]}
    server = container(one("reward-server.yaml", "Deployment")["spec"]["template"]["spec"])["command"]
    wanted |= {a.split("=", 1)[1] for a in server if a.startswith(("path=", "options.processor_path="))}
    assert wanted <= repos, wanted - repos
    checked = re.search(r"sha256sum -c -\n\s*cp \S+ (\S+)", script).group(1)  # the official file, checked, kept as is
    assert checked == cfg.features.checkpoint
    head_env = {e["name"]: e.get("value") for e in container(one("ray-cluster.drpo.yaml", "RayCluster")["spec"]["headGroupSpec"])["env"]}
    job_env = {e["name"]: e.get("value") for e in c["env"]}
    assert job_env["HF_HOME"] == head_env["HF_HOME"] and "HF_HUB_OFFLINE" not in job_env  # the one step that downloads
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "drpo-models" in {d["metadata"]["name"] for d in docs("pvc.drpo.yaml")}
    mount = c["volumeMounts"][0]
    assert mount["mountPath"] == "/models" and not mount.get("readOnly") and cfg.features.checkpoint.startswith("/models/")
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_prometheus_rule_manifest_is_rules_yml_for_the_operator(tmp_path):
    rule = one("prometheusrule.drpo.yaml", "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1" and set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load((PROM / "rules.yml").read_text())["groups"], \
        "regenerate k8s/prometheusrule.drpo.yaml from rules.yml (command in its header)"
    monitors = docs("podmonitor.yaml")
    assert all(rule["metadata"]["labels"]["release"] == m["metadata"]["labels"]["release"] for m in monitors)
    wrapped = tmp_path / "rules.yml"
    wrapped.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run([prometheus_tool("promtool"), "check", "rules", str(wrapped)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

"""Two more k8s/ manifests, checked like the others (tests/test_deploy.py): the Job that fills the model volume
downloads exactly what the config and the reward server name, and the PrometheusRule is deploy/prometheus/rules.yml."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from drpo_core.config import RuntimeConfig, load_config
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


def test_pods_give_the_driver_time_to_checkpoint_on_sigterm(tmp_path):
    """The head's preStop SIGTERMs a real `drpo train`-shaped process and returns only once it has exited (its
    checkpoint written); pods wait longer than runtime.stop_grace_s; `ray job stop` waits longer too."""
    spec = one("ray-cluster.drpo.yaml", "RayCluster")["spec"]
    grace = RuntimeConfig().stop_grace_s
    head = spec["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in head["containers"][0]["env"]}
    assert float(env["RAY_JOB_STOP_WAIT_TIME_S"]) > grace
    for pod in [head] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]:
        assert pod["terminationGracePeriodSeconds"] > grace + 5
    command = head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]

    driver = tmp_path / "drpo"  # stands for the console script: argv = [python, .../drpo, train, ...]
    marker = tmp_path / "checkpointed"
    driver.write_text("import signal, sys, time\n"
                      "def stop(*_):\n    time.sleep(1.5)\n"
                      f"    open({str(marker)!r}, 'w').write('done')\n    sys.exit(143)\n"
                      "signal.signal(signal.SIGTERM, stop)\ntime.sleep(60)\n")
    # In a PID namespace of its own (as a pod is): the hook must never signal a real run on this machine.
    script = (f"{shlex.quote(sys.executable)} {shlex.quote(str(driver))} train --resume auto & driver=$!; "
              f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(60)' train & other=$!; sleep 1; "  # not a driver
              f"{shlex.quote(sys.executable)} -c {shlex.quote(command[2])}; "
              "kill -0 $driver 2>/dev/null && echo driver-alive; kill -0 $other && echo other-alive; kill $other")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("needs unshare --pid (root): the hook's process scan must not reach this machine's real runs")
    t0 = time.monotonic()
    done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script], capture_output=True, text=True,
                          timeout=90)
    assert marker.read_text() == "done" and done.stdout.split() == ["other-alive"], done  # it waited for the driver
    assert time.monotonic() - t0 >= 2.4

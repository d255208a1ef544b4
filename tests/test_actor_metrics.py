"""The actors' own series (services/observability/actor_metrics.py) on a real Ray head's metrics export, scraped by a real
Prometheus, and every dashboard query of the actor panels answered from it."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import ray

from services.observability.actor_metrics import exported_names
from tests.deploy_live import free_port
from tests.test_deploy import ACTOR_MARK, dashboard_targets, prometheus_tool, substitute
from services.runtime.cluster import RayRuntime
from services.runtime.controller import Controller
from tests.test_ray_train import config

RUN = "actor-metrics-test"


def query(url: str, expr: str) -> list[dict]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer.get("status") == "success", (expr, answer)
    return answer["data"]["result"]


def wait_for(what: str, ready, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (httpx.HTTPError, AssertionError):
            pass
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture()
def prometheus_over_ray(ray_cluster, tmp_path):
    """A real Prometheus scraping every live node's Ray metrics export (what KubeRay's PodMonitor scrapes)."""
    targets = [f"'127.0.0.1:{n['MetricsExportPort']}'" for n in ray.nodes() if n["Alive"]]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs: [{{targets: [{', '.join(targets)}]}}]\n")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus_tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("Prometheus ready", lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 30)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=15)
        log.close()


def test_generators_rewards_and_learner_export_their_own_series_to_the_ray_head(ray_cluster, tmp_path, prometheus_over_ray):
    url = prometheus_over_ray
    cfg = config(tmp_path, f"output.run_name={RUN}", "runtime.max_staleness=1")
    rt = RayRuntime.start(cfg, Path(cfg.output.dir))
    try:  # the actors stay up while Prometheus is read: Ray stops exporting a dead actor's series
        Controller(cfg, rt).run()
        check_series_and_panels(url, cfg, steps=cfg.trainer.steps)
    finally:
        rt.shutdown()


def check_series_and_panels(url: str, cfg, steps: int) -> None:
    sel = f'{{run="{RUN}"}}'
    # Ray flushes actor metrics to its export every ~10 s; then Prometheus scrapes them
    wait_for("the learner's update histogram", lambda: len(query(url, f"ray_drpo_actor_update_seconds_count{sel}")) == 1
             and float(query(url, f"ray_drpo_actor_update_seconds_count{sel}")[0]["value"][1]) == steps, 90)

    def value(expr: str) -> float:
        return sum(float(s["value"][1]) for s in query(url, expr))

    K, B = cfg.algo.num_candidates, cfg.trainer.prompts_per_step
    wait_for("every series", lambda: value(f"ray_drpo_actor_scored_images_total{sel}") >= K * B * steps, 30)
    roles = {s["metric"]["role"] for s in query(url, f"ray_drpo_actor_weights_version{sel}")}
    assert roles == {"generator", "learner"}
    assert value(f"ray_drpo_actor_images_total{sel}") >= K * B * steps  # the look-ahead may have sampled one more step
    assert value(f'ray_drpo_actor_weights_version{{run="{RUN}", role="learner"}}') == steps
    assert value(f"ray_drpo_actor_score_seconds_count{sel}") >= B * steps
    assert value(f"ray_drpo_actor_published_bytes_total{sel}") > 0
    assert not query(url, f"ray_drpo_actor_score_failures_total{sel}")  # none failed
    replicas = {s["metric"]["replica"] for s in query(url, f"ray_drpo_actor_generate_seconds_count{sel}")}
    assert len(replicas) == cfg.runtime.generator.replicas
    seen = {s["metric"]["__name__"] for s in query(url, f'{{__name__=~"ray_drpo_actor_.*", run="{RUN}"}}')}
    assert seen == exported_names() - {"ray_drpo_actor_score_failures_total"}

    actor_panels = [(p, t) for p, t in dashboard_targets() if p.get("description", "").startswith(ACTOR_MARK)]
    assert len(actor_panels) >= 7

    def empty() -> list[str]:
        return [f"{p['title']}: {t['expr']}" for p, t in actor_panels if not query(url, substitute(t["expr"]))]

    deadline = time.monotonic() + 30  # rate() needs two scrapes of a series inside its window
    while empty() and time.monotonic() < deadline:
        time.sleep(1)
    assert not empty(), "dashboard queries without data:\n" + "\n".join(empty())

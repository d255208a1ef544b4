"""A real Prometheus scraping our real exporters on 127.0.0.1, for tests/test_deploy.py.

``LiveStack.start()`` serves

* the controller's :class:`services.observability.metrics.MetricsExporter`, fed every 0.2 s with one step's stats built the
  way the controller builds them: rewards scored over HTTP by the real :class:`HttpReward` client, anchors
  from :func:`drpo_core.algorithms.ranking.select_anchors`, loss and drift norms from :func:`drpo_core.algorithms.loss.drpo_group_loss`
  on multi-scale features, plus the runtime's timing / lag / fault / pool counters;
* the reward server of :func:`services.rewards.server.create_app` (hue reward, bearer token), which that client
  calls with the right token and, as a second reward, with a wrong one (401 → missing scores);

and runs ``prometheus`` with deploy/prometheus/prometheus.yml (its job names and relabelling; targets pointed
at these ports, 1 s scrapes, deploy/prometheus/rules.yml loaded). Every wait is bounded; ``stop()`` kills
Prometheus and closes every server even after a failed start.
"""

from __future__ import annotations

import math
import subprocess
import threading
import time
from pathlib import Path

import httpx
import torch
import yaml

from drpo_core.config import AlgoConfig
from drpo_core.features.common import multiscale_mean_std
from drpo_core.algorithms.loss import drpo_group_loss
from drpo_core.algorithms.normalizer import RunningStats
from drpo_core.algorithms.ranking import select_anchors
from tests.reward_servers import free_port, uvicorn_server

K, M = 8, 2
PROMPTS = ("a photo of a red car", "a photo of a blue cup", "a photo of a cat")  # the cat names no colour: NaN
TOKEN = "deploy-test-token"
STEP_PERIOD_S = 0.2


def features(seed: int) -> dict[str, torch.Tensor]:
    """``key -> [K, L, D]`` multi-scale mean/std features of a random feature map (the encoder's key layout)."""
    fmap = torch.randn(K, 8, 4, 4, generator=torch.Generator().manual_seed(seed))
    return multiscale_mean_std(fmap, "layer2", (2,))


def training_stats(step: int, scores: dict[str, torch.Tensor], client_stats: dict[str, dict[str, float]],
                   history: dict[str, RunningStats] | None = None) -> dict:
    """One metrics.jsonl record of the distributed runtime for reward scores ``{label: [B, K]}``;
    ``history`` holds the run's running reward statistics (updated here)."""
    stats: dict = {}
    history = {} if history is None else history
    for label, values in scores.items():
        flat = values.flatten()
        valid = flat[~torch.isnan(flat)]
        stats[f"reward/{label}/mean"] = float(valid.mean()) if valid.numel() else math.nan
        stats[f"reward/{label}/missing"] = float(flat.numel() - valid.numel())
        running = history.setdefault(label, RunningStats())
        running.update(flat)
        stats[f"reward/{label}/normalized"] = running.normalize(stats[f"reward/{label}/mean"])
    first = next(iter(scores))
    ensemble = sum(scores.values()) / len(scores)  # equal weights: [B, K]
    valid = ensemble.flatten()[~torch.isnan(ensemble.flatten())]
    stats["reward/mean"] = float(valid.mean()) if valid.numel() else math.nan
    stats["reward/std"] = float(valid.std()) if valid.numel() > 1 else 0.0
    within = [row[~torch.isnan(row)].std() for row in ensemble if (~torch.isnan(row)).sum() > 1]
    stats["reward/std_within_prompt"] = float(torch.stack(within).mean()) if within else 0.0
    stats["trainer/steps"] = 1000.0
    stats.update({f"eval/{k}": v for k, v in {"base_mean": 0.3, "policy_mean": 0.4, "gain": 0.1, "gain_se": 0.01,
                                              "z": 10.0, "n": 64.0, "n_prompts": 16.0}.items()})
    for label, counters in client_stats.items():  # the scorer's pop_stats, summed over the step's groups
        for key, value in counters.items():
            stats[f"reward/{label}/{key}"] = stats.get(f"reward/{label}/{key}", 0.0) + value
    # the learner's update: ranking → anchors → drift loss of the first kept group
    selection = select_anchors(scores[first], M)
    groups = scores[first].shape[0]
    stats.update({"update/groups": float(groups), "update/kept_groups": float(selection.keep.sum()),
                  "update/applied": float(bool(selection.keep.any()))})
    stats.update({f"skipped/{reason}": float(n) for reason, n in selection.skipped.items()})
    kept = [b for b in range(groups) if selection.keep[b]]
    if kept:
        feats, ref = features(step), features(10_000 + step)
        b = kept[0]
        pos = {k: v[selection.pos_idx[b]] for k, v in feats.items()}
        neg = {k: v[selection.neg_idx[b]] for k, v in feats.items()}
        cfg = AlgoConfig(num_candidates=K, num_anchors=M)
        loss, drift = drpo_group_loss(feats, pos, neg, ref, cfg)
        stats.update(drift)
        stats.update({"loss": float(loss), "update/grad_norm": 0.5 + 0.01 * step, "update/lr": 1e-4,
                      "update/policy_lag": 0.5})
    lags = [step % 2, 1, 0, (step // 3) % 3]
    stats.update({
        "step": step, "version": step, "sampler/extra_rounds": float(step % 2),
        "time/sample_score_s": 0.6, "time/update_s": 0.35, "time/step_s": 1.0,
        "timing/wait_groups_s": 0.6, "timing/wait_update_s": 0.3, "timing/publish_s": 0.05,
        "timing/generate_s": 1.8, "timing/weights_sync_s": 0.1, "timing/score_s": 0.9, "timing/update_s": 0.3,
        "lag/mean": sum(lags) / len(lags), "lag/max": float(max(lags)), "lag/groups": lags,
        "runtime/groups_reissued": float(step // 3), "runtime/groups_regenerated": float(step // 8),
        "runtime/duplicates_dropped": float(step // 5),
        "runtime/missing_groups": float(step // 4), "runtime/staleness_fallbacks": float(step // 6),
        "runtime/learner_restarts": float(step // 10),
        "runtime/weight_sync_epochs": 1.0 + step // 12, "runtime/weight_sync_failures": float(step // 12),
        "pool/generator/replicas": 4.0, "pool/reward/replicas": 2.0 - (step % 5 == 0),
        "pool/generator/restarts": float(step // 7), "pool/reward/restarts": float(step // 4),
        "pool/generator/timeouts": float(step // 9), "pool/reward/timeouts": float(step // 5),
        "placement/generator/cuda:0/float16+fp16": 4.0, "placement/reward/cuda:0/float32": 2.0,
        "placement/learner/cuda:0/float16+fp16": 1.0,
    })
    return stats


class LiveStack:
    def __init__(self, prometheus_bin: str, prom_dir: Path, workdir: Path):
        self.prometheus_bin, self.prom_dir, self.workdir = prometheus_bin, prom_dir, workdir
        self.url = ""
        self._stop = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._server_cm = self._exporter = self._feeder = None
        self._clients: list = []
        self.feed_error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        from drpo_core.rewards.http import HttpReward
        from drpo_core.rewards.hue import HueFractionReward
        from services.observability.metrics import MetricsExporter
        from services.rewards.server import create_app

        self._exporter = MetricsExporter(run="deploy-test")
        exporter_port = self._exporter.serve(0, host="127.0.0.1")
        reward = HueFractionReward()
        self._server_cm = uvicorn_server(create_app(reward, name="hue_fraction", version=reward.version, token=TOKEN))
        server_url = self._server_cm.__enter__()
        common = dict(timeout_s=5.0, max_retries=0, batch_size=K, backoff_s=0.0)
        self._clients = [HttpReward(f"{server_url}/score", token=TOKEN, label="hue_fraction", **common),
                         HttpReward(f"{server_url}/score", token="wrong-token", label="bad_token", **common)]
        self._write_config(f"127.0.0.1:{exporter_port}", server_url.removeprefix("http://"))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.workdir / "prometheus.log", "w")
        self._proc = subprocess.Popen(
            [self.prometheus_bin, f"--config.file={self.workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT)
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()
        self._wait("Prometheus ready", lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 30)
        for metric in ("drpo_step", "drpo_reward_server_images_scored_total"):
            self._wait(f"6 scrapes of {metric}",
                       lambda m=metric: any(float(s["value"][1]) >= 6 for s in self.query(f"count_over_time({m}[1m])")), 40)
        self._wait("every rule evaluated", lambda: len(self.rule_health()) and all(
            h != "unknown" for h in self.rule_health().values()), 20)
        time.sleep(2.5)

    def stop(self) -> None:
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join(timeout=10)
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._log.close()
        for client in self._clients:
            client.close()
        if self._server_cm is not None:
            self._server_cm.__exit__(None, None, None)
        if self._exporter is not None:
            self._exporter.close()

    def _write_config(self, exporter: str, reward_server: str) -> None:
        """deploy/prometheus/prometheus.yml with its targets on this machine: same jobs, labels and rules."""
        cfg = yaml.safe_load((self.prom_dir / "prometheus.yml").read_text())
        cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        cfg["rule_files"] = [str(self.prom_dir / cfg["rule_files"][0])]
        targets = {"drpo-controller": exporter, "drpo-reward-server": reward_server}
        for job in cfg["scrape_configs"]:
            if job["job_name"] in targets:
                job["static_configs"] = [{"targets": [targets.pop(job["job_name"])]}]
            else:  # Ray's service-discovery file: no Ray cluster here, so no targets
                (self.workdir / "ray_sd.json").write_text("[]")
                job["file_sd_configs"] = [{"files": [str(self.workdir / "ray_sd.json")]}]
        assert not targets, f"deploy/prometheus/prometheus.yml lost the jobs {sorted(targets)}"
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(cfg))

    def _feed(self) -> None:
        step, gen, history = 0, torch.Generator().manual_seed(0), {}
        try:
            while not self._stop.is_set():
                step += 1
                images = torch.rand(len(PROMPTS), K, 3, 16, 16, generator=gen)
                images[1] = images[1, :1].clone()  # one group of identical candidates: constant scores
                prompts = [p for p in PROMPTS for _ in range(K)]
                flat = images.reshape(-1, 3, 16, 16)
                scores = {c.label: c(flat, prompts).view(len(PROMPTS), K) for c in self._clients}
                client_stats = {c.label: c.pop_stats() for c in self._clients}
                unmapped = self._exporter.export(training_stats(step, scores, client_stats, history))
                assert not unmapped, unmapped
                self._stop.wait(STEP_PERIOD_S)
        except BaseException as e:  # surfaced by _wait / the tests instead of dying silently
            self.feed_error = e

    def _wait(self, what: str, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.feed_error is not None:
                raise RuntimeError(f"the metrics feeder failed: {self.feed_error!r}")
            if self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, RuntimeError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"waited {timeout_s}s for {what}; prometheus log: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.workdir / "prometheus.log"
        return path.read_text()[-2000:] if path.exists() else ""

    # -- the HTTP API -----------------------------------------------------------------------------------
    def query(self, expr: str) -> list[dict]:
        """``/api/v1/query`` at now; raises RuntimeError with Prometheus' message on a parse/eval error."""
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        if answer.get("status") != "success":
            raise RuntimeError(f"{expr!r}: {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        answer = httpx.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10).json()
        return answer["data"]

    def rule_health(self) -> dict[str, str]:
        groups = httpx.get(f"{self.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {r["name"]: r["health"] for g in groups for r in g["rules"]}

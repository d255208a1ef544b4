"""Series the actors export themselves through ``ray.util.metrics``.

Ray's per-node metrics export (``MetricsExportPort``; what KubeRay's Prometheus integration scrapes, see
k8s/podmonitor.*) carries them with a ``ray_`` prefix, next to the driver's step metrics (services/observability/metrics.py):
a generator, reward replica or learner on any node reports where it runs, even while the driver waits.

=====================================  ==========  =================================================
series (as Prometheus sees it)         role        what
=====================================  ==========  =================================================
ray_drpo_actor_images_total            generator   candidates generated
ray_drpo_actor_generate_seconds        generator   one generate call (histogram)
ray_drpo_actor_weight_sync_seconds     generator   taking a new weight version (histogram)
ray_drpo_actor_weights_version         gen., lrn.  the policy version the actor holds
ray_drpo_actor_score_seconds           reward      one group scored (histogram)
ray_drpo_actor_scored_images_total     reward      candidates scored
ray_drpo_actor_score_failures_total    reward      score calls that raised
ray_drpo_actor_update_seconds          learner     one update (histogram)
ray_drpo_actor_policy_lag_versions     learner     mean lag of the last update's groups
ray_drpo_actor_published_bytes_total   learner     weight bytes published (object store or broadcast)
=====================================  ==========  =================================================

Every series has the tags ``run`` (output.run_name or the run folder's name, as the driver's ``run`` label),
``role`` and ``replica`` (the actor's id, 8 hex digits: one series per replica).
"""

from __future__ import annotations

from pathlib import Path

SECONDS_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TAGS = ("run", "role", "replica")
# attribute → (ray.util.metrics kind, name, description): the one table the actors, the dashboard test and the docs read
SERIES = {
    "images": ("counter", "drpo_actor_images", "candidates generated"),
    "generate_s": ("histogram", "drpo_actor_generate_seconds", "seconds of one generate call"),
    "sync_s": ("histogram", "drpo_actor_weight_sync_seconds", "seconds taking a new weight version"),
    "version": ("gauge", "drpo_actor_weights_version", "policy version the actor holds"),
    "score_s": ("histogram", "drpo_actor_score_seconds", "seconds scoring one group"),
    "scored": ("counter", "drpo_actor_scored_images", "candidates scored"),
    "failures": ("counter", "drpo_actor_score_failures", "score calls that raised"),
    "update_s": ("histogram", "drpo_actor_update_seconds", "seconds of one learner update"),
    "lag": ("gauge", "drpo_actor_policy_lag_versions", "mean lag of the last update's groups"),
    "published": ("counter", "drpo_actor_published_bytes", "weight bytes published"),
}


def exported_names() -> set[str]:
    """The sample names Ray's export gives these series (``ray_`` prefix; counters ``_total``)."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_count", "_sum"]}
    return {f"ray_{name}{sfx}" for kind, name, _ in SERIES.values() for sfx in suffixes[kind]}


def run_label(cfg) -> str:
    return cfg.output.run_name or Path(cfg.output.dir).name


class ActorMetrics:
    """The series of one actor; outside a Ray worker (a test constructing the actor class) it records nothing."""

    def __init__(self, cfg, role: str):
        import ray

        self.enabled = ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
        if not self.enabled:
            return
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"run": run_label(cfg), "role": role, "replica": ray.get_runtime_context().get_actor_id()[:8]}
        for attr, (kind, name, description) in SERIES.items():
            if kind == "histogram":
                metric = Histogram(name, description=description, boundaries=SECONDS_BUCKETS, tag_keys=TAGS)
            else:
                metric = (Counter if kind == "counter" else Gauge)(name, description=description, tag_keys=TAGS)
            setattr(self, attr, metric)

    def generated(self, images: int, seconds: float, sync_seconds: float, version: int) -> None:
        if self.enabled:
            self.images.inc(images, tags=self.tags)
            self.generate_s.observe(seconds, tags=self.tags)
            if sync_seconds > 0:
                self.sync_s.observe(sync_seconds, tags=self.tags)
            self.version.set(version, tags=self.tags)

    def scored_group(self, images: int, seconds: float) -> None:
        if self.enabled:
            self.scored.inc(images, tags=self.tags)
            self.score_s.observe(seconds, tags=self.tags)

    def score_failed(self) -> None:
        if self.enabled:
            self.failures.inc(1, tags=self.tags)

    def updated(self, seconds: float, version: int, lag: float) -> None:
        if self.enabled:
            self.update_s.observe(seconds, tags=self.tags)
            self.version.set(version, tags=self.tags)
            self.lag.set(lag, tags=self.tags)

    def published_bytes(self, n: int) -> None:
        if self.enabled and n > 0:
            self.published.inc(n, tags=self.tags)

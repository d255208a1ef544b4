"""Every Prometheus metric of a training job, declared in one table, mapped 1:1 from metrics.jsonl keys.

A key ``a/b_s`` becomes ``drpo_a_b_seconds``; a path segment in braces (``reward/{reward}/mean``) becomes
a label, so a run with two rewards exports ``drpo_reward_model_mean{reward="hps"}`` and
``{reward="clip"}``; every series also has ``run``. Cumulative totals are counters (``_total``); ``lag/groups`` (the policy lag of
every prompt group of the step) feeds a histogram. The controller serves them with prometheus_client
on ``runtime.metrics_port`` (0 = off). Dashboards and alerts query exactly these names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass(frozen=True)
class MetricSpec:
    key: str      # metrics.jsonl key; {name} segments become labels
    name: str     # Prometheus name (counters get _total appended by the client library)
    kind: str     # gauge | counter | histogram
    help: str

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w+)\}", self.key))

    @property
    def pattern(self) -> re.Pattern:
        parts = [f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") else re.escape(p) for p in self.key.split("/")]
        return re.compile("/".join(parts) + "$")


G, C, H = "gauge", "counter", "histogram"
METRICS: tuple[MetricSpec, ...] = (
    # progress
    MetricSpec("step", "drpo_step", G, "optimizer steps done"),
    MetricSpec("trainer/steps", "drpo_trainer_steps", G, "trainer.steps: the step the run ends at (progress, ETA)"),
    MetricSpec("version", "drpo_version", G, "weight version of the learner (updates applied)"),
    # rewards of the step's first-round candidates (NaN scores excluded); reward/mean is the weighted ensemble
    # Σ_i w_i r_i / Σ_i w_i of rewards[] per candidate (one reward: its own mean), each reward on its own below
    MetricSpec("reward/mean", "drpo_reward_mean", G, "mean over the step's candidates of the weighted reward ensemble"),
    MetricSpec("reward/std", "drpo_reward_std", G, "std over the step's candidates of the weighted reward ensemble"),
    MetricSpec("reward/std_within_prompt", "drpo_reward_std_within_prompt", G,
               "ensemble std among one prompt's candidates, averaged over the step's prompts (no between-prompt spread)"),
    MetricSpec("reward/{reward}/mean", "drpo_reward_model_mean", G, "mean score of one reward model"),
    MetricSpec("reward/{reward}/missing", "drpo_reward_model_missing", G, "candidates without a score (NaN) this step"),
    MetricSpec("reward/{reward}/normalized", "drpo_reward_model_normalized", G, "step mean in std devs of the run's history"),
    MetricSpec("reward/{reward}/{stat}", "drpo_reward_model_stat", G, "a reward's own counters since the last step"),
    MetricSpec("sampler/extra_rounds", "drpo_sampler_extra_rounds", G, "extra K-candidate rounds for binary rewards"),
    # the update
    MetricSpec("loss", "drpo_loss", G, "DrPO loss (preference + λ_ref · reference)"),
    MetricSpec("loss/pref", "drpo_loss_pref", G, "preference drift loss"),
    MetricSpec("loss/ref", "drpo_loss_ref", G, "reference drift loss"),
    MetricSpec("drift/{feature}/pref_norm", "drpo_drift_pref_norm", G, "RMS norm of the preference drift per feature key"),
    MetricSpec("drift/{feature}/ref_norm", "drpo_drift_ref_norm", G, "RMS norm of the reference drift per feature key"),
    MetricSpec("update/groups", "drpo_update_groups", G, "prompt groups given to the update"),
    MetricSpec("update/kept_groups", "drpo_update_kept_groups", G, "groups with valid top-M / bottom-M anchors"),
    MetricSpec("update/applied", "drpo_update_applied", G, "1 if the optimizer stepped"),
    MetricSpec("update/grad_norm", "drpo_update_grad_norm", G, "gradient norm before clipping"),
    MetricSpec("update/lr", "drpo_update_lr", G, "learning rate"),
    MetricSpec("update/policy_lag", "drpo_update_policy_lag", G, "mean versions between sampling and learning weights"),
    MetricSpec("skipped/{reason}", "drpo_skipped_groups", G, "groups skipped by the ranking, by reason"),
    MetricSpec("placement/{role}/{device}/{dtype}", "drpo_role_replicas", G, "live replicas of a role by device and dtype"),
    # wall time: time/* as in the local trainer, timing/* per stage of the distributed runtime
    MetricSpec("time/sample_score_s", "drpo_time_sample_score_seconds", G, "controller time until the step's groups were scored"),
    MetricSpec("time/update_s", "drpo_time_update_seconds", G, "controller time until the update was applied and published"),
    MetricSpec("time/step_s", "drpo_time_step_seconds", G, "wall time of the step"),
    MetricSpec("timing/wait_groups_s", "drpo_timing_wait_groups_seconds", G, "controller blocked on generation + scoring"),
    MetricSpec("timing/wait_update_s", "drpo_timing_wait_update_seconds", G, "controller blocked on the learner update"),
    MetricSpec("timing/publish_s", "drpo_timing_publish_seconds", G, "learner state → object store"),
    MetricSpec("timing/generate_s", "drpo_timing_generate_seconds", G, "generator compute summed over the step's groups"),
    MetricSpec("timing/weights_sync_s", "drpo_timing_weights_sync_seconds", G, "generator weight pulls for the step's groups"),
    MetricSpec("timing/score_s", "drpo_timing_score_seconds", G, "reward compute summed over the step's groups"),
    MetricSpec("timing/update_s", "drpo_timing_update_seconds", G, "learner compute of the update"),
    # staleness
    MetricSpec("lag/mean", "drpo_lag_mean", G, "mean policy lag (versions) of the step's groups"),
    MetricSpec("lag/max", "drpo_lag_max", G, "max policy lag of the step's groups"),
    MetricSpec("lag/groups", "drpo_policy_lag_versions", H, "policy lag of every prompt group"),
    # faults (cumulative since the controller started)
    MetricSpec("runtime/groups_reissued", "drpo_runtime_groups_reissued", C, "generate/score requests re-issued after a failure or deadline"),
    MetricSpec("runtime/groups_regenerated", "drpo_runtime_groups_regenerated", C, "groups made again because their data died with a node"),
    MetricSpec("runtime/duplicates_dropped", "drpo_runtime_duplicates_dropped", C, "late or repeated results dropped"),
    MetricSpec("runtime/missing_groups", "drpo_runtime_missing_groups", C, "groups whose scoring failed every attempt (scores missing)"),
    MetricSpec("runtime/staleness_fallbacks", "drpo_runtime_staleness_fallbacks", C, "steps sampled past max_staleness after the wait timed out"),
    MetricSpec("runtime/learner_restarts", "drpo_runtime_learner_restarts", C, "learner recoveries from the last checkpoint"),
    MetricSpec("runtime/weight_sync_epochs", "drpo_runtime_weight_sync_epochs", C, "broadcast groups formed (collective weight sync)"),
    MetricSpec("runtime/weight_sync_failures", "drpo_runtime_weight_sync_failures", C, "weight broadcasts some generator missed (fetched from the learner instead)"),
    MetricSpec("pool/{pool}/replicas", "drpo_pool_replicas", G, "live replicas of a pool"),
    MetricSpec("pool/{pool}/restarts", "drpo_pool_restarts", C, "replica restarts (by Ray or replaced by the pool)"),
    MetricSpec("pool/{pool}/timeouts", "drpo_pool_timeouts", C, "calls that ran past runtime.request_timeout_s"),
    # the held-out base-vs-policy evaluation, exported once at the end of the run
    MetricSpec("eval/{stat}", "drpo_eval", G, "held-out evaluation: base_mean, policy_mean, gain, gain_se, z, n, n_prompts"),
)
LAG_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)


def spec_for(key: str) -> tuple[MetricSpec, dict[str, str]] | None:
    """The first spec whose key pattern matches ``key``, with the label values."""
    for spec in METRICS:
        m = spec.pattern.match(key)
        if m:
            return spec, m.groupdict()
    return None


class MetricsExporter:
    """Holds the Prometheus objects of :data:`METRICS` in its own registry; :meth:`export` takes one step's stats.

    Every series carries ``run`` (output.run_name, else the run folder's name): two runs that reuse one pod
    address stay two series, and a resumed run (same folder) continues its own."""

    def __init__(self, run: str = ""):
        self.registry = CollectorRegistry()
        self.run = run
        self._metrics = {}
        for s in METRICS:
            labels = (*s.labels, "run")
            if s.kind == G:
                self._metrics[s.name] = Gauge(s.name, s.help, labels, registry=self.registry)
            elif s.kind == C:
                self._metrics[s.name] = Counter(s.name, s.help, labels, registry=self.registry)
            else:
                self._metrics[s.name] = Histogram(s.name, s.help, labels, buckets=LAG_BUCKETS, registry=self.registry)
        self._totals: dict[tuple, float] = {}
        self._server = None

    def export(self, stats: dict) -> list[str]:
        """Set/advance every metric named by ``stats``; returns keys with no entry in the table."""
        unmapped = []
        for key, value in stats.items():
            found = spec_for(key)
            if found is None:
                unmapped.append(key)
                continue
            spec, labels = found
            metric = self._metrics[spec.name].labels(**labels, run=self.run)
            if value is None:
                continue
            if spec.kind == G:
                metric.set(float(value))
            elif spec.kind == H:
                for v in value:
                    metric.observe(float(v))
            else:  # a cumulative total: advance by the increase (a restarted controller starts from zero)
                ident = (spec.name, tuple(sorted(labels.items())))
                last = self._totals.get(ident, 0.0)
                metric.inc(max(0.0, float(value) - last) if float(value) >= last else float(value))
                self._totals[ident] = float(value)
        return unmapped

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

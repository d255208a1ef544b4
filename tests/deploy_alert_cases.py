"""``promtool test rules`` cases for deploy/prometheus/rules.yml: each alert, one "bad" series that must
fire and "good" ones that must not, at one evaluation time (1-minute samples).

promtool compares the alert's annotations too; the rules are copied without them (their templates are
checked by ``promtool check rules``), so a case states what the alert decides: expression, ``for`` and labels.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def c(instance: str, **labels: str) -> str:
    """Label set of a controller series (job as in deploy/prometheus/prometheus.yml and k8s/podmonitor.yaml)."""
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return f'{{job="drpo-controller", instance="{instance}"{extra}}}'


def s(instance: str, **labels: str) -> str:
    extra = "".join(f', {k}="{v}"' for k, v in labels.items())
    return f'{{job="drpo-reward-server", instance="{instance}"{extra}}}'


def alternating(a: float, b: float, n: int) -> str:
    return " ".join(str(a if i % 2 == 0 else b) for i in range(n))


CTRL = {"job": "drpo-controller", "instance": "bad"}
SERVER = {"job": "drpo-reward-server", "instance": "bad"}
ALERT_CASES = [
    {"alert": "DrpoRewardStalled", "at": "2h30m", "series": {
        "drpo_reward_mean" + c("bad"): "0.5x180", "drpo_step" + c("bad"): "0+1x180",
        "drpo_reward_mean" + c("good"): "0.3+0.001x180", "drpo_step" + c("good"): "0+1x180",
        "drpo_reward_mean" + c("idle"): "0.5x180", "drpo_step" + c("idle"): "7x180",  # no steps: not stalled, stopped
        # a plateau past half of trainer.steps is convergence, not a stall
        "drpo_reward_mean" + c("converged"): "0.5x180", "drpo_step" + c("converged"): "600+1x180",
        **{"drpo_trainer_steps" + c(i): "1000x180" for i in ("bad", "good", "idle", "converged")}},
     "fire": [{**CTRL, "severity": "warning"}]},
    {"alert": "DrpoLossNotFinite", "at": "5m", "series": {
        "drpo_loss" + c("bad"): "1 1 NaN NaN NaN NaN", "drpo_loss" + c("inf"): "1 1 +Inf +Inf +Inf +Inf",
        "drpo_loss" + c("good"): "1 0.9 0.8 0.7 0.6 0.5"},
     "fire": [{**CTRL, "severity": "critical"}, {**CTRL, "instance": "inf", "severity": "critical"}]},
    {"alert": "DrpoDriftNotFinite", "at": "5m", "series": {
        "drpo_drift_pref_norm" + c("bad", feature="layer4_mean"): "0.1 0.1 NaN NaN NaN NaN",
        "drpo_drift_pref_norm" + c("bad", feature="layer4_std"): "0.1x5",
        "drpo_drift_ref_norm" + c("bad", feature="layer4_mean"): "0.2x5"},
     "fire": [{**CTRL, "feature": "layer4_mean", "severity": "critical"}]},
    {"alert": "DrpoTrainingMetricsAbsent", "at": "50m", "series": {
        "up" + c("bad"): "1x30 0x30", "up" + c("never-up"): "0x60", "up" + c("good"): "1x60",
        "up" + c("blip"): "1x40 0x5 1x15"},
     "fire": [{**CTRL, "severity": "critical"}]},
    {"alert": "DrpoPolicyLagAboveMaxStaleness", "at": "20m", "series": {
        "drpo_lag_max" + c("bad"): "2x30", "drpo_lag_max" + c("good"): "1x30",
        "drpo_lag_max" + c("spiky"): alternating(1, 3, 31)},
     "fire": [{**CTRL, "severity": "warning"}]},
    {"alert": "DrpoStalenessFallbacks", "at": "15m", "series": {
        "drpo_runtime_staleness_fallbacks_total" + c("bad"): "0x10 1x10",
        "drpo_runtime_staleness_fallbacks_total" + c("good"): "3x20"},
     "fire": [{**CTRL, "severity": "info"}]},
    {"alert": "DrpoNoOptimizerUpdates", "at": "30m", "series": {
        "drpo_version" + c("bad"): "5x40", "drpo_version" + c("good"): "0+1x40"},
     "fire": [{**CTRL, "severity": "critical"}]},
    {"alert": "DrpoScoresMissingEveryStep", "at": "25m", "series": {
        "drpo_reward_model_missing" + c("bad", reward="pickscore"): "3x30",
        "drpo_reward_model_missing" + c("good", reward="pickscore"): alternating(0, 3, 31)},
     "fire": [{**CTRL, "reward": "pickscore", "severity": "warning"}]},
    {"alert": "DrpoScoringFailedGroups", "at": "15m", "series": {
        "drpo_runtime_missing_groups_total" + c("bad"): "0x10 2x10",
        "drpo_runtime_missing_groups_total" + c("good"): "0x20"},
     "fire": [{**CTRL, "severity": "warning"}]},
    {"alert": "DrpoPoolRestarts", "at": "10m", "series": {
        "drpo_pool_restarts_total" + c("bad", pool="reward"): "0x5 1x10",
        "drpo_pool_restarts_total" + c("bad", pool="generator"): "2x15"},
     "fire": [{**CTRL, "pool": "reward", "severity": "warning"}]},
    {"alert": "DrpoPoolTimeouts", "at": "35m", "series": {
        "drpo_pool_timeouts_total" + c("bad", pool="generator"): "0+1x40",
        "drpo_pool_timeouts_total" + c("good", pool="generator"): "3x40",
        "drpo_pool_timeouts_total" + c("once", pool="generator"): "0x5 1x35"},
     "fire": [{**CTRL, "pool": "generator", "severity": "warning"}]},
    {"alert": "DrpoLearnerRestarted", "at": "10m", "series": {
        "drpo_runtime_learner_restarts_total" + c("bad"): "0x5 1x10",
        "drpo_runtime_learner_restarts_total" + c("good"): "1x15"},
     "fire": [{**CTRL, "severity": "warning"}]},
    {"alert": "DrpoRewardServerMissingScores", "at": "30m", "series": {
        "drpo_reward_server_images_scored_total" + s("bad"): "0+100x40",
        "drpo_reward_server_missing_scores_total" + s("bad"): "0+10x40",
        "drpo_reward_server_images_scored_total" + s("good"): "0+100x40",
        "drpo_reward_server_missing_scores_total" + s("good"): "0+1x40"},
     "fire": [{**SERVER, "severity": "warning"}]},
    {"alert": "DrpoRewardServerErrors", "at": "15m", "series": {
        "drpo_reward_server_requests_total" + s("bad", transport="http", route="/score", status="500"): "0+5x20",
        "drpo_reward_server_requests_total" + s("bad", transport="http", route="/score", status="200"): "0+50x20",
        "drpo_reward_server_requests_total" + s("good", transport="http", route="/score", status="200"): "0+50x20",
        "drpo_reward_server_requests_total" + s("good", transport="http", route="/healthz", status="500"): "0+1x20"},
     "fire": [{**SERVER, "severity": "warning"}]},
]


def promtool_tests(rules: Path, workdir: Path) -> tuple[Path, Path]:
    """Write the rules without annotations and a promtool test file with every case; returns both paths."""
    groups = yaml.safe_load(rules.read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_out, tests_out = workdir / "rules.yml", workdir / "rules_test.yml"
    rules_out.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    tests = [{"interval": "1m",
              "input_series": [{"series": name, "values": values} for name, values in case["series"].items()],
              "alert_rule_test": [{"eval_time": case["at"], "alertname": case["alert"],
                                   "exp_alerts": [{"exp_labels": labels} for labels in case["fire"]]}]}
             for case in ALERT_CASES]
    tests_out.write_text(yaml.safe_dump({"rule_files": [rules_out.name], "evaluation_interval": "1m", "tests": tests},
                                        sort_keys=False))
    return rules_out, tests_out

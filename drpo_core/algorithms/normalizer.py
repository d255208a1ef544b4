"""Running reward statistics, so that rewards on different scales can be compared on dashboards.

Ranking never uses these (it z-scores within each prompt group); they only report how far a step's
mean reward sits from the run's history, in standard deviations (``reward/<label>/normalized``).
"""

from __future__ import annotations

import math

import torch


class RunningStats:
    """Welford mean/variance over every valid score seen so far; JSON-serialisable state."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        for v in values[~torch.isnan(values)].double().tolist():
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else float("nan")

    def normalize(self, value: float) -> float:
        std = self.std
        return (value - self.mean) / std if std and std == std and std > 0 else float("nan")

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])

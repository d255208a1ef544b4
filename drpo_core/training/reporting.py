"""Run outputs: metrics.jsonl and the reward curve (image grids: grids.py; TensorBoard / W&B: tracking.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsWriter:
    """Appends one JSON object per step; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a")

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._fh.write(json.dumps(clean) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def rewind(self, step: int) -> int:
        """Back to the state after ``step`` (a rollback or resume from that step's checkpoint): see :func:`rewind_metrics`."""
        self._fh.close()
        moved = rewind_metrics(self.path, step)
        self._fh = self.path.open("a")
        return moved


def rewind_metrics(path: Path, step: int) -> int:
    """Keep the rows of steps ≤ ``step`` in ``path``, so a reader sees each step once after the steps past a
    resumed checkpoint are trained again. The rows taken out are appended to ``<name>.rolled_back.jsonl``
    next to it (nothing written is lost); returns how many rows moved."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep, moved = [], []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except json.JSONDecodeError:  # a line torn by a kill mid-write
            moved.append(line)
            continue
        (keep if row_step is not None and row_step <= step else moved).append(line)
    if moved:
        with path.with_name(path.stem + ".rolled_back.jsonl").open("a") as fh:
            fh.writelines(line + "\n" for line in moved)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(moved)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def plot_reward_curve(metrics_path: Path, out: Path, window: int = 20) -> Path:
    """``reward/mean`` (the weighted ensemble) per step and smoothed; with several rewards, a second panel
    has each reward's mean in standard deviations of its own history (``reward/<label>/normalized``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_rows = read_metrics(metrics_path)
    rows = [r for r in all_rows if r.get("reward/mean") is not None]
    labels = sorted({k.split("/")[1] for r in all_rows for k in r if k.startswith("reward/") and k.endswith("/normalized")})
    panels = 2 if len(labels) > 1 else 1
    fig, axes = plt.subplots(panels, 1, figsize=(6, 3.5 * panels), dpi=100, squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in rows]
    means = [r["reward/mean"] for r in rows]
    ensemble = "weighted reward ensemble" if len(labels) > 1 else "reward"
    ax.plot(steps, means, alpha=0.35, lw=1, label=f"{ensemble} (per step)")
    if len(means) >= 2:
        w = max(1, min(window, len(means) // 5 or 1))
        ax.plot(steps, _moving_average(means, w), lw=2, label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("reward, weighted ensemble" if len(labels) > 1 else "reward of sampled candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if panels == 2:
        ax = axes[1][0]
        for label in labels:
            pts = [(r["step"], r[f"reward/{label}/normalized"]) for r in all_rows if r.get(f"reward/{label}/normalized") is not None]
            if pts:
                w = max(1, min(window, len(pts) // 5 or 1))
                ax.plot([p[0] for p in pts], _moving_average([p[1] for p in pts], w), lw=1.5, label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("each reward (std devs of its history)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out

"""Run outputs: metrics.jsonl, the reward curve and image grids."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


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


def plot_reward_curve(metrics_path: Path, out: Path, window: int = 20) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("reward/mean") is not None]
    steps = [r["step"] for r in rows]
    means = [r["reward/mean"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, means, alpha=0.35, lw=1, label="reward/mean (per step)")
    if len(means) >= 2:
        w = max(1, min(window, len(means) // 5 or 1))
        smooth = [sum(means[max(0, i - w + 1):i + 1]) / len(means[max(0, i - w + 1):i + 1]) for i in range(len(means))]
        ax.plot(steps, smooth, lw=2, label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("reward of sampled candidates")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def save_grid(images: torch.Tensor, rows: int, path: Path, upscale: int = 2) -> Path:
    """Save `[rows·cols, 3, H, W]` images in [0, 1] as one PNG grid (rows = prompts, cols = seeds)."""
    from torchvision.utils import make_grid, save_image

    if upscale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=upscale, mode="nearest")
    grid = make_grid(images, nrow=images.shape[0] // rows, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path

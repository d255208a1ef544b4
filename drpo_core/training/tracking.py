"""Experiment tracking on the driver: metrics.jsonl plus TensorBoard (default) and/or Weights & Biases.

One :class:`RunTracker` per job, owned by whoever runs the loop (the local trainer, or the Ray
controller on the driver), so a distributed run still has exactly one writer. Per logged step it
writes the JSON line and every numeric stat as a scalar under its metrics.jsonl key
(``reward/mean`` = the weighted ensemble, ``reward/<label>/mean`` each reward, ``loss``, ``time/*``);
sample grids are logged from their PNG files with the caption stored in the file (see grids.py), and
the resolved config goes in once as text.

TensorBoard: ``torch.utils.tensorboard.SummaryWriter`` into ``<run>/tensorboard`` (``tensorboard
--logdir runs/``). A resumed run passes ``purge_step`` so that steps logged after the checkpoint by the
interrupted attempt are dropped. W&B (``output.tracker: wandb`` or ``both``; ``pip install wandb``):
``wandb.init(dir=<run>)``, offline with ``output.wandb_mode: offline`` or ``WANDB_MODE=offline``
(``wandb sync`` uploads later); the run id is kept in ``<run>/wandb_run_id`` so a resumed job continues
the same W&B run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from drpo_core.training.grids import read_caption
from drpo_core.training.reporting import MetricsWriter


class TrackerError(RuntimeError):
    """A tracker that was asked for cannot start (e.g. wandb not installed); one line for the user."""


def _scalars(stats: dict) -> dict[str, float]:
    out = {}
    for key, value in stats.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class TensorBoardBackend:
    def __init__(self, log_dir: Path, purge_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def config(self, text: str) -> None:
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)  # indented: markdown code block

    def scalars(self, values: dict[str, float], lists: dict[str, list], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        for key, value in lists.items():
            if value:
                self.writer.add_histogram(key, np.asarray(value, dtype=np.float64), step)
        self.writer.flush()  # live curves: TensorBoard reads what is on disk

    def image(self, tag: str, path: Path, caption: str, step: int) -> None:
        self.writer.add_image(tag, _load_png(path), step, dataformats="HWC")
        if caption:
            self.writer.add_text(f"{tag}/caption", caption, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, out: Path, output_cfg, config: dict, resuming: bool):
        try:
            import wandb
        except ImportError:
            raise TrackerError("output.tracker asks for wandb, which is not installed (pip install wandb), "
                               "or set output.tracker: tensorboard") from None
        self.wandb = wandb
        id_file = out / "wandb_run_id"
        run_id = id_file.read_text().strip() if resuming and id_file.is_file() else None
        self.run = wandb.init(project=output_cfg.wandb_project, name=output_cfg.run_name or out.name, dir=str(out),
                              config=config, mode=output_cfg.wandb_mode, id=run_id, resume="allow" if run_id else None)
        id_file.write_text(self.run.id)

    def config(self, text: str) -> None:
        pass  # wandb.init(config=...) already holds it

    def scalars(self, values: dict[str, float], lists: dict[str, list], step: int) -> None:
        logged = dict(values)
        logged.update({k: self.wandb.Histogram(v) for k, v in lists.items() if v})
        self.run.log(logged, step=step)

    def image(self, tag: str, path: Path, caption: str, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path), caption=caption or None)}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunTracker:
    """metrics.jsonl + the configured trackers; ``write`` one step's stats, ``image`` a saved grid."""

    def __init__(self, out: Path, cfg, start_step: int = 0, resuming: bool = False):
        from drpo_core.config import dump_config

        out = Path(out)
        self.metrics = MetricsWriter(out / "metrics.jsonl")
        self.metrics.rewind(start_step)  # rows of steps past the checkpoint (a killed run) are trained again: each step once
        self.backends: list = []
        kind = cfg.output.tracker
        try:
            if kind in ("tensorboard", "both"):
                # purge what an interrupted attempt logged past the restart point (also before any checkpoint)
                purge = start_step + 1 if resuming or (out / "tensorboard").exists() else None
                self.backends.append(TensorBoardBackend(out / "tensorboard", purge_step=purge))
            if kind in ("wandb", "both"):
                self.backends.append(WandbBackend(out, cfg.output, cfg.model_dump(mode="json"), resuming))
        except Exception:
            self.close()
            raise
        if not resuming:
            for b in self.backends:
                b.config(dump_config(cfg))

    def write(self, stats: dict) -> None:
        self.metrics.write(stats)
        step = int(stats["step"])
        values = _scalars(stats)
        lists = {k: v for k, v in stats.items() if isinstance(v, (list, tuple))}
        for b in self.backends:
            b.scalars(values, lists, step)

    def summary(self, values: dict, step: int) -> None:
        """Final numbers (the held-out eval) as scalars at the last step."""
        clean = _scalars(values)
        for b in self.backends:
            b.scalars(clean, {}, step)

    def image(self, tag: str, path: str | Path, step: int) -> None:
        path = Path(path)
        if not path.is_file():
            return
        caption = read_caption(path)
        for b in self.backends:
            b.image(tag, path, caption, step)

    def close(self) -> None:
        self.metrics.close()
        for b in self.backends:
            b.close()
        self.backends = []

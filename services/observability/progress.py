"""Training progress for people: a rich bar on a terminal, one plain line per logged step otherwise.

``kubectl logs -f``, ``ray job logs`` and ``> train.log`` are not terminals; a bar there is redrawn
nowhere and printed once at the end, so off a terminal each logged step (``trainer.log_every``, and the
last) prints one flushed line instead::

    step 2/3 reward 0.153 loss 61.0 0.41 s/step eta 0:00:01

``reward`` is ``reward/mean``, the weighted ensemble of all rewards (one reward: its mean).
"""

from __future__ import annotations

import datetime as dt
import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _num(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and math.isfinite(value) else "nan"


def step_line(stats: dict, total: int, eta_s: float | None = None, extra: str = "") -> str:
    line = (f"step {stats['step']}/{total} reward {_num(stats.get('reward/mean'), '.4g')} "
            f"loss {_num(stats.get('loss'), '.4g')} {_num(stats.get('time/step_s'), '.2f')} s/step")
    if extra:
        line += f" {extra}"
    if eta_s is not None:
        line += f" eta {dt.timedelta(seconds=round(eta_s))}"
    return line


class StepProgress:
    """``with StepProgress(console, total, label, log_every) as p: p.update(stats, extra='lag 0.5')``."""

    def __init__(self, console: Console, total: int, label: str = "DrPO", log_every: int = 1):
        self.console, self.total, self.log_every = console, total, log_every
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._start = self._first_step = self.task = None

    def __enter__(self) -> "StepProgress":
        return self  # the bar appears with the first step: an error while loading or resuming prints alone

    def __exit__(self, *exc) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.__exit__(*exc)

    def update(self, stats: dict, extra: str = "") -> None:
        step = int(stats["step"])
        if self.bar is not None:
            if self.task is None:
                self.bar.__enter__()
                self.task = self.bar.add_task("train", total=self.total, info="", completed=0)
            info = (f"reward {_num(stats.get('reward/mean'), '.4f')}  loss {_num(stats.get('loss'), '.2f')}  "
                    f"{_num(stats.get('time/step_s'), '.2f')}s/step" + (f"  {extra}" if extra else ""))
            self.bar.update(self.task, completed=step, info=info)
            return
        now = time.monotonic()
        if self._start is None:  # a resumed run starts mid-way: the rate counts this process's steps only
            self._start, self._first_step = now - float(stats.get("time/step_s") or 0.0), step - 1
        if step % self.log_every and step != self.total:
            return
        done = step - self._first_step
        eta = (now - self._start) / done * (self.total - step) if done > 0 else None
        self.console.print(step_line(stats, self.total, eta, extra), highlight=False, markup=False, soft_wrap=True)
        self.console.file.flush()

"""Graceful stop: SIGTERM / SIGINT end a run at a step boundary with a checkpoint of the last finished step.

Clusters stop jobs with SIGTERM (``kubectl delete``, ``ray job stop``, a spot preemption) and kill them a grace
period later (Kubernetes: 30 s). The first signal only sets a flag: the training loop finishes the step in
hand, checkpoints it and raises :class:`StopRequested`, and the command exits with 128 + the signal's number
(143 for SIGTERM, 130 for SIGINT), so the job counts as failed and ``--resume auto`` continues it.

If the step and its checkpoint are not done within ``grace_s`` (a hung step), the main thread is interrupted
(KeyboardInterrupt): the newest periodic checkpoint stays the restart point. A second signal does the same at once.
"""

from __future__ import annotations

import _thread
import signal
import threading
from types import FrameType


class StopRequested(Exception):
    """Raised by a training loop after it checkpointed the last finished step because a stop signal came."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager that turns SIGTERM / SIGINT into a request the loop reads with :meth:`requested`.

    Only the main thread can install signal handlers; elsewhere (a Ray actor's thread, a test runner's
    worker thread) it installs nothing and never requests a stop.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def requested(self) -> bool:
        return self.signum is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # a second signal: stop now, mid-step
            raise KeyboardInterrupt
        self.signum = signum
        self._timer = threading.Timer(self.grace_s, _thread.interrupt_main)  # past the grace: stop mid-step
        self._timer.daemon = True
        self._timer.start()

    def check(self, step: int) -> None:
        """Called by the loop after a finished step (and its checkpoint, if one was due)."""
        if self.signum is not None:
            raise StopRequested(self.signum, step)

"""One retry budget for a scoring request, shared by the layers that may repeat it.

Under the Ray runtime a score request can be repeated by three layers: the replica pool (re-issue to another
replica after a failure, or a hedge of a slow call), Ray (task retries on a restarted actor) and the remote
reward's client (retries of transient HTTP/gRPC failures). Each with its own limit, the tries multiply
(pool 3 × Ray 2 × client 4 = 24 for one group). Instead the pool owns the request's budget — ``max_attempts``
tries in all and a deadline — and hands each call a :class:`CallBudget`: the tries this call may make and the
deadline. The pool reserves the call's tries before it sends it, so the tries of all copies together never
exceed the budget; Ray task retries are off for pooled calls; the client stops at whichever of its own
``max_retries`` and the call's budget comes first. Without a budget (``drpo train --local``) the client's own
limits apply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class CallBudget:
    """What one call of a request may spend.

    ``attempts``: tries this call may make (a remote client's first try and its retries, per batch);
    ``deadline``: wall-clock time (``time.time()``, comparable across the cluster's nodes) after which no
    try starts and none is waited for; ``None`` = no deadline.
    """

    attempts: int
    deadline: float | None = None

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"a call budget needs at least one attempt, got {self.attempts}")

    def seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def tries(self, own_limit: int) -> int:
        """Tries a layer with its own limit ``own_limit`` may make under this budget."""
        return max(1, min(own_limit, self.attempts))

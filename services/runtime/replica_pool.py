"""A fault-tolerant pool of actor replicas (used for the reward servers and the generators).

``ray.util.ActorPool`` re-raises a failure, drops a dead actor without replacing it and forgets the
failed input. This pool instead, for each request (a method name + arguments under a request id):

- dispatches it to the least-loaded healthy replica, at most ``max_in_flight`` calls per replica;
- re-queues it to another replica when the call fails (dead actor, lost object, exception), up to
  ``max_attempts`` tries, after which it completes with an ``error`` instead of blocking the job;
- with ``call_budget``, shares that budget with the layer below: each call gets a ``budget=CallBudget``
  keyword (the tries it may make, reserved here before it is sent, and the request's deadline), so the
  tries of every copy and of the callee's own retries add up to at most ``max_attempts``
  (drpo_core/rewards/budget.py); with ``deadline_s`` a request still unanswered that long after
  :meth:`submit` completes with an ``error`` (its late result is dropped);
- re-issues it (a hedge) when the call passes ``request_timeout_s``; whichever copy finishes first is
  delivered, a later one is dropped and counted as a duplicate;
- pings replicas (a separate ``health`` concurrency group, so a ping is answered during long work),
  notices Ray-level restarts (new pid), and replaces a replica that is dead or silent, within a
  ``restart_budget``;
- grows or drains replicas while running (:meth:`resize`).

It never blocks on its own: the caller waits on :meth:`refs` (together with other references) and
passes what became ready to :meth:`process`. Multi-return calls deliver the last return (a small
control record) by value and leave the others (the data) in the object store.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, ObjectLostError, RayActorError, RayError

from drpo_core.rewards.budget import CallBudget

HEALTH_GROUP = {"health": 1}  # ray.remote(concurrency_groups=HEALTH_GROUP) on every pooled actor class


class PoolExhaustedError(RuntimeError):
    """Every replica is dead and the restart budget is spent."""


@dataclass
class Replica:
    index: int
    handle: Any
    pid: int | None = None
    state: str = "starting"  # starting | up | suspect | draining | dead
    in_flight: set = field(default_factory=set)
    ping_ref: Any = None
    ping_deadline: float = 0.0
    node: str | None = None
    suspect_since: float | None = None
    last_ok: float = 0.0
    last_error: str = ""
    info: dict = field(default_factory=dict)  # the last ping: pid, node, device, dtype


@dataclass
class Request:
    request_id: str
    method: str
    args: tuple
    num_returns: int = 1
    attempts: int = 0                 # tries spent: one per call, or the budget reserved for it (call_budget)
    calls: int = 0
    deadline: float | None = None     # time.time() after which it completes with an error (deadline_s)
    live: int = 0
    done: bool = False
    tried: set = field(default_factory=set)
    last_error: str = ""


@dataclass
class Call:
    request: Request
    replica: Replica
    refs: list
    started: float
    hedged: bool = False


@dataclass(frozen=True)
class Completion:
    """A finished request: ``info`` is the last return value, ``data`` the other return refs; ``error`` if it gave up.

    ``lost_data``: an object the call needed or made died with its node; repeating the same call cannot
    help, the caller has to recreate the data (regenerate the group).
    """

    request_id: str
    info: Any = None
    data: tuple = ()
    error: str | None = None
    lost_data: bool = False


def short_error(err: BaseException) -> str:
    """Exception class and its last message line, for one-line logs and errors."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"[:300]


class ReplicaPool:
    def __init__(self, name: str, factory: Callable[[int], Any], size: int, *, max_in_flight: int = 2,
                 request_timeout_s: float = 300.0, max_attempts: int = 3, restart_budget: int = 4,
                 health_interval_s: float = 10.0, health_timeout_s: float = 30.0, start_timeout_s: float = 300.0,
                 stuck_after_s: float | None = None, hedge_quantile: float | None = None, hedge_factor: float = 2.0,
                 hedge_min_samples: int = 20, hedge_floor_s: float = 0.0, call_budget: bool = False,
                 deadline_s: float | None = None):
        self.name, self.factory = name, factory
        self.max_in_flight, self.request_timeout_s, self.max_attempts = max_in_flight, request_timeout_s, max_attempts
        self.restart_budget, self.health_interval_s = restart_budget, health_interval_s
        self.health_timeout_s, self.start_timeout_s = health_timeout_s, start_timeout_s
        self.stuck_after_s = stuck_after_s or 3 * request_timeout_s  # a call this old on a live replica: replace it
        self.hedge_quantile, self.hedge_factor = hedge_quantile, hedge_factor
        self.hedge_min_samples, self.hedge_floor_s = hedge_min_samples, hedge_floor_s
        self.call_budget, self.deadline_s = call_budget, deadline_s
        self.latencies: dict[str, deque] = {}  # method → durations of its recent successful calls
        self.replicas: list[Replica] = []
        self.queue: deque[Request] = deque()
        self.calls: dict[Any, Call] = {}
        self.stats: Counter = Counter()
        self._next_index = 0
        self.resize(size)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, request_id: str, method: str, *args, num_returns: int = 1) -> None:
        deadline = time.time() + self.deadline_s if self.deadline_s is not None else None
        self.queue.append(Request(request_id, method, args, num_returns, deadline=deadline))
        self._dispatch()

    def refs(self) -> list:
        """Everything worth waiting on: in-flight calls (their control return) and health pings."""
        return list(self.calls) + [r.ping_ref for r in self.replicas if r.ping_ref is not None]

    def process(self, ready=()) -> list[Completion]:
        """Handle references that became ready, deadlines and health; dispatch queued work."""
        ready = set(ready)
        done: list[Completion] = []
        for key in [k for k in self.calls if k in ready]:
            done += self._finish(self.calls.pop(key), key)
        for r in [r for r in self.replicas if r.ping_ref is not None and r.ping_ref in ready]:
            self._finish_ping(r)
        done += self._check_deadlines()
        self._check_health()
        self._reap_draining()
        self._dispatch()
        return done

    def poll(self, timeout_s: float = 0.1) -> list[Completion]:
        """Wait up to ``timeout_s`` on this pool alone, then :meth:`process`."""
        refs = self.refs()
        if not refs:
            time.sleep(timeout_s)
        ready = ray.wait(refs, num_returns=1, timeout=timeout_s, fetch_local=False)[0] if refs else []
        if ready:  # and everything else already done
            ready = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0] or ready
        return self.process(ready)

    def cancel_all(self) -> None:
        """Forget queued and running requests (their late results are dropped); replicas stay up."""
        self.queue.clear()
        for call in self.calls.values():
            call.request.done = True

    @property
    def pending(self) -> int:
        return len(self.queue) + sum(1 for c in self.calls.values() if not c.request.done)

    @property
    def size(self) -> int:
        return sum(1 for r in self.replicas if r.state in ("starting", "up", "suspect"))

    # -- replicas ---------------------------------------------------------------------------------
    def resize(self, n: int) -> None:
        """Add replicas, or drain the newest ones (they finish their calls, then stop)."""
        if n < 1:
            raise ValueError(f"{self.name} pool needs at least one replica, got {n}")
        live = [r for r in self.replicas if r.state in ("starting", "up", "suspect")]
        for _ in range(n - len(live)):
            self.replicas.append(self._start(self._next_index))
            self._next_index += 1
        for r in sorted(live, key=lambda r: r.index)[n:]:
            r.state = "draining"
        self._dispatch()

    def wait_ready(self, timeout_s: float) -> None:
        """Block until every replica answered a ping; a constructor error is raised at once with its last line."""
        deadline = time.monotonic() + timeout_s
        for r in self.replicas:
            try:
                info = ray.get(r.handle.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                r.pid, r.node, r.state, r.last_ok, r.info = info["pid"], info.get("node"), "up", time.monotonic(), info
            except GetTimeoutError:
                raise PoolExhaustedError(f"{self.name} replica {r.index} did not start within {timeout_s:g}s "
                                         "(runtime.start_timeout_s); is the cluster short of the resources it asks for?") from None
            except RayError as e:
                raise PoolExhaustedError(f"{self.name} replica {r.index} failed to start: {short_error(e)}") from None
        self._dispatch()

    def shutdown(self) -> None:
        for r in self.replicas:
            try:
                ray.kill(r.handle, no_restart=True)
            except Exception:  # already gone
                pass
        self.replicas.clear()
        self.calls.clear()
        self.queue.clear()

    def handles(self) -> list:
        return [r.handle for r in self.replicas if r.state in ("up", "suspect", "starting")]

    # -- internals --------------------------------------------------------------------------------
    def _start(self, index: int) -> Replica:
        r = Replica(index, self.factory(index))
        r.ping_ref, r.ping_deadline = r.handle.ping.remote(), time.monotonic() + self.start_timeout_s
        return r

    def _dispatch(self) -> None:
        while self.queue:
            free = [r for r in self.replicas if r.state == "up" and len(r.in_flight) < self.max_in_flight]
            if not free:
                if self.replicas and all(r.state == "dead" for r in self.replicas):
                    raise PoolExhaustedError(f"all {self.name} replicas are dead and the restart budget "
                                             f"({self.restart_budget}) is spent; last error: {self.replicas[-1].last_error}")
                return
            req = self.queue.popleft()
            if req.done:
                continue
            fresh = [r for r in free if r.index not in req.tried] or free
            self._call(req, min(fresh, key=lambda r: (len(r.in_flight), r.index)))

    def _call(self, req: Request, replica: Replica) -> None:
        method = getattr(replica.handle, req.method)
        if req.num_returns != 1:
            method = method.options(num_returns=req.num_returns)
        tries, kwargs = 1, {}
        if self.call_budget:  # keep one try back for a re-issue elsewhere, unless this is that re-issue (a hedge)
            left = self.max_attempts - req.attempts
            tries = left if req.live > 0 or left == 1 else left - 1
            kwargs["budget"] = CallBudget(tries, req.deadline)
        out = method.remote(*req.args, **kwargs)
        refs = list(out) if req.num_returns != 1 else [out]
        req.attempts, req.calls, req.live = req.attempts + tries, req.calls + 1, req.live + 1
        req.tried.add(replica.index)
        self.calls[refs[-1]] = Call(req, replica, refs, time.monotonic())
        replica.in_flight.add(refs[-1])

    def _finish(self, call: Call, key) -> list[Completion]:
        call.replica.in_flight.discard(key)
        req = call.request
        req.live -= 1
        try:
            info = ray.get(key, timeout=30)
        except ObjectLostError as e:  # also a task whose argument was lost (RayTaskError(ObjectLostError))
            if req.done or req.live > 0:
                return []
            req.done = True
            self.stats["lost_data"] += 1
            return [Completion(req.request_id, error=short_error(e), lost_data=True)]
        except (RayActorError, RayError, GetTimeoutError) as e:
            if isinstance(e, RayActorError):
                self._suspect(call.replica, short_error(e))
            return self._retry(req, short_error(e))
        if req.done:
            self.stats["duplicates_dropped"] += 1
            return []
        req.done = True
        self.latencies.setdefault(req.method, deque(maxlen=256)).append(time.monotonic() - call.started)
        return [Completion(req.request_id, info, tuple(call.refs[:-1]))]

    def hedge_after(self, method: str) -> float:
        """Age at which a call of ``method`` gets a second copy on another replica: ``hedge_factor`` × the
        ``hedge_quantile`` of its recent latencies (once ``hedge_min_samples`` calls finished), at least
        ``hedge_floor_s`` and at most ``request_timeout_s`` (the fixed deadline before enough samples)."""
        seen = self.latencies.get(method, ())
        if self.hedge_quantile is None or len(seen) < self.hedge_min_samples:
            return self.request_timeout_s
        ordered = sorted(seen)
        quantile = ordered[max(0, math.ceil(self.hedge_quantile * len(ordered)) - 1)]  # nearest rank
        return min(self.request_timeout_s, max(self.hedge_floor_s, self.hedge_factor * quantile))

    def _retry(self, req: Request, error: str) -> list[Completion]:
        req.last_error = error
        if req.done or req.live > 0:  # another copy may still deliver
            return []
        if req.attempts >= self.max_attempts or self._expired(req):
            req.done = True
            self.stats["failed_requests"] += 1
            return [Completion(req.request_id, error=f"{self.name} request {req.request_id} failed {req.calls} times "
                               f"({req.attempts} of {self.max_attempts} tries spent); last: {error}")]
        self.stats["requeued"] += 1
        self.queue.appendleft(req)
        return []

    def _expired(self, req: Request) -> bool:
        return req.deadline is not None and time.time() >= req.deadline

    def _check_deadlines(self) -> list[Completion]:
        now, out = time.monotonic(), []
        for req in [*self.queue, *(c.request for c in self.calls.values())]:
            if not req.done and self._expired(req):  # its budget of time is spent: give up on it, wherever it is
                req.done = True
                self.stats["deadline_expired"] += 1
                out.append(Completion(req.request_id, error=f"{self.name} request {req.request_id} passed its deadline "
                                      f"({self.deadline_s:g}s) after {req.calls} call(s); last: {req.last_error or 'still running'}"))
        for key, call in list(self.calls.items()):
            age, req = now - call.started, call.request
            limit = self.hedge_after(req.method)
            if req.done or age < limit:
                continue
            if not call.hedged:  # re-issue elsewhere; the first copy to finish wins
                call.hedged = True
                self.stats["timeouts"] += 1
                if age >= self.request_timeout_s:  # a slow call past the latency quantile alone is no sign of a sick replica
                    self._suspect(call.replica, f"call {req.request_id} ran past {self.request_timeout_s:g}s")
                if req.attempts < self.max_attempts:
                    self.stats["requeued"] += 1
                    self.queue.appendleft(req)
            elif age > self.stuck_after_s:  # stuck while still answering pings: replace the replica
                self._replace(call.replica, f"call {req.request_id} stuck for {age:.0f}s")
        return out

    def _suspect(self, r: Replica, why: str) -> None:
        r.last_error = why
        if r.state in ("up", "suspect"):
            r.state = "suspect"
            r.suspect_since = r.suspect_since or time.monotonic()

    def _check_health(self) -> None:
        now = time.monotonic()
        for r in self.replicas:
            if r.state in ("dead", "draining"):
                continue
            # a replica Ray is restarting answers "unavailable" until its constructor is done: allow start_timeout_s
            grace = self.start_timeout_s if "Unavailable" in r.last_error else self.health_timeout_s
            if r.state == "suspect" and now - r.suspect_since > grace:
                self._replace(r, f"unhealthy for {now - r.suspect_since:.0f}s; last: {r.last_error}")
            elif r.ping_ref is None and (r.state == "suspect" or now - r.last_ok > self.health_interval_s):
                r.ping_ref = r.handle.ping.options(concurrency_group="health").remote()
                r.ping_deadline = now + self.health_timeout_s
            elif r.ping_ref is not None and now > r.ping_deadline:
                self._replace(r, f"no answer to a ping before its deadline ({r.state})")

    def _finish_ping(self, r: Replica) -> None:
        ref, r.ping_ref = r.ping_ref, None
        try:
            info = ray.get(ref, timeout=30)
        except ActorUnavailableError as e:  # restarting: ping again next round, for at most health_timeout_s
            self._suspect(r, short_error(e))
            return
        except (RayError, GetTimeoutError) as e:
            self._replace(r, short_error(e))
            return
        if r.pid is not None and info["pid"] != r.pid:
            self.stats["restarts"] += 1  # Ray restarted the actor (max_restarts); its state was rebuilt
        r.pid, r.node, r.last_ok, r.info = info["pid"], info.get("node"), time.monotonic(), info
        if r.state in ("starting", "suspect"):
            r.state, r.suspect_since = "up", None

    def _replace(self, r: Replica, why: str) -> None:
        r.last_error, r.ping_ref = why, None
        try:
            ray.kill(r.handle, no_restart=True)
        except Exception:  # already gone
            pass
        if r.state == "draining":
            r.state = "dead"
            return
        if self.stats["replacements"] >= self.restart_budget:
            r.state = "dead"
            return
        self.stats["replacements"] += 1
        self.stats["restarts"] += 1
        fresh = self._start(r.index)
        r.handle, r.pid, r.state, r.ping_ref, r.ping_deadline = fresh.handle, None, "starting", fresh.ping_ref, fresh.ping_deadline
        r.suspect_since = None

    def _reap_draining(self) -> None:
        for r in [r for r in self.replicas if r.state == "draining" and not r.in_flight]:
            try:
                ray.kill(r.handle, no_restart=True)
            except Exception:  # already gone
                pass
            self.replicas.remove(r)

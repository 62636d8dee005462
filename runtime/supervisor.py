"""Keeps the processes of `fhirq up` running: one that dies (API master, worker, beat, the
embedded PostgreSQL or Redis) is started again after a backoff (1, 2, 4 … 30 s), and each
restart is logged. A service that keeps dying — more than `max_restarts` times within
`window` seconds — ends the run, since restarting it further only hides the fault.

The supervisor knows nothing of what it runs: each `Service` says how to tell it is alive and
how to start it again. `on_change` hears the names of the services that are down, after each
change (`fhirq up` writes them where /readyz reads them).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["BACKOFF", "GaveUp", "Service", "Supervisor"]

BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
# Alive this long after a restart: the next failure starts the backoff from the beginning.
STABLE_SECONDS = 30.0


class GaveUp(Exception):
    """A service failed too often; the message names it."""


@dataclass
class Service:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], None]


@dataclass
class _State:
    failures: deque[float] = field(default_factory=deque)
    attempt: int = 0
    retry_at: float | None = None  # while down: when to start it again
    up_since: float = 0.0


class Supervisor:
    def __init__(
        self,
        services: Sequence[Service],
        *,
        log: Callable[[str], None],
        on_change: Callable[[list[str]], None] = lambda down: None,
        max_restarts: int = 5,
        window: float = 300.0,
        backoff: Sequence[float] = BACKOFF,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.services = list(services)
        self.log = log
        self.on_change = on_change
        self.max_restarts = max_restarts
        self.window = window
        self.backoff = tuple(backoff)
        self.clock = clock
        self.states = {s.name: _State(up_since=clock()) for s in self.services}

    def down(self) -> list[str]:
        return [s.name for s in self.services if self.states[s.name].retry_at is not None]

    def step(self) -> None:
        """One look at every service: notice deaths, restart those whose backoff is over."""
        before = self.down()
        now = self.clock()
        for service in self.services:
            state = self.states[service.name]
            if state.retry_at is None:
                if service.alive():
                    if state.attempt and now - state.up_since >= STABLE_SECONDS:
                        state.attempt = 0
                    continue
                self._failed(service, state, now, "stopped unexpectedly")
            elif now >= state.retry_at:
                self._restart(service, state)
        after = self.down()
        if after != before:
            self.on_change(after)

    def _failed(self, service: Service, state: _State, now: float, what: str) -> None:
        state.failures.append(now)
        while state.failures and now - state.failures[0] > self.window:
            state.failures.popleft()
        if len(state.failures) > self.max_restarts:
            raise GaveUp(f"{service.name} failed {len(state.failures)} times in "
                         f"{self.window:.0f} s; giving up")
        delay = self.backoff[min(state.attempt, len(self.backoff) - 1)]
        state.attempt += 1
        state.retry_at = now + delay
        self.log(f"fhirq: {service.name} {what}; restarting it in {delay:.0f} s")

    def _restart(self, service: Service, state: _State) -> None:
        try:
            service.restart()
        except Exception as exc:  # noqa: BLE001 - a failed start is one more failure
            self._failed(service, state, self.clock(), f"did not start ({exc})")
            return
        state.retry_at = None
        state.up_since = self.clock()
        self.log(f"fhirq: {service.name} restarted")

    def run(self, interval: float = 0.5) -> None:
        """Until GaveUp (or the caller's signal handler raises)."""
        while True:
            self.step()
            time.sleep(interval)

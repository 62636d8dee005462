"""The supervisor of `fhirq up`: what dies is restarted with backoff, what keeps dying ends the
run; /readyz says what is down meanwhile."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from runtime import running
from runtime.supervisor import GaveUp, Service, Supervisor


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Proc:
    """A service that can be killed and records its restarts; `broken` makes starts fail."""

    def __init__(self) -> None:
        self.up = True
        self.starts = 0
        self.broken = False

    def restart(self) -> None:
        if self.broken:
            raise RuntimeError("port in use")
        self.starts += 1
        self.up = True


def _supervisor(procs: dict[str, Proc], clock: Clock, **kw: Any) -> tuple[Supervisor, list[str],
                                                                        list[list[str]]]:
    lines: list[str] = []
    changes: list[list[str]] = []
    services = [Service(name, lambda p=p: p.up, p.restart) for name, p in procs.items()]
    return (Supervisor(services, log=lines.append, on_change=changes.append, clock=clock, **kw),
            lines, changes)


def test_a_dead_service_is_restarted_after_its_backoff_and_the_others_are_left_alone() -> None:
    clock = Clock()
    worker, api = Proc(), Proc()
    sup, lines, changes = _supervisor({"worker": worker, "API": api}, clock)
    sup.step()
    assert lines == [] and changes == []

    worker.up = False
    sup.step()
    assert sup.down() == ["worker"] and changes == [["worker"]]
    assert lines == ["fhirq: worker stopped unexpectedly; restarting it in 1 s"]
    clock.now = 0.5
    sup.step()
    assert worker.starts == 0  # still backing off
    clock.now = 1.0
    sup.step()
    assert worker.starts == 1 and sup.down() == [] and changes[-1] == []
    assert lines[-1] == "fhirq: worker restarted" and api.starts == 0

    # Dying again soon after: the backoff grows; a long healthy spell resets it.
    worker.up = False
    clock.now = 2.0
    sup.step()
    assert lines[-1].endswith("restarting it in 2 s")
    clock.now = 4.0
    sup.step()
    clock.now = 100.0
    sup.step()  # alive for 96 s: stable again
    worker.up = False
    sup.step()
    assert lines[-1].endswith("restarting it in 1 s")


def test_a_start_that_fails_is_retried_with_a_longer_wait() -> None:
    clock = Clock()
    api = Proc()
    sup, lines, _ = _supervisor({"API": api}, clock)
    api.up, api.broken = False, True
    sup.step()
    clock.now = 1.0
    sup.step()
    assert "did not start (port in use); restarting it in 2 s" in lines[-1]
    api.broken = False
    clock.now = 3.0
    sup.step()
    assert api.starts == 1 and sup.down() == []


def test_a_service_that_keeps_dying_ends_the_run() -> None:
    clock = Clock()
    beat = Proc()
    sup, _, _ = _supervisor({"beat": beat}, clock, max_restarts=3, window=60)
    with pytest.raises(GaveUp, match="beat failed 4 times in 60 s"):
        for _ in range(10):
            beat.up = False
            sup.step()
            clock.now += 5
            sup.step()


def test_readyz_names_what_fhirq_up_is_restarting(client: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.get("/readyz").get_json() == {"status": "ok"}
    monkeypatch.setenv("FHIRQ_DATA_DIR", str(tmp_path))
    running.record(tmp_path, running.RunningStack(pid=os.getpid(), server="http://x",
                                                  auth="off", database_url=None,
                                                  down=("worker",)))
    r = client.get("/readyz")
    assert r.status_code == 200  # the API still takes requests; jobs wait for the worker
    assert r.get_json() == {"status": "degraded", "down": ["worker"]}

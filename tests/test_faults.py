"""The fault suite (`make test-faults`): real faults on 20,000-entry batch jobs run by a real API
and a real Celery worker on real PostgreSQL and Redis. After each fault the job must complete
with every entry taking effect exactly once, its counts equal to its entries' results, within
RECOVERY_BOUND of the fault; the time it took is printed in the session's fault table.

Killing a worker's pool process and an entry that kills its process run on every `pytest`
run; the others are also marked `slow` (deselected unless asked for: `-m faults`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("tests.fault_helpers")

from tests.conftest import REDIS_URL  # noqa: E402
from tests.fault_helpers import (  # noqa: E402
    PostgresServer,
    RedisServer,
    Stack,
    busiest_child,
    poisoned_batch,
    private_database,
)
from tests.jobs_helpers import patients_batch  # noqa: E402

pytest_plugins = ["tests.fault_helpers"]  # prints the fault table at the end

N = 20_000
# The fault strikes once this many entries are done, with most of the job still to run.
FAULT_AFTER = 2000

pytestmark = pytest.mark.faults
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of the module's own: tests restart it, and a fault test's connections do
    not count against a shared server's limit."""
    pg = PostgresServer()
    pg.start()
    yield pg
    pg.close()


@contextlib.contextmanager
def running_stack(pg: PostgresServer, broker_url: str = REDIS_URL, *, poison: bool = False
                  ) -> Iterator[Stack]:
    """API and worker on a fresh database of `pg`, and `broker_url`."""
    with private_database(pg.url) as url:
        s = Stack(url, broker_url, poison=poison)
        try:
            yield s.start()
        finally:
            s.close()


@pytest.fixture
def stack(postgres: PostgresServer) -> Iterator[Stack]:
    with running_stack(postgres) as s:
        yield s


@pytest.fixture
def poison_stack(postgres: PostgresServer) -> Iterator[Stack]:
    with running_stack(postgres, poison=True) as s:
        yield s


def running_job(s: Stack, tag: str) -> str:
    job_id = s.submit(patients_batch(N, tag))
    s.wait_done(job_id, FAULT_AFTER)
    assert s.done(job_id) < N // 2, "the job was nearly done before the fault: make it bigger"
    return job_id


def test_kill_9_of_a_worker_pool_process(stack: Stack) -> None:
    job_id = running_job(stack, "child")
    victim = busiest_child(stack.worker)
    t0 = time.time()
    victim.kill()
    stack.verdict("kill -9 worker pool process", job_id, "child", N, t0)
    assert stack.worker.alive


def test_an_entry_that_kills_its_process(poison_stack: Stack) -> None:
    poison = 12_345
    t0 = time.time()
    job_id = poison_stack.submit(poisoned_batch(N, "exit", {poison: "exit"}))
    poison_stack.verdict("poison: entry kills its process", job_id, "exit", N, t0,
                         poison=(poison,))
    issue = poison_stack.sql(
        "SELECT outcome #>> '{issue,0,diagnostics}' FROM job_result "
        "WHERE job_id = :id AND idx = :i", id=job_id, i=poison)
    assert "lost the worker process" in issue


@slow
def test_an_entry_past_the_time_limit(poison_stack: Stack) -> None:
    """`hang` ignores the soft limit: only the hard kill ends its chunk (20 s + 5 s)."""
    poison = 12_345
    t0 = time.time()
    job_id = poison_stack.submit(poisoned_batch(N, "hang", {poison: "hang"}))
    poison_stack.verdict("poison: entry past the time limit", job_id, "hang", N, t0,
                         poison=(poison,))
    code = poison_stack.sql("SELECT outcome #>> '{issue,0,code}' FROM job_result "
                            "WHERE job_id = :id AND idx = :i", id=job_id, i=poison)
    assert code == "timeout"


@slow
def test_kill_9_of_the_worker_main_process(stack: Stack) -> None:
    """The main process dies alone (its pool processes are orphaned); a supervisor starts a
    new worker at once."""
    job_id = running_job(stack, "main")
    assert stack.worker.proc is not None
    main = stack.worker.proc.pid
    t0 = time.time()
    os.kill(main, signal.SIGKILL)
    stack.worker.proc.wait(10)
    stack.orphans.append(main)  # its process group, for whatever of it is left
    stack.worker.start()
    stack.verdict("kill -9 worker main process", job_id, "main", N, t0)


@slow
@pytest.mark.parametrize("persistent", [True, False], ids=["appendonly", "no-persistence"])
def test_kill_9_of_redis(postgres: PostgresServer, persistent: bool) -> None:
    """Redis dies mid-job and is back a second later, with its append-only file (nothing
    acknowledged is lost) or empty (every queued and unacknowledged message is lost)."""
    redis_server = RedisServer(persistent).start()
    try:
        with running_stack(postgres, redis_server.url) as s:
            tag = "aof" if persistent else "nopersist"
            job_id = running_job(s, tag)
            t0 = time.time()
            redis_server.kill()
            time.sleep(1)
            redis_server.start()
            fault = "kill -9 redis, " + ("appendonly" if persistent else "no persistence")
            s.verdict(fault, job_id, tag, N, t0)
    finally:
        redis_server.close()


@slow
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart(postgres: PostgresServer, mode: str) -> None:
    """`pg_ctl restart`: fast (sessions cut, checkpoint) or immediate (a crash: WAL replay)."""
    with running_stack(postgres) as s:
        job_id = running_job(s, mode)
        t0 = time.time()
        postgres.restart(mode)
        s.verdict(f"postgres restart -m {mode}", job_id, mode, N, t0)


@slow
def test_api_killed_after_commit_before_enqueue(stack: Stack) -> None:
    """The job is committed and its tasks never sent: the reaper must find it."""
    job_id = stack.accept_unqueued(patients_batch(N, "unsent"))
    t0 = time.time()
    stack.verdict("API killed after commit", job_id, "unsent", N, t0)

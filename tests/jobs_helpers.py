"""Fixtures and helpers for the job tests: real Celery worker processes on a queue of this test
session's own (on Redis, or on FHIRQ_TEST_BROKER_URL's RabbitMQ: the job tests are skipped,
saying so, if it does not answer), a Flask client with the job endpoints, and polling helpers.

Use with `from tests.jobs_helpers import *` (fixtures must be importable by name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from tests.conftest import BROKER_URL, REDIS_URL
from worker.broker import broker_for

__all__ = [
    "QUEUE",
    "WorkerProcess",
    "api",
    "lone_worker",
    "jobs_env",
    "session_worker",
    "worker",
    "submit",
    "wait_for",
    "wait_job",
    "scalar",
    "assert_exactly_once",
    "patients_batch",
    "quiesce",
]

QUEUE = f"fhirq-test-{os.getpid()}"
ROOT = Path(__file__).resolve().parent.parent

# Small chunks and a fast reaper so that a test sees chunking, chaining and recovery in
# seconds; every process of the session (this one and the workers) uses the same values.
JOB_ENV = {
    "FHIRQ_QUEUE": QUEUE,
    "FHIRQ_REDIS_URL": REDIS_URL,
    **({"FHIRQ_BROKER_URL": BROKER_URL} if BROKER_URL != REDIS_URL else {}),
    "FHIRQ_CHUNK_SIZE": "50",
    "FHIRQ_JOB_INFLIGHT": "2",
    "FHIRQ_JOB_STALL_SECONDS": "3",
    "FHIRQ_REAPER_INTERVAL": "1",
    "FHIRQ_CALLBACK_ATTEMPTS": "3",
    # Callbacks go to receivers the tests run on loopback.
    "FHIRQ_CALLBACK_ALLOW": "127.0.0.1",
    # Job tests stand in for owners with X-Test-Owner (`api`) or run as "anonymous" (the
    # servers they spawn); tests/test_auth.py covers authentication.
    "FHIRQ_AUTH": "off",
}


@pytest.fixture(scope="session")
def jobs_env(db_url: str) -> Iterator[dict[str, str]]:
    broker = broker_for(BROKER_URL)
    if BROKER_URL != REDIS_URL and (problem := broker.problem()) is not None:
        pytest.skip(f"the test broker {BROKER_URL} (FHIRQ_TEST_BROKER_URL) does not answer: "
                    f"{problem}")
    saved = {k: os.environ.get(k) for k in JOB_ENV}
    os.environ.update(JOB_ENV)
    from core.config import get_settings
    from worker.celery_app import broker_conf, celery

    # The app may have been imported before these variables were set.
    celery.conf.update(broker_conf(get_settings()))
    yield {**JOB_ENV, "FHIRQ_DATABASE_URL": db_url}
    broker.delete(QUEUE)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class WorkerProcess:
    """`celery worker` (with an embedded beat for the reaper) as a child process group."""

    # Every worker of this test session (each test module has its own `session_worker`).
    started: list[WorkerProcess] = []

    @classmethod
    def stop_all(cls) -> None:
        """Stop every worker of the session, e.g. before starting one configured otherwise:
        workers share the database, so any of them may heal (and run) another one's jobs."""
        for w in cls.started:
            w.stop()

    def __init__(self, env: dict[str, str], concurrency: int = 2, beat: bool = True) -> None:
        self.env = {**os.environ, **env}
        self.concurrency = concurrency
        self.beat = beat
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="fhirq-worker-")
        self.log = Path(self.dir) / "worker.log"
        # Run through this command, e.g. `ip netns exec NAME` (a worker on another "host").
        self.prefix: list[str] = []

    def start(self) -> WorkerProcess:
        argv = [
            *self.prefix,
            sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker",
            "--concurrency", str(self.concurrency), "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-n", f"test-{os.getpid()}-{time.monotonic_ns()}@%h",
        ]  # fmt: skip
        if self.beat:
            argv += ["-B", "--schedule", str(Path(self.dir) / "beat-schedule")]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self not in WorkerProcess.started:
            WorkerProcess.started.append(self)
        wait_for(lambda: b"ready." in self.log.read_bytes(), 30, "the worker to start",
                 on_timeout=self.tail)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children) at once."""
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.alive:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.contextmanager
def lone_worker(jobs_env: dict[str, str], env: dict[str, str], name: str, **kwargs: Any
                ) -> Iterator[WorkerProcess]:
    """A worker configured otherwise (`env`), alone: the session's other workers are stopped
    (the `worker` fixture restarts its own), and it has a queue of its own, which this process
    sends job tasks to meanwhile."""
    WorkerProcess.stop_all()
    queue = f"{QUEUE}-{name}"
    os.environ["FHIRQ_QUEUE"] = queue
    w = WorkerProcess({**jobs_env, **env, "FHIRQ_QUEUE": queue}, **kwargs).start()
    try:
        yield w
    finally:
        w.stop()
        os.environ["FHIRQ_QUEUE"] = QUEUE
        broker_for(BROKER_URL).delete(queue)


@pytest.fixture(scope="session")
def session_worker(jobs_env: dict[str, str]) -> Iterator[WorkerProcess]:
    w = WorkerProcess(jobs_env).start()
    yield w
    w.stop()
    shutil.rmtree(w.dir, ignore_errors=True)


def quiesce(engine: Engine, timeout: float = 20) -> None:
    """Stop all job work of this session, so that the next test's TRUNCATE meets no task:
    drop queued messages, cancel active jobs, wait for running tasks to end."""
    broker_for(BROKER_URL).purge(QUEUE)
    with engine.begin() as c:
        c.execute(text("UPDATE job SET state = 'cancelled' "
                       "WHERE state IN ('accepted', 'running')"))

    def idle() -> bool:
        return not scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state NOT IN ('idle')",
        )

    wait_for(idle, timeout, "running tasks to end")


@pytest.fixture
def worker(session_worker: WorkerProcess, clean_db: Engine) -> Iterator[WorkerProcess]:
    """The session's worker, restarted if a test killed it."""
    if not session_worker.alive:
        session_worker.start()
    yield session_worker
    quiesce(clean_db)


@pytest.fixture
def api(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[Any]:
    """A Flask test client with the job endpoints; `X-Test-Owner` stands in for auth."""
    from flask import g, request

    from api import create_app
    from api import jobs as job_api

    app = create_app()
    app.config["TESTING"] = True
    if "jobs" not in app.blueprints:
        job_api.register(app)

    @app.before_request
    def _owner() -> None:
        if "X-Test-Owner" in request.headers:
            g.owner = request.headers["X-Test-Owner"]

    yield app.test_client()
    quiesce(clean_db)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             on_timeout: Callable[[], str] | None = None, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ("\n" + on_timeout()) if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def submit(client: Any, body: Any, *, method: str = "POST",
           content_type: str = "application/fhir+json", **headers: str) -> Any:
    """Send a body with `Prefer: respond-async`; bytes are sent as they are."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers.setdefault("Prefer", "respond-async")
    return client.open("/fhir", method=method, data=data, content_type=content_type,
                       headers=headers)


def job_id_of(response: Any) -> str:
    assert response.status_code == 202, response.get_data(as_text=True)
    return response.headers["Content-Location"].rsplit("/", 1)[-1]


def wait_job(client: Any, job_id: str, states: tuple[str, ...] = ("completed", "failed"),
             timeout: float = 60, worker: WorkerProcess | None = None, **headers: str
             ) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        body = client.get(f"/jobs/{job_id}", headers=headers).json
        return body if body["state"] in states else None

    return wait_for(check, timeout, f"job {job_id} to reach {states}",
                    on_timeout=worker.tail if worker else None, interval=0.2)


def scalar(engine: Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as c:
        return c.execute(text(sql), params).scalar_one()


def assert_exactly_once(engine: Engine, job_id: str, n: int) -> None:
    """Exactly once: `n` Patients created by the job's entries, one version and one 201 result
    each, and nothing of the job left pending."""
    assert scalar(engine, "SELECT count(*) FROM resource WHERE res_type = 'Patient'") == n
    assert scalar(engine, "SELECT count(*) FROM resource_history") == n
    assert scalar(engine, "SELECT count(DISTINCT tokens) FROM resource") == n
    assert scalar(engine, "SELECT count(*) FROM job_result WHERE job_id = :id AND status = 201",
                  id=job_id) == n
    assert scalar(engine, "SELECT count(*) FROM job_entry e WHERE job_id = :id AND NOT EXISTS "
                          "(SELECT 1 FROM job_result r WHERE r.job_id = e.job_id "
                          "AND r.idx = e.idx)", id=job_id) == 0
    assert scalar(engine, "SELECT count(*) FROM job_chunk WHERE job_id = :id", id=job_id) == 0


def patients_batch(n: int, tag: str = "t", *, bad: tuple[int, ...] = ()) -> dict[str, Any]:
    """A batch of `n` Patient creates, identified `tag-i`; entries in `bad` are invalid."""
    entries = []
    for i in range(n):
        resource: dict[str, Any] = {
            "resourceType": "Patient",
            "identifier": [{"system": "urn:test", "value": f"{tag}-{i}"}],
            "name": [{"family": f"F{i}"}],
        }
        if i in bad:
            resource["birthDate"] = "not-a-date"
        entries.append({"resource": resource, "request": {"method": "POST", "url": "Patient"}})
    return {"resourceType": "Bundle", "type": "batch", "entry": entries}


def jobs_app() -> Any:
    """WSGI app with the job endpoints, for a real server in tests (`gunicorn 'mod:jobs_app()'`)."""
    from api import create_app
    from api import jobs as job_api

    app = create_app()
    if "jobs" not in app.blueprints:
        job_api.register(app)
    return app


class ApiServer:
    """gunicorn serving `jobs_app()` on a free loopback port."""

    def __init__(self, env: dict[str, str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ApiServer:
        argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{self.port}", "-w", "1",
                "--threads", "4", "tests.jobs_helpers:jobs_app()"]
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def up() -> bool:
            import httpx

            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, 30, "the API server")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)

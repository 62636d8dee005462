"""The product's API as a real process for tests: gunicorn with the command line `fhirq up` and
`fhirq api` run (runtime.processes.api_argv), on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from runtime.processes import api_argv
from tests.jobs_helpers import ROOT, wait_for

__all__ = ["ApiProcess", "api_process"]


@dataclass(frozen=True)
class ApiProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]


@contextmanager
def api_process(env: dict[str, str], workers: int, threads: int,
                log: Path | None = None) -> Iterator[ApiProcess]:
    """The API on a free port until the block ends; its output goes to `log` when given (and
    its end is shown if it does not come up)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    argv = api_argv("127.0.0.1", port, workers, threads, ["--no-control-socket"])
    with open(log or os.devnull, "ab") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env},
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, "the API",
                 on_timeout=lambda: log.read_text()[-3000:] if log else "")
        yield ApiProcess(url, port, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)

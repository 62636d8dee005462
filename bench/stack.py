"""The product under test, as real processes: the API under gunicorn (fhirq's gthread variant,
runtime.processes.WORKER_CLASS) and Celery worker(s), started with exactly the command lines
`fhirq api` / `fhirq worker` use (runtime/processes.py), against the benchmark's database and
broker.

`Stack` starts, restarts (a different worker concurrency) and stops them, and knows their pids
for the resource monitor. Their output goes to log files in `log_dir`; a process that dies is
reported with the end of its log.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from bench.services import Services
from runtime import procutil
from runtime.processes import api_argv, gunicorn_has_setting, worker_argv

__all__ = ["Stack", "StackError", "StackOptions"]

STOP_TIMEOUT = 15.0


class StackError(RuntimeError):
    """A process of the product did not start or died."""


@dataclass(frozen=True)
class StackOptions:
    api_workers: int = 2
    api_threads: int = 4
    concurrency: int = 2
    chunk_size: int | None = None  # FHIRQ_CHUNK_SIZE for the product; None keeps its default
    loglevel: str = "WARNING"
    ready_timeout: float = 90.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


@dataclass
class Stack:
    services: Services
    options: StackOptions
    log_dir: Path
    port: int = field(default_factory=_free_port)
    # A queue of our own: a shared Redis is never flushed, and no other worker takes our tasks.
    queue: str = field(default_factory=lambda: f"fhirq-bench-{uuid.uuid4().hex[:8]}")
    api: _Proc | None = None
    worker: _Proc | None = None
    concurrency: int = 0

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.origin}/fhir"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("FHIRQ_BROKER_URL", None)  # it would win over the benchmark's own Redis
        env.update(
            FHIRQ_DATABASE_URL=self.services.database_url,
            FHIRQ_REDIS_URL=self.services.broker_url,
            FHIRQ_BASE_URL=self.base_url,
            FHIRQ_QUEUE=self.queue,
            PYTHONUNBUFFERED="1",
        )
        if self.options.chunk_size is not None:
            env["FHIRQ_CHUNK_SIZE"] = str(self.options.chunk_size)
        return env

    def _spawn(self, name: str, argv: list[str]) -> _Proc:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        handle = open(log, "ab")  # noqa: SIM115 - closed in _stop
        proc = procutil.spawn(argv, env=self.env(), stdout=handle, stderr=subprocess.STDOUT)
        return _Proc(name, proc, log, handle)

    # ------------------------------------------------------------------ API

    def start_api(self) -> None:
        opts = self.options
        extra = ["--no-control-socket"] if gunicorn_has_setting("control_socket_disable") else []
        argv = api_argv("127.0.0.1", self.port, opts.api_workers, opts.api_threads, extra)
        self.api = self._spawn("api", argv)
        deadline = time.monotonic() + opts.ready_timeout
        with httpx.Client(timeout=2, trust_env=False) as client:
            while True:
                self.check()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{self.origin}/healthz").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise StackError(f"the API did not answer within {opts.ready_timeout:.0f} s")
                time.sleep(0.2)
        # Every gunicorn worker has forked once /healthz answers from one of them; wait for all.
        self._wait_children(self.api, opts.api_workers, deadline)

    # ------------------------------------------------------------------ worker

    def start_worker(self, concurrency: int | None = None) -> None:
        self.concurrency = concurrency or self.options.concurrency
        node = f"{self.queue}@%h"
        argv = worker_argv(self.concurrency, self.options.loglevel,
                           ["-n", node, "-Q", self.queue, "--without-gossip", "--without-mingle",
                            "--without-heartbeat"])
        self.worker = self._spawn(f"worker-c{self.concurrency}", argv)
        deadline = time.monotonic() + self.options.ready_timeout
        self._wait_children(self.worker, self.concurrency, deadline)
        self._wait_worker_ready(deadline)

    def _wait_worker_ready(self, deadline: float) -> None:
        """Until the worker answers a ping over the broker: it is then consuming our queue."""
        from celery import Celery

        app = Celery(broker=self.services.broker_url)
        try:
            while True:
                self.check()
                replies = app.control.ping(timeout=0.5)
                if any(self.queue in name for reply in replies for name in reply):
                    return
                if time.monotonic() > deadline:
                    raise StackError("the worker did not answer a ping in time")
        finally:
            app.close()

    def restart_worker(self, concurrency: int) -> None:
        if self.worker is not None:
            self._stop(self.worker)
            self.worker = None
        self.start_worker(concurrency)

    # ------------------------------------------------------------------ both

    def _wait_children(self, p: _Proc, n: int, deadline: float) -> None:
        while len(procutil.tree(p.proc.pid)) < n + 1:
            self.check()
            if time.monotonic() > deadline:
                raise StackError(f"{p.name} did not start its {n} processes in time")
            time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        out = {}
        if self.api is not None:
            out["api"] = self.api.proc.pid
        if self.worker is not None:
            out["worker"] = self.worker.proc.pid
        return out

    def check(self) -> None:
        """Raise StackError, with the end of its log, if a process has died."""
        for p in (self.api, self.worker):
            if p is not None and p.proc.poll() is not None:
                p.handle.flush()
                tail = p.log.read_text(errors="replace")[-3000:]
                raise StackError(
                    f"{p.name} exited with status {p.proc.returncode}; its log ends:\n{tail}"
                )

    def _stop(self, p: _Proc) -> None:
        procutil.terminate_tree(p.proc.pid, timeout=STOP_TIMEOUT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=5)
        p.handle.close()

    def stop(self) -> None:
        for p in (self.worker, self.api):
            if p is not None:
                self._stop(p)
        self.api = self.worker = None
        self._drop_queue()

    def _drop_queue(self) -> None:
        import redis

        from bench.services import redis_client_url

        client = redis.Redis.from_url(redis_client_url(self.services.broker_url),
                                      socket_timeout=5)
        keys = [self.queue, f"_kombu.binding.{self.queue}",
                f"_kombu.binding_permanent.{self.queue}",
                *(f"{self.queue}\x06\x16{p}" for p in range(10))]  # priority sub-queues
        with contextlib.suppress(redis.RedisError, OSError):
            client.delete(*keys)
            for key in client.scan_iter(match=f"*{self.queue}*", count=1000):
                client.delete(key)
        client.close()

"""Resource sampling while a workload runs: peak RSS of the API and worker process trees, and CPU
seconds spent by the API, the workers, the PostgreSQL backends serving the benchmark database,
the benchmark client itself and every other process of the (shared) machine, with the idle and
I/O-wait time, so a result shows where the machine's cores went.

A background thread samples every `interval` seconds with psutil. RSS is summed over a tree
(gunicorn master + workers, Celery master + pool processes); the largest single process is kept
too. CPU is the growth of each process's user+system time between `start()` and `stop()`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from runtime import procutil

__all__ = ["Monitor", "Usage", "statement_label"]

MB = 1024 * 1024
TREE_REFRESH = 1.0  # seconds between walks of the process trees
BACKEND_REFRESH = 2.0  # seconds between scans for new PostgreSQL backends


@dataclass
class Usage:
    """What one measured interval used."""

    seconds: float = 0.0
    rss_mb: dict[str, float] = field(default_factory=dict)  # group → peak tree RSS
    rss_max_proc_mb: dict[str, float] = field(default_factory=dict)  # group → largest process
    rss_idle_mb: dict[str, float] = field(default_factory=dict)  # group → tree RSS at start
    cpu_s: dict[str, float] = field(default_factory=dict)  # group → CPU seconds
    # What the benchmark database's sessions were doing, by sampling pg_stat_activity:
    # "statement | wait event" → samples, "idle in transaction" being the client's turn.
    pg_activity: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        r = lambda d: {k: round(v, 1) for k, v in d.items()}  # noqa: E731
        return {"seconds": round(self.seconds, 3), "rss_mb": r(self.rss_mb),
                "rss_max_proc_mb": r(self.rss_max_proc_mb), "rss_idle_mb": r(self.rss_idle_mb),
                "cpu_s": r(self.cpu_s), "pg_activity": dict(self.pg_activity)}


_LABELS = (
    ("INSERT INTO resource AS r", "upsert resource+history+strings"),
    ("ts AS (SELECT clock_timestamp() AS at)", "create resource+history+strings"),
    ("COPY resource_stage", "COPY resources to stage"),
    ("FOR UPDATE SKIP LOCKED", "claim job entries"),
    ("COPY job_result", "COPY entry results"),
    ("UPDATE job SET", "update job row"),
    ("pg_advisory_xact_lock", "advisory locks"),
    ("FROM resource r JOIN unnest", "read resources by key"),
    ("COPY job_entry", "COPY entries (accept)"),
    ("UPDATE resource r SET", "delete resources"),
    ("FROM job_entry e WHERE e.job_id", "read job entries"),
)


def statement_label(statement: str) -> str:
    """A short name for one of the product's SQL statements (its hot ones are named).
    pg_stat_activity cuts statements at track_activity_query_size (1 kB by default), and the
    set-based writes start with their parameter arrays inlined, so those are named by prefix."""
    text = " ".join(statement.split())
    for key, name in _LABELS:
        if key in text:
            return name
    if text.startswith("WITH input AS ( SELECT * FROM unnest("):
        return "upsert or delete of resources (statement cut)"
    return text[:60]


def _cpu(p: psutil.Process) -> float | None:
    try:
        t = p.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def _busy(t: Any) -> float:
    """Busy CPU seconds of the machine; guest time is already inside user time, and time the
    hypervisor gave to other machines (steal) was not ours either."""
    return sum(getattr(t, f, 0.0) for f in ("user", "nice", "system", "irq", "softirq", "steal"))


# Sessions of the benchmark database other than the sampler, and not idle between transactions.
_ACTIVITY = """
SELECT state, wait_event_type, wait_event, query FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
  AND state IN ('active', 'idle in transaction')
"""


class Monitor:
    """Samples the process groups named by `pids()` (group → root pid) plus the PostgreSQL
    backends whose command line names `database`."""

    def __init__(self, pids: Callable[[], dict[str, int]], database: str,
                 interval: float = 0.1, database_url: str | None = None) -> None:
        self._pids = pids
        self._database = database
        self._database_url = database_url
        self._activity_conn: Any = None
        self._interval = interval
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = threading.Event()
        self._usage = Usage()
        self._cpu_first: dict[int, tuple[str, float]] = {}
        self._cpu_last: dict[int, float] = {}
        self._pg: dict[int, psutil.Process] = {}
        self._pg_scanned = 0.0
        self._trees: dict[str, list[psutil.Process]] = {}
        self._trees_at = 0.0
        self._t0 = 0.0
        self._self_cpu0 = 0.0
        self._machine0 = psutil.cpu_times()

    # ------------------------------------------------------------------ sampling

    def _groups(self) -> dict[str, list[psutil.Process]]:
        # Walking a process tree reads every process on the machine (psutil builds the ppid
        # map), and so does finding the backends: both are refreshed now and then, and the
        # frequent samples read only the processes already known.
        now = time.monotonic()
        if now - self._trees_at > TREE_REFRESH:
            self._trees_at = now
            self._trees = {name: procutil.tree(pid) for name, pid in self._pids().items()}
        if now - self._pg_scanned > BACKEND_REFRESH:
            self._pg_scanned = now
            marker = f" {self._database} "
            for p in psutil.process_iter(["name", "cmdline"]):
                with contextlib.suppress(psutil.Error):
                    cmd = " ".join(p.info["cmdline"] or []) + " "
                    if p.pid not in self._pg and p.info["name"] == "postgres" and marker in cmd:
                        self._pg[p.pid] = p
        groups = {name: [p for p in procs if procutil.alive(p)]
                  for name, procs in self._trees.items()}
        groups["postgres"] = [p for p in self._pg.values() if procutil.alive(p)]
        return groups

    def _sample(self) -> None:
        groups = self._groups()
        with self._lock:
            u = self._usage
            for name, procs in groups.items():
                total = biggest = 0.0
                for p in procs:
                    if name != "postgres":
                        try:
                            rss = p.memory_info().rss / MB
                        except psutil.Error:
                            continue
                        total += rss
                        biggest = max(biggest, rss)
                    cpu = _cpu(p)
                    if cpu is not None:
                        self._cpu_first.setdefault(p.pid, (name, cpu))
                        self._cpu_last[p.pid] = cpu
                if name != "postgres":
                    u.rss_idle_mb.setdefault(name, total)
                    u.rss_mb[name] = max(u.rss_mb.get(name, 0.0), total)
                    u.rss_max_proc_mb[name] = max(u.rss_max_proc_mb.get(name, 0.0), biggest)

    def _sample_activity(self) -> None:
        if self._activity_conn is None:
            return
        try:
            with self._activity_conn.cursor() as cur:
                cur.execute(_ACTIVITY)
                rows = cur.fetchall()
        except Exception:  # noqa: BLE001 - sampling is best effort; the run must go on
            return
        counts = self._usage.pg_activity
        for state, wait_type, wait, query in rows:
            if state == "active":
                label = statement_label(query or "")
                if wait_type:
                    label += f" | {wait_type}:{wait}"
            else:
                label = state  # "idle in transaction": the client's turn inside a transaction
            counts[label] = counts.get(label, 0) + 1

    def _loop(self) -> None:
        while self._running.is_set():
            self._sample()
            self._sample_activity()
            time.sleep(self._interval)

    # ------------------------------------------------------------------ interval

    def start(self) -> None:
        """Begin a measured interval (samples once synchronously, so the idle RSS and the
        starting CPU times are those of before the work)."""
        self._usage = Usage()
        self._cpu_first.clear()
        self._cpu_last.clear()
        self._pg_scanned = self._trees_at = 0.0
        self._t0 = time.monotonic()
        self._self_cpu0 = _cpu(psutil.Process()) or 0.0
        self._machine0 = psutil.cpu_times()
        self._sample()
        if self._database_url is not None and self._activity_conn is None:
            import psycopg2

            with contextlib.suppress(psycopg2.Error):
                self._activity_conn = psycopg2.connect(self._database_url)
                self._activity_conn.autocommit = True
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._activity_conn is not None:
            self._activity_conn.close()
            self._activity_conn = None

    def stop(self) -> Usage:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        u = self._usage
        u.seconds = time.monotonic() - self._t0
        cpu: dict[str, float] = {}
        for pid, (name, first) in self._cpu_first.items():
            cpu[name] = cpu.get(name, 0.0) + self._cpu_last.get(pid, first) - first
        cpu["bench client"] = (_cpu(psutil.Process()) or 0.0) - self._self_cpu0
        # The machine is shared: what everything else used meanwhile, and time spent waiting
        # for the disk, say how much of the two cores the run really had.
        m0, m1 = self._machine0, psutil.cpu_times()
        busy = _busy(m1) - _busy(m0)
        cpu["other processes"] = max(0.0, busy - sum(cpu.values()))
        cpu["iowait"] = m1.iowait - m0.iowait
        cpu["idle"] = m1.idle - m0.idle
        u.cpu_s = cpu
        return u

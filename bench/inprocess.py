"""Where a worker's time goes, in one process: accept a job with `core.jobs.accept_job`, run its
chunks with `run_chunk` (or the transaction with `run_transaction_job`) exactly as the Celery task
does, and account for every second — each SQL statement's round trip (client-side parameter
adaptation included), the garbage collector, and the rest of the Python — with a pyinstrument
profile of the whole.

    python -m bench.inprocess --entries 20000            # W1's chunks
    python -m bench.inprocess --transactions 10          # W3's transactions
    python -m bench.inprocess --synthea                  # W3's real Synthea transactions
    python -m bench.inprocess --entries 20000 --chunk-size 1000 --gc-freeze

The process holds what a worker process holds (everything `worker.tasks` imports) and none of
the generated data (only request bodies, as bytes), so the collector's cost is the worker's.
`--gc-freeze` shows what freezing that start-up heap (gc.freeze) would save.

Uses the benchmark's servers (bench.services) and a database of its own.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from bench.monitor import statement_label
from worker.heap import settle_heap

__all__ = ["Accounting", "main"]


@dataclass
class Accounting:
    """Seconds by statement, the collector's pauses, and wall time."""

    sql: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    gc_seconds: float = 0.0
    gc_collections: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    wall: float = 0.0
    # CPU seconds of the PostgreSQL backends that served the run (a local server only): less
    # sensitive to a busy machine than wall time.
    backend_cpu: float | None = None
    cpu: float = 0.0  # this process's CPU time (the database server's is not in it)

    def report(self, entries: int) -> str:
        sql_total = sum(self.sql.values())
        python = self.wall - sql_total - self.gc_seconds
        lines = [f"{entries:,} entries in {self.wall:.2f} s = {entries / self.wall:,.0f}/s "
                 f"(one process)",
                 f"  CPU of this process {self.cpu:6.2f} s = "
                 f"{self.cpu / entries * 1e6:,.1f} µs/entry",
                 f"  SQL round trips    {sql_total:7.2f} s  {sql_total / self.wall:5.1%}",
                 f"  garbage collector  {self.gc_seconds:7.2f} s  "
                 f"{self.gc_seconds / self.wall:5.1%}  collections by generation "
                 f"{dict(self.gc_collections)}",
                 *([f"  PostgreSQL backends' CPU {self.backend_cpu:5.2f} s = "
                    f"{self.backend_cpu / entries * 1e6:,.0f} µs/entry"]
                   if self.backend_cpu is not None else []),
                 f"  other Python       {python:7.2f} s  {python / self.wall:5.1%}",
                 "  SQL by statement:"]
        for name, seconds in sorted(self.sql.items(), key=lambda kv: -kv[1]):
            lines.append(f"    {seconds:7.2f} s {seconds / self.wall:5.1%} "
                         f"{self.calls[name]:5d}×  {name}")
        return "\n".join(lines)


@contextmanager
def accounting(engine: Engine) -> Iterator[Accounting]:
    acc = Accounting()
    starts: list[float] = []
    gc_start: list[float] = []

    backends: dict[int, float | None] = {}  # pid → its CPU seconds when first seen

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        pid = conn.connection.dbapi_connection.info.backend_pid
        if pid not in backends:
            backends[pid] = _cpu_seconds(pid)
        starts.append(time.perf_counter())

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        name = statement_label(statement)
        acc.sql[name] += time.perf_counter() - starts.pop()
        acc.calls[name] += 1

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start.append(time.perf_counter())
        elif gc_start:
            acc.gc_seconds += time.perf_counter() - gc_start.pop()
            acc.gc_collections[info["generation"]] += 1

    from core.store import bulk

    copy_in = bulk.copy_in

    def timed_copy(conn: Any, sql: str, *args: Any, **kwargs: Any) -> None:
        # COPYs go straight to the driver's cursor, past SQLAlchemy's events.
        before(conn, None, sql)
        try:
            copy_in(conn, sql, *args, **kwargs)
        finally:
            after(conn, None, sql)

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    bulk.copy_in = timed_copy  # type: ignore[assignment]
    gc.callbacks.append(on_gc)
    t0, cpu0 = time.perf_counter(), time.process_time()
    try:
        yield acc
    finally:
        acc.wall = time.perf_counter() - t0
        spent = [(_cpu_seconds(pid), first) for pid, first in backends.items()]
        if spent and all(now is not None and first is not None for now, first in spent):
            acc.backend_cpu = sum(now - first for now, first in spent)  # type: ignore[operator]
        bulk.copy_in = copy_in  # type: ignore[assignment]
        acc.cpu = time.process_time() - cpu0
        gc.callbacks.remove(on_gc)
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "after_cursor_execute", after)


def _store_size(engine: Engine, entries: int) -> str:
    """What the run left on disk, dead row versions included (nothing has vacuumed yet): the
    bytes each entry cost the store and the job tables, indexes included."""
    from sqlalchemy import text

    with engine.connect() as conn:
        sizes = conn.execute(text(
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 2 DESC")).all()
    total = sum(size for _, size in sizes)
    parts = ", ".join(f"{name} {size / entries:,.0f}" for name, size in sizes
                      if size >= entries * 8)
    return f"  on disk: {total / entries:,.0f} bytes an entry ({parts})"


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a local process (None if it is not visible here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _accept(engine: Engine, body: bytes, chunk_size: int) -> str:
    from core.jobs import Submission, accept_job

    sub = Submission(kind="bundle", owner="bench", base_url="http://bench/fhir",
                     chunk_size=chunk_size, scopes=("system/*.*",))
    with engine.begin() as conn:
        return accept_job(conn, io.BytesIO(body), sub).job_id


def _run_job(engine: Engine, job_id: str, *, transaction: bool) -> None:
    """All of a job's work, one database transaction per task as a worker runs it."""
    from core.jobs import run_chunk, run_transaction_job

    while True:
        with engine.begin() as conn:
            if transaction:
                run_transaction_job(conn, job_id, engine.begin)
                return
            if not run_chunk(conn, job_id, 0, engine.begin):
                return


def run(args: argparse.Namespace) -> None:
    from pyinstrument import Profiler

    import worker.tasks  # noqa: F401 - the heap of a worker process
    from bench import data
    from bench.services import bench_services
    from core.fhir.validation import preload_validators
    from core.jobs import run_chunk, run_transaction_job
    from core.store.db import get_engine
    from worker.celery_app import COMMON_TYPES

    # What a worker compiles before its pool forks (worker.celery_app._warm), so that no
    # validator is compiled inside the measured run.
    preload_validators(COMMON_TYPES)
    with bench_services(args.database) as services:
        engine = get_engine(services.database_url)
        if args.synthea:
            real = data.load_synthea(args.synthea_dir)
            # The batches hold what the transactions reference conditionally; the first
            # transaction compiles the validators of most types: neither is measured.
            setup = [_accept(engine, b, args.chunk_size) for _, b in real.batches]
            for job_id in setup:
                _run_job(engine, job_id, transaction=False)
            bundles = []
            bodies = [b for _, b in real.transactions]
            entries = sum(data.count_entries(b) for b in bodies[1:])
            jobs = [_accept(engine, b, args.chunk_size) for b in bodies]
            with engine.begin() as conn:
                run_transaction_job(conn, jobs.pop(0), engine.begin)
        elif args.transactions:
            rng = random.Random(3)
            # One more than measured: the first compiles the validators of its types.
            bundles = [data.synthea_like_bundle(rng.randint(100, 300), rng, serial=i)
                       for i in range(args.transactions + 1)]
            bodies = [data.transaction_body(b) for b in bundles]
            entries = sum(len(b) for b in bundles[1:])
            jobs = [_accept(engine, b, args.chunk_size) for b in bodies]
            with engine.begin() as conn:
                run_transaction_job(conn, jobs.pop(0), engine.begin)
        else:
            bundles = []
            bodies = [data.batch_body(data.patients(args.entries))]
            entries = args.entries
            jobs = [_accept(engine, bodies[0], args.chunk_size)]
            warm = _accept(engine, data.batch_body(data.patients(10)), args.chunk_size)
            with engine.begin() as conn:
                run_chunk(conn, warm, 0, engine.begin)
        del bundles  # only the bodies stay, as bytes
        gc.collect()
        print(f"objects the collector tracks: {len(gc.get_objects()):,}")
        if args.gc_freeze:
            settle_heap()  # as a worker process does (worker.heap)
        profiler = None if args.no_profile else Profiler(interval=0.001)
        with accounting(engine) as acc:
            if profiler is not None:
                profiler.start()
            for job_id in jobs:
                _run_job(engine, job_id, transaction=bool(args.transactions or args.synthea))
            if profiler is not None:
                profiler.stop()
        print(acc.report(entries))
        print(_store_size(engine, entries))
        if profiler is not None:
            print(profiler.output_text(unicode=True, color=False, show_all=False))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20_000, help="W1-like batch size")
    parser.add_argument("--transactions", type=int, default=0,
                        help="run this many W3-like transactions instead")
    parser.add_argument("--synthea", action="store_true",
                        help="run the real Synthea transactions of FHIRQ_SYNTHEA_DIR instead "
                             "(after its batch bundles, unmeasured)")
    parser.add_argument("--synthea-dir", type=Path, default=None)
    parser.add_argument("--chunk-size", type=int, default=500)
    parser.add_argument("--database", default="fhirq_bench_inprocess")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="gc.freeze() the start-up heap first (a possible worker fix)")
    parser.add_argument("--no-profile", action="store_true",
                        help="accounting only, without pyinstrument's overhead")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

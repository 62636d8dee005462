"""Where a synchronous 10-entry transaction's time goes, in one process: W5's bundles POSTed
through the Flask test client (the whole app: authentication, guard, metrics, engine) against
real PostgreSQL, one after the other, so no queue and no other request blurs the figures.

    python -m bench.sync_profile                     # 1,000 requests: time and CPU per request
    python -m bench.sync_profile --profile           # and a pyinstrument profile of them

Per request: wall time, this process's CPU (the API's share, without gunicorn's HTTP layer),
the CPU of the database backends serving it (from /proc: PostgreSQL on this machine), and the
time in each SQL statement's round trip; the rest of the wall time is mostly COMMIT waiting
for its WAL flush (`synchronous_commit`; try FHIRQ_SYNCHRONOUS_COMMIT=off to see its share).
Uses the benchmark's servers (bench.services) and a database of its own.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time

import psycopg2

from bench import data
from bench.inprocess import accounting

__all__ = ["main"]


def _backend_cpu(admin_url: str, database: str) -> float:
    """CPU seconds so far of every backend connected to `database` (0 when PostgreSQL runs
    elsewhere: /proc shows only this machine's processes)."""
    conn = psycopg2.connect(admin_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (database,))
            pids = [r[0] for r in cur.fetchall()]
    finally:
        conn.close()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def run(args: argparse.Namespace) -> None:
    from bench.services import bench_services

    with bench_services(args.database) as services:
        os.environ["FHIRQ_DATABASE_URL"] = services.database_url
        from api import create_app
        from core.store.db import get_engine

        app = create_app()
        client = app.test_client()
        rng = random.Random(5)  # W5's bundles
        bodies = [data.transaction_body(data.synthea_like_bundle(args.entries - 1, rng, serial=i))
                  for i in range(64)]
        headers = {"Authorization": f"Bearer {services.token}",
                   "Content-Type": "application/fhir+json", "Prefer": "return=minimal"}

        def post(i: int) -> None:
            resp = client.post("/fhir", data=bodies[i % len(bodies)], headers=headers)
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {resp.data[:1000]!r}")

        for i in range(50):  # validators compiled, pool filled, API key verified
            post(i)
        gc.collect()
        gc.freeze()
        engine = get_engine()
        profiler = None
        if args.profile:
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005)
        n = args.requests
        walls: list[float] = []
        pg0 = _backend_cpu(services.admin_url, services.database)
        with accounting(engine) as acc:
            if profiler is not None:
                profiler.start()
            cpu0 = time.process_time()
            for i in range(n):
                t0 = time.perf_counter()
                post(i)
                walls.append(time.perf_counter() - t0)
            cpu = time.process_time() - cpu0
            if profiler is not None:
                profiler.stop()
        pg = _backend_cpu(services.admin_url, services.database) - pg0
        ms = 1000 / n
        print(f"{n:,} transactions of {args.entries} entries, one at a time")
        print(f"  wall      median {statistics.median(walls) * 1000:.2f} ms, "
              f"mean {acc.wall * ms:.2f} ms")
        print(f"  API CPU   {cpu * ms:.2f} ms (this process: Flask, engine, psycopg2)")
        print(f"  PG CPU    {pg * ms:.2f} ms (the database backends)")
        for name, seconds in sorted(acc.sql.items(), key=lambda kv: -kv[1]):
            print(f"  SQL       {seconds * ms:.2f} ms  {acc.calls[name] / n:.1f}×  {name}")
        print(f"  collector {acc.gc_seconds * ms:.2f} ms")
        if profiler is not None:
            print(profiler.output_text(unicode=True, color=False, show_all=False))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--entries", type=int, default=10, help="entries per transaction")
    parser.add_argument("--profile", action="store_true", help="with a pyinstrument profile")
    parser.add_argument("--database", default="fhirq_bench_sync")
    run(parser.parse_args())


if __name__ == "__main__":
    main()

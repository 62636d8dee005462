"""Retention figures: what one finished job of N entries keeps on disk in `job_entry` and
`job_result`, and what a purge (core.jobs.retention) frees and takes.

    python -m bench.retention [--entries 1000000]

The job's rows are written by SQL in the shape intake and the workers give them (a ~1 KB
Patient create as the request, a 201 result pointing at its version), not through the API: the
figure is about storage and deletion, and the write path is W1's.
"""

from __future__ import annotations

import argparse
import time
import uuid

from sqlalchemy import Engine, text

from bench.services import bench_services


def _size(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.execute(text("SELECT pg_total_relation_size('job_entry') "
                                  "+ pg_total_relation_size('job_result')")).scalar_one())


def _vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM job_entry, job_result"))


def fill(engine: Engine, entries: int) -> str:
    job_id = str(uuid.uuid4())
    with engine.begin() as c:
        c.execute(text("""
            INSERT INTO job (id, owner, kind, state, base_url, chunk_size, total, done,
                             succeeded, finished_at)
            VALUES (:id, 'bench', 'batch', 'completed', 'http://bench/fhir', 500, :n, :n, :n,
                    now() - interval '8 days')
        """), {"id": job_id, "n": entries})
        c.execute(text("""
            INSERT INTO job_entry (job_id, idx, request)
            SELECT :id, i,
                   json_build_object(
                     'request', json_build_object('method', 'POST', 'url', 'Patient'),
                     'resource', json_build_object(
                       'resourceType', 'Patient',
                       'identifier', json_build_array(json_build_object(
                         'system', 'urn:bench', 'value', 'p-' || i)),
                       'name', json_build_array(json_build_object(
                         'family', 'Family' || i, 'given', json_build_array('Given' || i))),
                       'address', json_build_array(json_build_object(
                         'line', json_build_array(repeat('x', 600)), 'city', 'Springfield')),
                       'birthDate', '1970-01-01', 'gender', 'unknown'))
            FROM generate_series(0, :n - 1) AS i
        """), {"id": job_id, "n": entries})
        c.execute(text("""
            INSERT INTO job_result (job_id, idx, status, last_modified, res_type, res_id,
                                    res_version)
            SELECT :id, i, 201, now(), 'Patient', i::text, 1 FROM generate_series(0, :n - 1) i
        """), {"id": job_id, "n": entries})
    return job_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    args = parser.parse_args()
    from core.jobs.retention import prune
    from core.store.db import get_engine

    with bench_services("fhirq_retention") as services:
        engine = get_engine(services.database_url)
        empty = _size(engine)
        t = time.perf_counter()
        fill(engine, args.entries)
        _vacuum(engine)
        filled = _size(engine)
        print(f"job_entry + job_result for one finished job of {args.entries:,} entries: "
              f"{filled / 2**20:,.0f} MiB ({(filled - empty) / args.entries:,.0f} bytes an "
              f"entry; written in {time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        done = prune(engine, entry_days=7, summary_days=90)
        seconds = time.perf_counter() - t
        after = _size(engine)
        _vacuum(engine)
        vacuumed = _size(engine)
        print(f"purge: {done.entries:,} entries in {seconds:.1f} s "
              f"({done.entries / seconds:,.0f}/s, batches of 20,000, each its own transaction)")
        print(f"job_entry + job_result after the purge: {after / 2**20:,.0f} MiB; after VACUUM (as "
              f"autovacuum does): {vacuumed / 2**20:,.1f} MiB")
        engine.dispose()


if __name__ == "__main__":
    main()

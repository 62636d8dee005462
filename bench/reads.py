"""What reading costs: a read by id, a search page of 50, and a job's final Bundle, each timed
in one process against a store loaded through the product's own write path.

    python -m bench.reads [--resources 20000]

A job of `--resources` Patient creates is accepted and run chunk by chunk (as W1's workers do),
then timed: `--reads` reads of random ids (`read_current`, content included), searches
`gender=male&_count=50` at random offsets, and streaming the job's whole response Bundle
(Prefer: return=representation, every representation re-read from the history). Medians of
repeated runs, so that a busy machine shows in the spread rather than the figure.

Uses the benchmark's servers (bench.services) and a database of its own.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from collections.abc import Callable

__all__ = ["main"]


def _median_ms(work: Callable[[], object], repeat: int) -> tuple[float, float, float]:
    """(median, min, max) of `repeat` runs of `work`, in milliseconds."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        work()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resources", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=2_000)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--database", default="fhirq_bench_reads")
    args = parser.parse_args()

    from sqlalchemy import text

    from bench import data
    from bench.services import bench_services
    from core.fhir.search import search
    from core.jobs import Submission, accept_job, run_chunk
    from core.jobs.views import stream_response
    from core.store import repository as repo
    from core.store.db import get_engine

    with bench_services(args.database) as services:
        engine = get_engine(services.database_url)
        sub = Submission(kind="bundle", owner="bench", base_url="http://bench/fhir",
                         chunk_size=1000, scopes=("system/*.*",))
        body = data.batch_body(data.patients(args.resources))
        with engine.begin() as conn:
            job_id = accept_job(conn, io.BytesIO(body), sub).job_id
        while True:
            with engine.begin() as conn:
                if not run_chunk(conn, job_id, 0, engine.begin):
                    break
        with engine.connect() as conn:
            conn.execute(text("ANALYZE"))
            conn.commit()
            ids = [r[0] for r in conn.execute(text("SELECT res_id FROM resource"))]
        rng = random.Random(7)
        keys = [("Patient", rng.choice(ids)) for _ in range(args.reads)]
        with engine.connect() as conn:
            pending = iter(keys)
            read = _median_ms(lambda: repo.read_current(conn, [next(pending)]), args.reads)
            total = args.resources // 2
            page = _median_ms(lambda: search(
                conn, "Patient",
                [("gender", "male"), ("_count", "50"),
                 ("_offset", str(rng.randrange(0, max(1, total - 50))))],
                base_url="http://bench/fhir"), args.pages)
        job = {"id": job_id, "kind": "batch", "prefer_return": "representation",
               "base_url": "http://bench/fhir"}
        size = 0

        def bundle() -> None:
            nonlocal size
            size = sum(len(part) for part in stream_response(engine, job))

        final = _median_ms(bundle, 5)
        print(f"store of {args.resources:,} Patients (loaded as one job through run_chunk)")
        for name, (med, lo, hi) in (("read by id (content included)", read),
                                     ("search page of 50 (gender, _offset)", page),
                                     (f"final Bundle of the job ({size / 2**20:.1f} MiB)", final)):
            print(f"  {name:44s} median {med:9.3f} ms  (min {lo:.3f}, max {hi:.3f})")
        engine.dispose()


if __name__ == "__main__":
    main()

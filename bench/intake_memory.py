"""Memory of the PostgreSQL backend while one large async batch is accepted.

    python -m bench.intake_memory              # a 250 MB batch of Patient creates
    python -m bench.intake_memory --mb 50

Runs `accept_job` in this process against a scratch database (`fhirq_intake_memory` on the
server of FHIRQ_BENCH_DATABASE_URL, else the local one; dropped afterwards) and samples the
backend serving it every 20 ms with psutil: peak RSS (which counts the shared buffers it
touched) and peak USS (its private memory, what a large body would inflate). The body is made
by `bench.data`, like W4's.
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time

import psutil
from sqlalchemy import text

from bench import data
from bench.services import _recreate, drop_database
from core.jobs import Submission, accept_job
from core.services import database_url
from core.store.db import get_engine
from core.store.migrate import upgrade

__all__ = ["main"]

MB = 1_000_000


def _body(megabytes: float) -> bytes:
    sample = data.batch_body(data.patients(1000))
    n = int(megabytes * MB / (len(sample) / 1000)) + 1
    return data.batch_body(data.patients(n))


class _Peak(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.rss = self.uss = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                info = self.proc.memory_full_info()
            except psutil.Error:
                return
            self.rss, self.uss = max(self.rss, info.rss), max(self.uss, info.uss)
            time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=250, help="body size in MB")
    args = parser.parse_args()
    server = os.environ.get("FHIRQ_BENCH_DATABASE_URL",
                            "postgresql://root@127.0.0.1:5432/postgres")
    url = database_url(server, "fhirq_intake_memory")
    _recreate(server, "fhirq_intake_memory")
    try:
        body = _body(args.mb)
        upgrade(url)
        engine = get_engine(url)
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            conn.commit()
            peak = _Peak(pid)
            peak.start()
            sub = Submission(kind="bundle", owner="bench", base_url="http://localhost/fhir",
                             max_bytes=len(body) + 1)
            start = time.monotonic()
            with conn.begin():
                accepted = accept_job(conn, io.BytesIO(body), sub)
            took = time.monotonic() - start
            peak.done.set()
            peak.join()
        engine.dispose()
        print(f"body {len(body) / MB:,.0f} MB, {accepted.total:,} entries, accepted in "
              f"{took:.1f} s; PostgreSQL backend peak RSS {peak.rss / 2**20:,.0f} MiB, "
              f"peak USS {peak.uss / 2**20:,.0f} MiB")
    finally:
        drop_database(server, "fhirq_intake_memory")


if __name__ == "__main__":
    main()

"""W7: the W1 batch of Patient creates into a store that already holds `w7_store` resources
(10 million by default; bench.bigstore builds and keeps it), against the same batch into the
empty store, the two measured alternately in the same run. Also: the size on disk per resource
and the time of a search by identifier and by date at that size.

The large store has a product stack of its own (API and worker on its database); between runs
it loses what the runs loaded instead of being truncated.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import orjson
import psycopg2

from bench import bigstore
from bench.bigstore import BigStore
from bench.client import JobClient
from bench.monitor import Monitor
from bench.report import Series
from bench.services import _api_key
from bench.stack import Stack
from bench.workloads import JSON, Bench, BenchError, _expect_done

__all__ = ["StoreBench", "run_w7", "store_database"]

SEARCHES = 7  # of each kind; their median is reported


def store_database(size: int) -> str:
    """The kept store's database: one per size (whatever `--database` says, so every run on
    the server finds it), so that a quick run never replaces the big one."""
    label = (f"{size // 1_000_000}m" if size % 1_000_000 == 0 else
             f"{size // 1_000}k" if size % 1_000 == 0 else str(size))
    return f"fhirq_bench_w7_{label}"


@dataclass
class StoreBench(Bench):
    """A Bench on the large store: its 'reset' removes what runs loaded, never the store."""

    store: BigStore | None = None

    def reset_store(self) -> None:
        self._wait_quiet()
        assert self.store is not None
        bigstore.remove_loaded(self.store)
        conn = psycopg2.connect(self.services.database_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur, contextlib.suppress(psycopg2.Error):
                cur.execute("CHECKPOINT")
        finally:
            conn.close()


def _build(bench: StoreBench, size: int) -> BigStore:
    """Seed through the product, then multiply in SQL (bench.bigstore)."""
    t0 = time.monotonic()
    seed = bigstore.make_seed(min(size, bigstore.SEED_SIZE))
    bench.say(f"W7 store: writing the {len(seed.resources):,}-resource seed through the product")
    for wave in seed.waves():
        _, job = bench.run_async(bench._submit_wait("PUT", orjson.dumps(wave), JSON))
        _expect_done(job, len(wave), "W7 store seed")
    url = bench.services.database_url
    built_at = bigstore.server_now(url)
    conn = psycopg2.connect(url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("TRUNCATE job, job_entry CASCADE")
    finally:
        conn.close()
    bigstore.multiply(url, size, seed, bench.say)
    seconds = time.monotonic() - t0
    store = bigstore.mark_built(url, size, len(seed.resources), built_at, seconds, seed.types)
    bench.say(f"W7 store: {size:,} resources built in {seconds:.0f} s")
    return store


async def _timed_search(client: JobClient, path: str, params: dict[str, str]
                        ) -> tuple[float, int]:
    t0 = time.monotonic()
    resp = await client.http.get(path, params=params)
    ms = (time.monotonic() - t0) * 1000
    if resp.status_code != 200:
        raise BenchError(f"W7 search {path} {params}: {resp.status_code} {resp.text[:300]}")
    return ms, int(orjson.loads(resp.content).get("total", -1))


def _searches(bench: StoreBench, store: BigStore) -> dict[str, float]:
    """Median ms of a Patient search by identifier (one match among the store) and of an
    Observation search by day (a page of 50 and the total), each over SEARCHES values."""
    seed = bigstore.make_seed(store.seed_size)
    rng = random.Random(7)
    full_copies = max(1, store.copies - 1)  # the last copy may be partial
    by_id, by_date = [], []
    identifiers, days = seed.identifiers(), seed.dates()
    for _ in range(SEARCHES):
        system, value = rng.choice(identifiers)
        value = value.replace(bigstore.MARK, bigstore.copy_mark(rng.randrange(full_copies)))
        ms, total = bench.run_async(_timed_search(bench.client, "/fhir/Patient",
                                                  {"identifier": f"{system}|{value}"}))
        if total != 1:
            raise BenchError(f"W7: Patient?identifier={system}|{value} found {total}, not 1")
        by_id.append(ms)
        day = rng.choice(days)
        ms, total = bench.run_async(_timed_search(bench.client, "/fhir/Observation",
                                                  {"date": day}))
        if total < 1:
            raise BenchError(f"W7: Observation?date={day} found nothing")
        by_date.append(ms)
    return {"search_identifier_ms": statistics.median(by_id),
            "search_date_ms": statistics.median(by_date)}


def _open(bench: Bench, size: int, name: str, rebuild: bool) -> tuple[StoreBench, bool]:
    """A StoreBench on the kept store (or on a fresh database to build it in), with its own
    API and worker started; whether the store still has to be built."""
    admin = bench.services.admin_url
    store = None if rebuild else bigstore.open_store(admin, name, size)
    if store is None:
        bench.say(f"W7 store: building {size:,} resources in database {name}")
        url = bigstore.prepare_store(admin, name)
    else:
        bench.say(f"W7 store: reusing {name} ({store.size:,} resources, built in "
                  f"{store.build_seconds:.0f} s)")
        url = store.url
    services = replace(bench.services, database_url=url, database=name, token=_api_key(url))
    stack = Stack(services, bench.stack.options, bench.stack.log_dir / "w7")
    big = StoreBench(services, stack, JobClient(stack.origin, services.token),
                     Monitor(stack.pids, name, database_url=url), bench.sizes, bench.console,
                     loop=bench.loop, _patients=bench._patients, _bodies=bench._bodies,
                     store=store)
    stack.start_api()
    stack.start_worker(bench.stack.concurrency)
    return big, store is None


def _close(big: StoreBench) -> None:
    with contextlib.suppress(Exception):
        big.run_async(big.client.close())
    big.monitor.close()
    big.stack.stop()


def run_w7(bench: Bench, database: str | None = None, *, rebuild: bool = False
           ) -> list[Series]:
    z = bench.sizes
    n, size = z.w7_batch, z.w7_store
    title = "async batch of Patient creates into a store that already holds many resources"
    empty = Series("W7", title, f"{n:,} creates, empty store", "entries/s")
    full = Series("W7", title, f"{n:,} creates, store of {size:,}", "entries/s",
                  target="≥ 0.8× the empty-store rate")
    big, build = _open(bench, size, database or store_database(size), rebuild)
    try:
        if build:
            big.store = _build(big, size)
        assert big.store is not None
        big.warm_up()
        bench.warm_up()  # its processes sat idle while the store was built
        for i in range(z.runs):
            # Alternating which goes first: neither side always gets the fresher machine.
            first_big = i % 2 == 1
            if first_big:
                run = big._one_batch(f"W7 store of {size:,} run {i + 1}", n)
            e = bench.pair(empty, bench._one_batch(f"W7 empty store run {i + 1}", n),
                           bench.patient_rows(n))
            if not first_big:
                run = big._one_batch(f"W7 store of {size:,} run {i + 1}", n)
            run.baseline = e.rate
            # What the targets table reads (bench.report._w7).
            run.extra.update(empty_rate=e.rate, over_empty=run.rate / e.rate)
            full.runs.append(run)
            full.baseline.append(e.rate)
            bench.say(f"  against the empty store's {e.rate:,.0f}/s: ratio "
                      f"{run.rate / e.rate:.2f}")
        big.reset_store()
        figures = _searches(big, big.store)
        per_resource, count = bigstore.disk_per_resource(big.store)
        figures.update(bytes_per_resource=per_resource, store_resources=float(count),
                       build_s=big.store.build_seconds)
        for run in full.runs:
            run.extra.update(figures)
    finally:
        _close(big)
    full.met = (full.ratio or 0) >= 0.8
    full.note = (
        f"baseline and ratio: the same batch into the empty store, alternating in this run; "
        f"store of {count:,} resources {'built now' if build else 'reused'} "
        f"(built in {big.store.build_seconds:.0f} s), {per_resource:,.0f} bytes on disk per "
        f"resource (store tables, indexes, TOAST); search p50 by identifier "
        f"{figures['search_identifier_ms']:.1f} ms, by date (page of 50 and total) "
        f"{figures['search_date_ms']:.1f} ms")
    bench.say(f"W7: {full.note}")
    return [empty, full]


def w7_summary(series: list[Series]) -> dict[str, Any] | None:
    """What the targets table reads from a W7 result: rate, empty-store rate, ratio."""
    full = [s for s in series if s.workload == "W7" and s.target]
    if not full:
        return None
    s = full[0]
    return {"rate": s.median, "empty_rate": s.baseline_median, "ratio": s.ratio}

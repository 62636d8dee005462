"""The workloads W1–W6 (issue "Throughput near the PostgreSQL limit") and the real-Synthea load.

Each workload method measures one workload at one size `runs` times against the running product,
each run on an empty store, and returns `Series`. Every run is paired with a COPY baseline of the
same rows measured right after it, so a run and its baseline share the machine's conditions (it
is shared and noisy) and the series' ratio is the median of the runs' own ratios. What each
one times:

- W1 async batch of Patient creates: POST of the Bundle → the job seen completed.
- W2 PUT upserts, half to existing ids: after an untimed load of the existing half, PUT of the
  array → completed.
- W3 Synthea-like transaction bundles, all submitted at once: first POST → last job completed;
  per-bundle latency submit → completed.
- W4 accepting a large bundle: POST → 202, against `orjson.loads` of the same body, and the API's
  memory meanwhile (the job is then cancelled).
- W5 small synchronous transactions: the peak rate of closed-loop clients, then per-request
  latency at an open-loop offered load of half that peak.
- W6 W1 with one worker process and with two.
- W7 W1 into a store that already holds millions of resources, against the empty store
  (bench.w7, bench.bigstore).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg2
from psycopg2 import errors as pg_errors
from rich.console import Console

from bench import baseline, data
from bench.client import FHIR_JSON, Job, JobClient, Submitted
from bench.monitor import Monitor, Usage
from bench.profile import Profiler
from bench.report import Run, Series, percentile
from bench.services import Services
from bench.stack import Stack

__all__ = ["Bench", "BenchError", "Sizes"]

JOB_TIMEOUT = 900.0
JSON = "application/json"
MB = 1024 * 1024


class BenchError(RuntimeError):
    """A workload did not do what it should (failed entries, a failed job): its figures would
    mean nothing."""


@dataclass(frozen=True)
class Sizes:
    runs: int = 3
    w1_full: int = 100_000  # one run at the size
    w1_repeat: int = 20_000  # the repeated runs (and W6)
    w2: int = 10_000
    w3_bundles: int = 50
    w3_min: int = 100
    w3_max: int = 300
    w4: int = 200_000  # 200 MB: the size of the memory target
    w5_clients: int = 20  # closed-loop clients for the peak
    w5_peak_seconds: float = 10.0
    w5_open_seconds: float = 20.0  # the open loop at half of the peak
    w5_entries: int = 10
    w7_store: int = 10_000_000  # resources the large store holds before W7's batch
    w7_batch: int = 20_000


QUICK = Sizes(runs=1, w1_full=0, w1_repeat=2_000, w2=1_000, w3_bundles=5, w4=5_000,
              w5_peak_seconds=2.0, w5_open_seconds=3.0, w7_store=20_000, w7_batch=2_000)


@dataclass
class Bench:
    """Everything a workload needs: the product, a client, the monitor, where to report."""

    services: Services
    stack: Stack
    client: JobClient
    monitor: Monitor
    sizes: Sizes
    console: Console
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    profiler: Profiler | None = None
    profiles: dict[str, Any] = field(default_factory=dict)
    _patients: list[dict[str, Any]] = field(default_factory=list)
    _bodies: dict[int, bytes] = field(default_factory=dict)
    _rows: dict[str, baseline.CopyRows] = field(default_factory=dict)
    w7_database: str | None = None  # where W7's large store is kept (None: by its size)
    w7_rebuild: bool = False  # build W7's large store even when a kept one matches

    # ------------------------------------------------------------------ shared helpers

    def say(self, text: str) -> None:
        self.console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {text}")

    def reset_store(self) -> None:
        """An empty store and job table, flushed to disk, before every measured run."""
        self._wait_quiet()
        conn = psycopg2.connect(self.services.database_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SET lock_timeout = '10s'")
                for attempt in range(5):
                    try:
                        # CASCADE: the job tables that reference `job` (chunk ledger, …).
                        cur.execute("TRUNCATE resource, resource_history, resource_string, "
                                    "job, job_entry, job_upload CASCADE")
                        break
                    except (pg_errors.DeadlockDetected, pg_errors.LockNotAvailable):
                        if attempt == 4:
                            raise
                        self._wait_quiet()
                # So that no checkpoint of earlier work lands mid-run; needs a superuser (or
                # pg_checkpoint), without which runs are only a little noisier.
                with contextlib.suppress(psycopg2.Error):
                    cur.execute("CHECKPOINT")
        finally:
            conn.close()

    def _wait_quiet(self, timeout: float = 120.0) -> None:
        """Until no other session works in the benchmark database: a cancelled job's running
        chunk finishes its transaction before the next run starts (or truncates under it)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = self.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND state NOT IN ('idle')")[0]
            if not busy or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def sql(self, query: str) -> Any:
        conn = psycopg2.connect(self.services.database_url)
        try:
            with conn.cursor() as cur:
                cur.execute(query)
                return cur.fetchone()
        finally:
            conn.close()

    def patients(self, n: int) -> list[dict[str, Any]]:
        if len(self._patients) < n:
            self._patients = data.patients(n)
            _settle()
        return self._patients[:n]

    def batch_body(self, n: int) -> bytes:
        if n not in self._bodies:
            self._bodies[n] = data.batch_body(self.patients(n))
        return self._bodies[n]

    def warm_up(self) -> None:
        """A few small jobs of every kind and resource type the workloads use, untimed, so that
        each worker and API process has paid its one-time costs (imports, connection pools,
        compiling the validators of a resource type on first use) before anything is measured."""
        rng = random.Random(9)
        n = 2 * max(1, self.stack.concurrency)
        bodies = [data.transaction_body(data.synthea_like_bundle(40, rng, serial=i))
                  for i in range(n)]
        bodies += [data.batch_body(data.patients(50, seed=9 + i)) for i in range(n)]
        _, subs, jobs = self.run_async(self._submit_all(bodies))
        for sub in subs:
            if jobs[sub.job_id].state != "completed":
                raise BenchError(f"warm-up job {sub.job_id} ended {jobs[sub.job_id].state}")
        self.reset_store()

    def rows(self, key: str, make: Callable[[], baseline.CopyRows]) -> baseline.CopyRows:
        """A workload's COPY rows, prepared once (untimed) and kept for every run."""
        if key not in self._rows:
            self._rows[key] = make()
        return self._rows[key]

    def patient_rows(self, n: int) -> baseline.CopyRows:
        return self.rows(f"patients {n}",
                         lambda: baseline.prepare_rows(_with_ids(self.patients(n))))

    def pair(self, series: Series, run: Run, rows: baseline.CopyRows) -> Run:
        """Add `run` to `series` with the COPY baseline of its rows, measured now."""
        run.baseline = baseline.time_copy(self.services.database_url, rows, 1)[0]
        series.runs.append(run)
        series.baseline.append(run.baseline)
        self.say(f"  COPY of the same {rows.count:,} rows: {run.baseline:,.0f} rows/s, "
                 f"ratio {run.rate / run.baseline:.2f}")
        return run

    def _begin(self, label: str) -> None:
        self.stack.check()
        self.monitor.start()
        if self.profiler is not None:
            self.profiler.start(label, self.stack.pids())

    def _end(self, label: str) -> Usage:
        usage = self.monitor.stop()
        if self.profiler is not None:
            for group, prof in self.profiler.stop().items():
                key = f"{label} {group}"
                if key in self.profiles:
                    self.profiles[key].self_time.update(prof.self_time)
                    self.profiles[key].inclusive.update(prof.inclusive)
                    self.profiles[key].samples += prof.samples
                else:
                    self.profiles[key] = prof
        self.stack.check()
        return usage

    def run_async(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _submit_wait(self, method: str, body: bytes, content_type: str = FHIR_JSON
                           ) -> tuple[Submitted, Job]:
        sub = await self.client.submit(method, body, content_type=content_type)
        return sub, await self.client.wait(sub, timeout=JOB_TIMEOUT)

    async def _submit_all(self, bodies: list[bytes]
                          ) -> tuple[float, list[Submitted], dict[str, Job]]:
        t0 = time.monotonic()
        subs = list(await asyncio.gather(*(self.client.submit("POST", b) for b in bodies)))
        return t0, subs, await self.client.wait_all(subs, timeout=JOB_TIMEOUT)

    async def _cancel_wait(self, sub: Submitted) -> None:
        await self.client.cancel(sub)
        await self.client.wait(sub, timeout=JOB_TIMEOUT)

    async def _clients(self, bodies: list[bytes], clients: int, per_client: int
                       ) -> tuple[float, list[float]]:
        """`clients` concurrent clients each sending `per_client` transactions one after the
        other; (wall seconds, every latency)."""
        latencies: list[float] = []

        async def one(k: int) -> None:
            for j in range(per_client):
                latencies.append(
                    await self.client.transaction(bodies[(k * per_client + j) % len(bodies)]))

        t0 = time.monotonic()
        await asyncio.gather(*(one(k) for k in range(clients)))
        return time.monotonic() - t0, latencies

    # ------------------------------------------------------------------ W1 / W6

    def _one_batch(self, label: str, n: int) -> Run:
        body = self.batch_body(n)
        self.reset_store()
        self._begin(label)
        sub, job = self.run_async(self._submit_wait("POST", body))
        usage = self._end(label)
        _expect_done(job, n, label)
        seconds = job.raw["_seen_at"] - sub.sent_at
        run = Run(n, seconds, n / seconds, usage=usage.as_json(),
                  extra={"accept_s": sub.accept_seconds,
                         "execute_rate": n / (seconds - sub.accept_seconds)})
        self.say(f"{label}: {n:,} entries in {seconds:.1f} s = {run.rate:,.0f}/s "
                 f"(202 after {sub.accept_seconds:.2f} s)")
        return run

    def _batch_series(self, workload: str, title: str, label: str, n: int, runs: int) -> Series:
        s = Series(workload, title, label, "entries/s")
        for i in range(runs):
            self.pair(s, self._one_batch(f"{workload} {label} run {i + 1}", n),
                      self.patient_rows(n))
        return s

    def w1(self) -> list[Series]:
        title = "async batch of Patient creates (~1 KB each)"
        out: list[Series] = []
        z = self.sizes
        if z.w1_full:
            full = self._batch_series("W1", title, f"{z.w1_full:,} creates", z.w1_full, 1)
            full.target = "≥ 0.8× COPY baseline"
            full.met = (full.ratio or 0) >= 0.8
            out.append(full)
        if z.w1_repeat and z.runs:
            rep = self._batch_series("W1", title, f"{z.w1_repeat:,} creates", z.w1_repeat,
                                     z.runs)
            if not z.w1_full:
                rep.target = "≥ 0.8× COPY baseline"
                rep.met = (rep.ratio or 0) >= 0.8
            out.append(rep)
        return out

    def w6(self, two: Series | None) -> list[Series]:
        """W1 at the repeated size with one worker process, then two (the W1 series at that
        size when there is one: it ran with two)."""
        z = self.sizes
        title = f"W1 ({z.w1_repeat:,} creates) by worker processes"
        concurrency = self.stack.concurrency
        self.say("W6: restarting the worker with one process")
        self.stack.restart_worker(1)
        try:
            self.warm_up()
            one = self._batch_series("W6", title, "1 worker process", z.w1_repeat, z.runs)
        finally:
            self.say(f"W6: restarting the worker with {concurrency} processes")
            self.stack.restart_worker(concurrency)
            self.warm_up()
        if two is None:
            two = self._batch_series("W6", title, "2 worker processes", z.w1_repeat, z.runs)
        else:
            two = Series("W6", title, "2 worker processes", "entries/s", list(two.runs),
                         list(two.baseline), note="the runs of W1 at this size")
        two.note = (two.note + "; " if two.note else "") + (
            f"scaling {two.median / one.median:.2f}× from one process to two")
        return [one, two]

    # ------------------------------------------------------------------ W2

    def w2(self) -> list[Series]:
        z = self.sizes
        setup, upserts = data.upsert_set(z.w2)
        setup_body, body = orjson.dumps(setup), orjson.dumps(upserts)
        s = Series("W2", "PUT upserts (batch upsert array, async), half to existing ids",
                   f"{z.w2:,} upserts", "entries/s")
        for i in range(z.runs):
            label = f"W2 run {i + 1}"
            self.reset_store()
            t0 = time.monotonic()
            _, loaded = self.run_async(self._submit_wait("PUT", setup_body, JSON))
            _expect_done(loaded, len(setup), f"{label} setup")
            setup_s = time.monotonic() - t0
            self._begin(label)
            sub, job = self.run_async(self._submit_wait("PUT", body, JSON))
            usage = self._end(label)
            _expect_done(job, len(upserts), label)
            updated = self.sql("SELECT count(*) FROM resource WHERE version = 2")[0]
            if updated != len(setup):
                raise BenchError(f"{label}: {updated} resources got a second version, "
                                 f"expected {len(setup)}")
            seconds = job.raw["_seen_at"] - sub.sent_at
            self.say(f"{label}: {len(upserts):,} upserts in {seconds:.1f} s = "
                     f"{len(upserts) / seconds:,.0f}/s")
            self.pair(s, Run(len(upserts), seconds, len(upserts) / seconds,
                             usage=usage.as_json(),
                             extra={"accept_s": sub.accept_seconds, "setup_s": setup_s}),
                      self.rows("W2", lambda: baseline.prepare_rows(upserts)))
        return [s]

    # ------------------------------------------------------------------ W3

    def _transactions(self, series: Series, label: str, bodies: list[bytes], sizes: list[int],
                      rows: Callable[[], baseline.CopyRows],
                      before: Callable[[], None] | None = None) -> None:
        total = sum(sizes)
        for i in range(self.sizes.runs):
            name = f"{label} run {i + 1}"
            self.reset_store()
            if before is not None:
                before()
            self._begin(name)
            t0, subs, jobs = self.run_async(self._submit_all(bodies))
            usage = self._end(name)
            for sub, n in zip(subs, sizes, strict=True):
                _expect_done(jobs[sub.job_id], n, name)
            end = max(j.raw["_seen_at"] for j in jobs.values())
            latencies = [(jobs[s.job_id].raw["_seen_at"] - s.sent_at) * 1000 for s in subs]
            run = Run(total, end - t0, total / (end - t0), percentile(latencies, 50),
                      percentile(latencies, 99), usage.as_json(),
                      extra={"accept_s": statistics.median(s.accept_seconds for s in subs)})
            self.say(f"{name}: {len(bodies)} transactions, {total:,} resources in "
                     f"{run.seconds:.1f} s = {run.rate:,.0f}/s")
            self.pair(series, run, self.rows(label, rows))

    def w3(self) -> list[Series]:
        z = self.sizes
        bundles = data.synthea_like_bundles(z.w3_bundles, z.w3_min, z.w3_max)
        bodies = [data.transaction_body(b) for b in bundles]
        sizes = [len(b) for b in bundles]
        s = Series("W3", "Synthea-like transaction bundles submitted async at once",
                   f"{len(bundles)} bundles, {sum(sizes):,} resources", "resources/s",
                   target="≥ 5,000 resources/s")
        self._transactions(s, "W3", bodies, sizes, lambda: baseline.prepare_rows(
            r for b in bundles for r in baseline.resolve_placeholders(b)))
        s.met = s.median >= 5000
        return [s]

    def synthea(self, directory: Path | None = None) -> list[Series]:
        """The 22 real bundles: the two batch bundles, then the 20 transactions at once."""
        real = data.load_synthea(directory)
        title = "real Synthea bundles (2 batch, then 20 transactions at once)"
        batches = Series("W3", title, "2 batch bundles (ifNoneExist)", "entries/s")
        trans = Series("W3", title, "20 patient transactions", "resources/s",
                       target="≥ 5,000 resources/s")
        batch_sizes = [len(orjson.loads(b)["entry"]) for _, b in real.batches]
        trans_bundles = [orjson.loads(b)["entry"] for _, b in real.transactions]

        def load_batches() -> None:
            # Both at once: their entries are independent creates with ifNoneExist.
            t0, subs, jobs = self.run_async(self._submit_all([b for _, b in real.batches]))
            for sub, n in zip(subs, batch_sizes, strict=True):
                _expect_done(jobs[sub.job_id], n, "Synthea batch bundle")
            seconds = max(j.raw["_seen_at"] for j in jobs.values()) - t0
            batches.runs.append(Run(sum(batch_sizes), seconds, sum(batch_sizes) / seconds))

        def rows() -> baseline.CopyRows:
            resources = [r for _, b in real.batches
                         for r in baseline.resolve_placeholders(orjson.loads(b)["entry"])]
            resources += [r for b in trans_bundles for r in baseline.resolve_placeholders(b)]
            return baseline.prepare_rows(resources)

        self._transactions(trans, "W3 real Synthea", [b for _, b in real.transactions],
                           [len(b) for b in trans_bundles], rows, before=load_batches)
        # The batch phase of each run shares its run's baseline: all 22 bundles' rows.
        for run, base in zip(batches.runs, trans.baseline, strict=True):
            run.baseline = base
            batches.baseline.append(base)
        trans.met = trans.median >= 5000
        return [batches, trans]

    # ------------------------------------------------------------------ W4

    def w4(self) -> list[Series]:
        z = self.sizes
        body = self.batch_body(z.w4)
        body_mb = len(body) / MB
        parse_s, parse_nogc_s = parse_seconds(body)
        s = Series("W4", "accepting a large async bundle (seconds to the 202, API memory)",
                   f"{z.w4:,} entries, {body_mb:,.0f} MB", "entries/s",
                   target="≤ 3× parse, RSS ≤ 2× body")
        for i in range(z.runs):
            label = f"W4 run {i + 1}"
            self.reset_store()
            self._begin(label)
            sub = self.run_async(self.client.submit("POST", body))
            usage = self._end(label)
            # Only the accept is measured: the job itself is W1's business.
            self.run_async(self._cancel_wait(sub))
            u = usage.as_json()
            peak_proc = u["rss_max_proc_mb"].get("api", 0.0)
            growth = u["rss_mb"].get("api", 0.0) - u["rss_idle_mb"].get("api", 0.0)
            run = Run(z.w4, sub.accept_seconds, z.w4 / sub.accept_seconds, usage=u,
                      extra={"accept_s": sub.accept_seconds, "parse_s": parse_s,
                             "parse_nogc_s": parse_nogc_s,
                             "accept_over_parse": sub.accept_seconds / parse_s,
                             "body_mb": body_mb, "api_rss_growth_mb": growth,
                             "api_rss_over_body": peak_proc / body_mb})
            self.say(f"{label}: 202 after {sub.accept_seconds:.2f} s (orjson.loads "
                     f"{parse_s:.2f} s, {parse_nogc_s:.2f} s without gc); API process peak "
                     f"{peak_proc:,.0f} MB, tree grew {growth:,.0f} MB; body {body_mb:,.0f} MB")
            self.pair(s, run, self.patient_rows(z.w4))
        s.met = (s.extra("accept_over_parse") or 99) <= 3 and (s.extra("api_rss_over_body")
                                                                 or 99) <= 2
        s.note = ("parse: a plain orjson.loads of the body in a fresh interpreter (the "
                  "collector on, as Python runs it; 'gc off' is orjson alone); RSS: the largest "
                  "API process (the one that took the upload) at its peak, against the body size")
        return [s]

    # ------------------------------------------------------------------ W5

    def w5(self) -> list[Series]:
        """Peak: `w5_clients` closed-loop clients for `w5_peak_seconds`, each sending its next
        transaction as soon as the last is answered (saturation: its latency is queueing).
        Then an open loop at half that peak for `w5_open_seconds`: Poisson arrivals on a
        schedule fixed in advance, each latency counted from its scheduled send time, so a
        slow answer cannot hold back the next arrivals and hide the queue it causes."""
        z = self.sizes
        rng = random.Random(5)
        bundles = [data.synthea_like_bundle(z.w5_entries - 1, rng, serial=i) for i in range(64)]
        bodies = [data.transaction_body(b) for b in bundles]
        title = f"{z.w5_entries}-entry synchronous transactions"
        peak = Series("W5", title, f"peak: {z.w5_clients} clients, closed loop, "
                      f"{z.w5_peak_seconds:g} s", "entries/s",
                      note="saturated: latency here is the queue of clients waiting")
        half = Series("W5", title, f"open loop at half of peak, Poisson, {z.w5_open_seconds:g} s",
                      "entries/s", target="p99 ≤ 50 ms")

        def rows() -> baseline.CopyRows:
            return baseline.prepare_rows(r for j in range(256)
                                         for r in baseline.resolve_placeholders(bundles[j % 64]))

        for i in range(z.runs):
            label = f"W5 run {i + 1}"
            self.reset_store()
            self.run_async(self._clients(bodies, z.w5_clients, 1))  # connections, warm caches
            self._begin(f"{label} peak")
            retries = self.client.retries
            seconds, latencies = self.run_async(
                self._closed_loop(bodies, z.w5_clients, z.w5_peak_seconds))
            usage = self._end(f"{label} peak")
            tps = len(latencies) / seconds
            ms = [x * 1000 for x in latencies]
            run = Run(len(latencies) * z.w5_entries, seconds, tps * z.w5_entries,
                      percentile(ms, 50), percentile(ms, 99), usage.as_json(),
                      extra={"transactions_per_s": tps,
                             "resent_on_closed_connection": self.client.retries - retries})
            self.say(f"{label} peak: {len(latencies)} transactions in {seconds:.1f} s = "
                     f"{tps:,.0f}/s, p50 {run.p50_ms:.0f} ms, p99 {run.p99_ms:.0f} ms")
            self.pair(peak, run, self.rows("W5", rows))

            offered = tps / 2
            self._begin(f"{label} half")
            seconds, latencies, lags = self.run_async(
                self._open_loop(bodies, offered, z.w5_open_seconds, random.Random(50 + i)))
            usage = self._end(f"{label} half")
            ms = [x * 1000 for x in latencies]
            lag_ms = [x * 1000 for x in lags]
            run = Run(len(latencies) * z.w5_entries, seconds,
                      len(latencies) * z.w5_entries / seconds, percentile(ms, 50),
                      percentile(ms, 99), usage.as_json(),
                      extra={"transactions_per_s": len(latencies) / seconds,
                             "offered_per_s": offered, "peak_per_s": tps,
                             "send_lag_p99_ms": percentile(lag_ms, 99)})
            self.say(f"{label} at half of peak: {offered:,.0f}/s offered, {len(latencies)} "
                     f"transactions, p50 {run.p50_ms:.1f} ms, p99 {run.p99_ms:.1f} ms "
                     f"(the client sent p99 {run.extra['send_lag_p99_ms']:.1f} ms late)")
            self.pair(half, run, self.rows("W5", rows))
        peak.met = None
        half.met = (half.median_of(lambda r: r.p99_ms) or 1e9) <= 50
        half.note = ("latency from each arrival's scheduled send time (Poisson arrivals at half "
                     "of the run's peak); send lag: how late the client itself got them out")
        return [peak, half]

    async def _closed_loop(self, bodies: list[bytes], clients: int, seconds: float
                           ) -> tuple[float, list[float]]:
        """`clients` clients each sending transactions back to back until `seconds` have
        passed; (wall seconds until the last answer, every latency)."""
        latencies: list[float] = []
        t0 = time.monotonic()
        stop = t0 + seconds

        async def one(k: int) -> None:
            j = k
            while time.monotonic() < stop:
                latencies.append(await self.client.transaction(bodies[j % len(bodies)]))
                j += clients

        await asyncio.gather(*(one(k) for k in range(clients)))
        return time.monotonic() - t0, latencies

    async def _open_loop(self, bodies: list[bytes], rate: float, seconds: float,
                         rng: random.Random) -> tuple[float, list[float], list[float]]:
        """Transactions arriving at `rate` per second (exponential gaps) for `seconds`, each
        sent at its scheduled time however many are still in flight; (wall seconds, latency
        of each from its scheduled time, how late each was actually sent)."""
        latencies: list[float] = []
        lags: list[float] = []

        async def one(body: bytes, due: float) -> None:
            lags.append(time.monotonic() - due)
            await self.client.transaction(body)
            latencies.append(time.monotonic() - due)

        t0 = time.monotonic() + 0.05
        due, n = t0, 0
        tasks: list[asyncio.Task[None]] = []
        while due < t0 + seconds:
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(bodies[n % len(bodies)], due)))
            n += 1
            due += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        return time.monotonic() - t0, latencies, lags

    # ------------------------------------------------------------------ W7

    def w7(self) -> list[Series]:
        from bench.w7 import run_w7

        return run_w7(self, self.w7_database, rebuild=self.w7_rebuild)


_PARSE = """
import gc, sys, time, orjson
body = open(sys.argv[1], "rb").read()
t0 = time.perf_counter()
value = orjson.loads(body)
t1 = time.perf_counter()
del value
gc.collect()
gc.disable()
t2 = time.perf_counter()
value = orjson.loads(body)
print(t1 - t0, time.perf_counter() - t2)
"""


def parse_seconds(body: bytes, runs: int = 3) -> tuple[float, float]:
    """Median seconds of `orjson.loads(body)` alone in a fresh interpreter, as Python runs it
    (the millions of containers it creates set off the garbage collector again and again), and
    with the collector disabled (orjson's own cost). A fresh interpreter because the
    benchmark's own heap, every generated resource, would make each collection dearer."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        pairs = [subprocess.run([sys.executable, "-c", _PARSE, f.name], check=True,
                                capture_output=True, text=True).stdout.split()
                 for _ in range(runs)]
    return (statistics.median(float(p[0]) for p in pairs),
            statistics.median(float(p[1]) for p in pairs))


def _settle() -> None:
    """Keep the generated data out of the collector's way: the client's own work should not
    pay for traversing it (gc.freeze moves everything alive to a generation never scanned)."""
    gc.collect()
    gc.freeze()


def _with_ids(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import uuid

    return [{**r, "id": str(uuid.uuid4())} for r in resources]


def _expect_done(job: Any, n: int, label: str) -> None:
    if job.state != "completed":
        detail = orjson.dumps(job.raw.get("outcome")).decode() if job.raw else ""
        raise BenchError(f"{label}: job {job.job_id} ended {job.state} {detail}")
    if job.total is not None and (job.total != n or job.done != n or job.failed):
        raise BenchError(f"{label}: job {job.job_id}: total {job.total}, done {job.done}, "
                         f"failed {job.failed}; expected {n} entries, none failed")

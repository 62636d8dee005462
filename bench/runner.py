"""`fhirq bench` end to end: servers, the product's processes, the selected workloads, their
baselines, the tables and the results file.
"""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psutil
from rich.console import Console

from bench.client import JobClient
from bench.monitor import Monitor
from bench.profile import Profiler
from bench.report import (
    Series,
    render_pg_activity,
    render_tables,
    render_targets,
    series_from_json,
    summary_markdown,
)
from bench.services import DEFAULT_DATABASE, bench_services
from bench.stack import Stack, StackOptions
from bench.workloads import QUICK, Bench, Sizes
from runtime.processes import WORKER_CLASS

__all__ = ["ALL_WORKLOADS", "BenchOptions", "load_results", "run_bench"]

ALL_WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")
# Small and latency-bound first, while the machine is fresh; W6 reuses W1's runs; W7 last (it
# may first build its large store).
ORDER = ("W5", "W2", "W3", "W4", "W1", "W6", "W7")


@dataclass(frozen=True)
class BenchOptions:
    workloads: tuple[str, ...] = ALL_WORKLOADS
    quick: bool = False
    runs: int | None = None  # overrides the repetitions of every workload
    w1_repeat: int | None = None
    w7_store: int | None = None  # resources in W7's large store
    w7_database: str | None = None  # W7's kept store [default: bench.w7.store_database]
    w7_rebuild: bool = False
    synthea: bool = False
    synthea_dir: Path | None = None
    output: Path | None = None
    markdown: Path | None = None
    profile_dir: Path | None = None
    database: str = DEFAULT_DATABASE
    keep_database: bool = False
    stack: StackOptions = StackOptions()
    command: str = "fhirq bench"

    def sizes(self) -> Sizes:
        sizes = QUICK if self.quick else Sizes()
        if self.runs is not None:
            sizes = replace(sizes, runs=self.runs)
        if self.w1_repeat is not None:
            sizes = replace(sizes, w1_repeat=self.w1_repeat)
        if self.w7_store is not None:
            sizes = replace(sizes, w7_store=self.w7_store)
        return sizes


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _server_versions(database_url: str) -> dict[str, str]:
    import psycopg2

    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            pg = cur.fetchone()[0]
            cur.execute("SHOW shared_buffers")
            buffers = cur.fetchone()[0]
            cur.execute("SHOW synchronous_commit")
            sync = cur.fetchone()[0]
    finally:
        conn.close()
    return {"postgresql": pg, "shared_buffers": buffers, "synchronous_commit": sync}


def run_bench(opts: BenchOptions, console: Console | None = None) -> list[Series]:
    console = console or Console()
    sizes = opts.sizes()
    started = time.monotonic()
    results: list[Series] = []
    meta: dict[str, Any] = {
        "command": opts.command,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "sizes": asdict(sizes),
        "stack": {**asdict(opts.stack), "api_worker_class": WORKER_CLASS},
    }
    with contextlib.ExitStack() as exits:
        services = exits.enter_context(bench_services(opts.database, keep=opts.keep_database))
        meta["services"] = services.origin
        meta["servers"] = _server_versions(services.database_url)
        console.print(f"[bold]fhirq bench[/bold]: {services.origin}; database "
                      f"{services.database}; workloads {', '.join(opts.workloads)}")
        log_dir = Path(tempfile.mkdtemp(prefix="fhirq-bench-logs-"))
        stack = Stack(services, opts.stack, log_dir)
        exits.callback(stack.stop)
        stack.start_api()
        stack.start_worker()
        console.print(f"API {stack.base_url} ({opts.stack.api_workers} processes × "
                      f"{opts.stack.api_threads} threads, worker class {WORKER_CLASS}), "
                      f"worker ×{stack.concurrency}; logs in {log_dir}")
        client = JobClient(stack.origin, services.token)
        monitor = Monitor(stack.pids, services.database, database_url=services.database_url)
        exits.callback(monitor.close)
        bench = Bench(services, stack, client, monitor, sizes, console,
                      w7_database=opts.w7_database, w7_rebuild=opts.w7_rebuild)
        exits.callback(bench.loop.close)
        exits.callback(lambda: bench.loop.run_until_complete(client.close()))
        if opts.profile_dir is not None:
            bench.profiler = Profiler(opts.profile_dir)
        bench.warm_up()

        w1_series: list[Series] = []
        for name in ORDER:
            if name not in opts.workloads:
                continue
            t0 = time.monotonic()
            if name == "W1":
                w1_series = bench.w1()
                out = w1_series
            elif name == "W6":
                repeat = [s for s in w1_series if s.label == f"{sizes.w1_repeat:,} creates"]
                out = bench.w6(repeat[0] if repeat else None)
            else:
                out = getattr(bench, name.lower())()
            if name == "W3" and opts.synthea:
                out += bench.synthea(opts.synthea_dir)
            results += out
            render_tables(out, console)
            if opts.profile_dir is not None:
                render_pg_activity(out, console)
            console.print(f"[dim]{name} took {time.monotonic() - t0:.0f} s[/dim]\n")

    meta["seconds"] = round(time.monotonic() - started, 1)
    if bench.profiles:
        meta["profiles"] = {k: p.as_json() for k, p in bench.profiles.items()}
        for key, p in bench.profiles.items():
            console.print(f"[bold]profile {key}[/bold]\n{p.text(15)}")
    console.rule("summary")
    render_tables(results, console)
    render_targets(results, console)
    console.print(f"fhirq bench: {meta['seconds']:.0f} s in all")
    if opts.output is not None:
        opts.output.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "series": [s.as_json() for s in results]}
        opts.output.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
        console.print(f"results: {opts.output}")
    if opts.markdown is not None:
        _write_markdown(opts.markdown, results, meta)
    return results


def _write_markdown(path: Path, results: list[Series], meta: dict[str, Any]) -> None:
    text = summary_markdown(results)
    if str(path) == "-":
        print(text, end="")
    else:
        path.write_text(text)


def load_results(path: Path) -> tuple[dict[str, Any], list[Series]]:
    payload = orjson.loads(path.read_bytes())
    return payload["meta"], [series_from_json(s) for s in payload["series"]]

"""`fhirq bench`: the benchmarks of bench/ (workloads W1–W7, each beside its raw PostgreSQL COPY
baseline measured in the same run). Registered by cli.main through `register`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

__all__ = ["register"]

WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "W6", "W7")


def _workloads(value: str | None) -> tuple[str, ...]:
    if not value:
        return WORKLOADS
    names = tuple(dict.fromkeys(v.strip().upper() for v in value.split(",") if v.strip()))
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise click.BadParameter(f"unknown workload(s) {', '.join(unknown)}; "
                                 f"choose from {','.join(WORKLOADS)}", param_hint="--only")
    return names


@click.command()
@click.option("--only", "only", metavar="W1,W5", help="Run only these workloads.")
@click.option("--quick", is_flag=True,
              help="Everything at small sizes, one run each (under a minute): "
                   "checks the harness, not a measurement.")
@click.option("--runs", type=click.IntRange(1, 20), default=None,
              help="Runs per workload (median, min, max) [default: 3; --quick: 1].")
@click.option("--w1-repeat", type=click.IntRange(100), default=None,
              help="Size of W1's repeated runs and of W6 [default: 20000]; W1 also runs "
                   "once at 100,000.")
@click.option("--w7-store", type=click.IntRange(1), default=None,
              help="Resources in W7's large store [default: 10000000; --quick: 20000]. It "
                   "is kept (database fhirq_bench_w7_<size>) and reused while it matches "
                   "the schema.")
@click.option("--w7-database", default=None, metavar="NAME",
              help="Database of W7's kept store [default: fhirq_bench_w7_<size>].")
@click.option("--w7-rebuild", is_flag=True, help="Build W7's large store again even if a kept "
                                                   "one matches.")
@click.option("--synthea", is_flag=True,
              help="With W3, also load the 22 real Synthea bundles (FHIRQ_SYNTHEA_DIR).")
@click.option("--synthea-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the Synthea bundles are [default: FHIRQ_SYNTHEA_DIR or "
                   "../shared/data/synthea].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              default=Path(".fhirq/bench-results.json"), show_default=True,
              help="JSON results file (the README table is regenerated from it).")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the summary as a Markdown table ('-' for stdout).")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path),
              default=None, help="Run nothing: render the tables of an earlier results file.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Record py-spy profiles of the API and worker processes "
                                 "into this directory and print where the time went.")
@click.option("--database", default="fhirq_bench", show_default=True,
              help="Benchmark database, dropped and created on the server of "
                   "FHIRQ_BENCH_DATABASE_URL (default: the local server, else embedded).")
@click.option("--keep-database", is_flag=True, help="Leave the benchmark database in place.")
@click.option("--api-workers", type=int, default=2, show_default=True)
@click.option("--api-threads", type=int, default=4, show_default=True)
@click.option("--concurrency", type=int, default=2, show_default=True,
              help="Celery worker processes (W6 also runs with one).")
@click.option("--chunk-size", type=click.IntRange(1), default=None,
              help="FHIRQ_CHUNK_SIZE for the product [default: the product's].")
def bench(
    only: str | None,
    quick: bool,
    runs: int | None,
    w1_repeat: int | None,
    w7_store: int | None,
    w7_database: str | None,
    w7_rebuild: bool,
    synthea: bool,
    synthea_dir: Path | None,
    output: Path,
    markdown: Path | None,
    from_json: Path | None,
    profile_dir: Path | None,
    database: str,
    keep_database: bool,
    api_workers: int,
    api_threads: int,
    concurrency: int,
    chunk_size: int | None,
) -> None:
    """Measure throughput, latency and memory of workloads W1–W7 against real API and worker
    processes, each beside a COPY of the same rows into tables with the same indexes."""
    from rich.console import Console

    from bench.report import render_tables, render_targets, summary_markdown
    from bench.runner import BenchOptions, load_results, run_bench
    from bench.stack import StackOptions

    # Wide tables stay whole in a log file or a pipe (rich assumes 80 columns there).
    console = Console(width=None if sys.stdout.isatty() else 220)
    if from_json is not None:
        meta, series = load_results(from_json)
        console.print(f"{from_json}: `{meta.get('command')}` at {meta.get('started_at')}, "
                      f"{meta.get('seconds')} s")
        render_tables(series, console)
        render_targets(series, console)
        if markdown is not None:
            text = summary_markdown(series)
            if str(markdown) == "-":
                click.echo(text, nl=False)
            else:
                markdown.write_text(text)
        return
    opts = BenchOptions(
        workloads=_workloads(only),
        quick=quick,
        runs=runs,
        w1_repeat=w1_repeat,
        w7_store=w7_store,
        w7_database=w7_database,
        w7_rebuild=w7_rebuild,
        synthea=synthea,
        synthea_dir=synthea_dir,
        output=output,
        markdown=markdown,
        profile_dir=profile_dir,
        database=database,
        keep_database=keep_database,
        stack=StackOptions(api_workers=api_workers, api_threads=api_threads,
                           concurrency=concurrency, chunk_size=chunk_size),
        command="fhirq " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "fhirq bench",
    )
    run_bench(opts, console)


def register(group: click.Group) -> None:
    group.add_command(bench)

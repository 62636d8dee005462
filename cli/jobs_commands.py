"""`fhirq submit / wait / status / results / cancel / jobs`: the job API from the command line.

    fhirq submit big.json more.ndjson --wait     # one job per file, live progress bars
    fhirq wait 5ae19a4b                           # follow a job (again)
    fhirq status                                  # your latest job's JSON status
    fhirq results 5ae19a4b --failed               # per-entry results as NDJSON
    fhirq results JOB --bundle > response.json    # the final response document
    fhirq cancel JOB
    fhirq jobs --state running                    # your jobs (--wide, --json)

A job id may be given by any prefix of at least 6 characters that names one of your jobs;
without one, `status`, `results` and `wait` take your latest job. The server is `--server`
(env FHIRQ_SERVER), else the running `fhirq up` of FHIRQ_DATA_DIR, else
http://127.0.0.1:8080; `--token` (env FHIRQ_TOKEN) is sent as a Bearer token. Exit statuses:
see cli.api_client.
"""

from __future__ import annotations

import io
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.api_client import EXIT_INTERRUPTED, EXIT_JOB_FAILED, Api, CliError, server_options

__all__ = ["register", "submit", "wait", "status", "results", "cancel", "jobs", "prune",
           "compact"]

NDJSON_SUFFIXES = (".ndjson", ".jsonl")
TERMINAL = ("completed", "failed", "cancelled")
STATES = ("accepted", "running", "completed", "failed", "cancelled")
SHORT_ID = 8

console = Console(stderr=True)


def register(group: click.Group) -> None:
    for command in (submit, wait, status, results, cancel, jobs):
        group.add_command(command)


def compact(n: int) -> str:
    """950, 12.3k, 50k, 1.2M: numbers that fit a narrow column."""
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if abs(n) >= size:
            value = n / size
            text = f"{value:.1f}" if value < 100 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(n)


def _kind_of(path: Path) -> tuple[str, str]:
    """(HTTP method, content type) for a file: NDJSON by suffix, else by its first byte."""
    if path.suffix.lower() in NDJSON_SUFFIXES:
        return "PUT", "application/fhir+ndjson"
    with path.open("rb") as f:
        while chunk := f.read(4096):
            first = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
            if first == b"[":
                return "PUT", "application/json"
            if first:
                return "POST", "application/fhir+json"
    raise CliError(f"{path} is empty: nothing to submit", 2)


def _latest(api: Api) -> str:
    found = api.get("/jobs", params={"_count": 1})["jobs"]
    if not found:
        raise CliError("you have no jobs yet: submit one with `fhirq submit FILE`")
    return str(found[0]["id"])


def _job_id(api: Api, given: str | None) -> str:
    """The full id of a job named by its id, a prefix of it, or nothing (the latest)."""
    if given is None:
        return _latest(api)
    return str(api.get(f"/jobs/{given}")["id"])


@click.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", "wait_", is_flag=True, help="Show progress until every job has ended.")
@click.option("--cancel-on-interrupt", is_flag=True,
              help="With --wait: Ctrl-C cancels the jobs instead of leaving them running.")
@click.option("--prefer", type=click.Choice(["representation", "minimal", "OperationOutcome"]),
              default=None, help="Prefer: return= for the response bundle.")
@click.option("--idempotency-key", default=None,
              help="Idempotency-Key (one file only): resubmitting returns the same job.")
@click.option("--callback-url", default=None, help="Called when each job ends.")
@server_options
def submit(files: tuple[Path, ...], wait_: bool, cancel_on_interrupt: bool, prefer: str | None,
           idempotency_key: str | None, callback_url: str | None, server: str | None,
           token: str | None) -> None:
    """Submit FILE(s) as async jobs: a batch/transaction Bundle, a JSON array of resources
    (batch upsert) or NDJSON (upsert, one resource a line). Prints one job id per line."""
    if idempotency_key and len(files) > 1:
        raise click.UsageError("--idempotency-key takes one file")
    job_ids: list[str] = []
    with Api(server, token) as api:
        for path in files:
            method, content_type = _kind_of(path)
            headers = {
                "Content-Type": content_type,
                "Prefer": "respond-async" + (f", return={prefer}" if prefer else ""),
                "Content-Length": str(path.stat().st_size),
            }
            if idempotency_key:
                headers["Idempotency-Key"] = idempotency_key
            if callback_url:
                headers["X-Callback-Url"] = callback_url
            started = time.monotonic()
            with path.open("rb") as body:
                response = api.request(method, "/fhir", ok=(202,), content=body,
                                       headers=headers, timeout=600)
            job_id = response.headers["X-Job-Id"]
            job_ids.append(job_id)
            console.print(f"{path}: job {job_id} accepted in "
                          f"{time.monotonic() - started:.2f}s")
            click.echo(job_id)
        if wait_:
            _follow(api, job_ids, cancel_on_interrupt)


@click.command()
@click.argument("job_ids", nargs=-1)
@click.option("--cancel-on-interrupt", is_flag=True,
              help="Ctrl-C cancels the jobs instead of leaving them running.")
@server_options
def wait(job_ids: tuple[str, ...], cancel_on_interrupt: bool, server: str | None,
         token: str | None) -> None:
    """Show progress of JOB(s) (default: your latest) until they end; exit 1 if one did not
    complete."""
    with Api(server, token) as api:
        try:
            ids = [_job_id(api, j) for j in job_ids] or [_latest(api)]
        except KeyboardInterrupt:
            console.print("\nInterrupted: nothing was changed on the server")
            sys.exit(EXIT_INTERRUPTED)
        _follow(api, ids, cancel_on_interrupt)


def _follow(api: Api, job_ids: list[str], cancel_on_interrupt: bool) -> None:
    try:
        ok = _wait(api, job_ids)
    except KeyboardInterrupt:
        console.print()
        _interrupted(api, job_ids, cancel_on_interrupt)
        sys.exit(EXIT_INTERRUPTED)
    if not ok:
        sys.exit(EXIT_JOB_FAILED)


def _interrupted(api: Api, job_ids: list[str], cancel_on_interrupt: bool) -> None:
    if cancel_on_interrupt:
        for job_id in job_ids:
            api.request("DELETE", f"/fhir/_async/{job_id}", ok=(202, 404))
            console.print(f"job {job_id} cancelled: entries not yet run will not run")
        return
    ids = " ".join(job_ids)
    console.print(
        f"Interrupted: the server keeps running {'these jobs' if len(job_ids) > 1 else 'the job'}"
        f" ({ids}).\n  follow:  fhirq wait {ids}\n  status:  fhirq status {job_ids[0]}\n"
        f"  cancel:  fhirq cancel {ids}"
    )


def _bar_fields(job: dict[str, Any]) -> dict[str, Any]:
    counts = job["counts"]
    return {
        "total": counts["total"],
        "completed": counts["done"],
        "counts": f"{counts['done']:>9,}/{counts['total']:,}",
        "failed": counts["failed"],
        "state": job["state"],
        "rate": f"{job['rate']:,.0f}" if job.get("rate") else "-",
    }


def _wait(api: Api, job_ids: list[str]) -> bool:
    """Progress bars (done, failed, entries/s) until every job ends; True if all completed."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[counts]}"),
        TextColumn("[red]{task.fields[failed]:,} failed"),
        TextColumn("{task.fields[rate]} entries/s"),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    final: dict[str, dict[str, Any]] = {}
    # The first frame already shows each job's total and state.
    first = {j: api.get(f"/jobs/{j}") for j in job_ids}
    console.print(f"following {len(job_ids)} job{'s' if len(job_ids) > 1 else ''}; Ctrl-C "
                  "stops following, the server keeps running "
                  f"{'them' if len(job_ids) > 1 else 'it'}", style="dim")
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {}
        for job_id, job in first.items():
            fields = _bar_fields(job)
            bars[job_id] = progress.add_task(job_id[:SHORT_ID], **fields)
        latest = first
        while True:
            for job_id, job in latest.items():
                progress.update(bars[job_id], **_bar_fields(job))
                if job["state"] in TERMINAL:
                    final[job_id] = job
            if len(final) == len(job_ids):
                break
            time.sleep(0.5)
            latest = {j: api.get(f"/jobs/{j}") for j in job_ids if j not in final}
    ok = True
    for job_id in job_ids:
        job = final[job_id]
        counts = job["counts"]
        line = (f"job {job_id}: {job['state']}, {counts['succeeded']:,} succeeded, "
                f"{counts['failed']:,} failed")
        if job.get("rate"):
            line += f", {job['rate']:,.0f} entries/s"
        if job.get("outcome"):
            issue = (job["outcome"].get("issue") or [{}])[0]
            line += f" — {issue.get('diagnostics')} at {issue.get('expression')}"
        if counts["failed"]:
            line += f"\n  failed entries: fhirq results {job_id[:SHORT_ID]} --failed"
        console.print(line)
        ok = ok and job["state"] == "completed"
    return ok


@click.command()
@click.argument("job_id", required=False)
@server_options
def status(job_id: str | None, server: str | None, token: str | None) -> None:
    """Print a job's JSON status (state, counts, rate, timestamps, links); JOB_ID may be a
    unique prefix, and defaults to your latest job."""
    with Api(server, token) as api:
        job = api.get(f"/jobs/{_job_id(api, job_id)}")
    click.echo(orjson.dumps(job, option=orjson.OPT_INDENT_2))


@click.command()
@click.argument("job_id", required=False)
@click.option("--failed", is_flag=True, help="Only the entries that failed.")
@click.option("--bundle", is_flag=True,
              help="Write the final response document (Bundle or upsert array) instead.")
@click.option("--page-size", type=click.IntRange(1, 1000), default=1000, show_default=True)
@server_options
def results(job_id: str | None, failed: bool, bundle: bool, page_size: int, server: str | None,
            token: str | None) -> None:
    """Print per-entry results as NDJSON (index, status, location, etag, outcome); JOB_ID may
    be a unique prefix, and defaults to your latest job."""
    out = sys.stdout.buffer
    with Api(server, token) as api:
        job_id = _job_id(api, job_id)
        if bundle:
            _write_bundle(api, job_id, out)
            return
        params: dict[str, Any] | None = {"_count": page_size}
        if failed:
            params = {**params, "outcome": "failed"}
        url: str | None = f"/jobs/{job_id}/entries"
        while url:
            page = api.get(url, params=params)
            for entry in page["entries"]:
                out.write(orjson.dumps(entry) + b"\n")
            url, params = page.get("next"), None  # `next` carries its own query


def _write_bundle(api: Api, job_id: str, out: Any) -> None:
    try:
        with api.http.stream("GET", f"/fhir/_async/{job_id}") as response:
            if response.status_code == 202:
                raise CliError(f"job {job_id} is still running "
                               f"({response.headers.get('X-Progress')}): "
                               f"`fhirq wait {job_id[:SHORT_ID]}` follows it")
            if response.status_code != 200:
                response.read()
                api.fail(response)
            for chunk in response.iter_bytes():
                out.write(chunk)
    except CliError:
        raise
    except Exception as exc:  # httpx.TransportError, mid-stream included
        import httpx

        if isinstance(exc, httpx.TransportError):
            raise api.unreachable(exc) from None
        raise
    out.write(b"\n")


@click.command()
@click.argument("job_id")
@server_options
def cancel(job_id: str, server: str | None, token: str | None) -> None:
    """Cancel a job: its entries not yet run will not run; finished ones stay."""
    with Api(server, token) as api:
        full = _job_id(api, job_id)
        api.request("DELETE", f"/fhir/_async/{full}", ok=(202,))
    console.print(f"job {full} cancelled")


def _when(instant: str | None) -> str:
    """`2026-12-01T20:31:07.123+00:00` → `12-01 20:31` in local time."""
    if not instant:
        return "-"
    return datetime.fromisoformat(instant).astimezone().strftime("%m-%d %H:%M")


def _short_ids(ids: list[str]) -> dict[str, str]:
    """The shortest prefixes (at least SHORT_ID long) that tell these ids apart."""
    out: dict[str, str] = {}
    for job_id in ids:
        n = SHORT_ID
        while any(o != job_id and o.startswith(job_id[:n]) for o in ids) and n < len(job_id):
            n += 1
        out[job_id] = job_id[:n]
    return out


@click.group("jobs", invoke_without_command=True)
@click.option("--state", type=click.Choice(STATES), default=None)
@click.option("--count", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--wide", is_flag=True, help="Every column, full ids and exact numbers.")
@click.option("--json", "as_json", is_flag=True, help="The jobs as JSON, for scripts.")
@server_options
@click.pass_context
def jobs(ctx: click.Context, state: str | None, count: int, wide: bool, as_json: bool,
         server: str | None, token: str | None) -> None:
    """List your jobs, newest first. Ids are shown by a unique prefix that every command
    accepts. `fhirq jobs prune` applies the retention settings now."""
    if ctx.invoked_subcommand is not None:
        return
    params: dict[str, Any] = {"_count": count}
    if state:
        params["state"] = state
    with Api(server, token) as api:
        found = api.get("/jobs", params=params)["jobs"]
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2))
        return
    if not found:
        console.print("no jobs" + (f" in state {state}" if state else ""))
        return
    click.echo(_jobs_table(found, wide).rstrip("\n"))


@jobs.command("prune")
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.option("--days", type=click.FloatRange(min=0), default=None,
              help="Keep entries of jobs finished this many days ago [default: "
              "FHIRQ_JOB_RETENTION_DAYS, 7].")
def prune(dry_run: bool, days: float | None) -> None:
    """Delete the entries of jobs finished longer ago than the retention (and the summaries
    past FHIRQ_JOB_SUMMARY_RETENTION_DAYS), straight in the database: FHIRQ_DATABASE_URL, else
    the running `fhirq up`'s."""
    from runtime import running

    running.embedded_environment()
    url = running.database_url()
    if url is None:
        raise CliError("FHIRQ_DATABASE_URL is not set and no `fhirq up` is running under "
                       f"{running.data_dir()}")
    from core.config import get_settings
    from core.jobs.retention import prune as run_prune
    from core.jobs.retention import prune_preview
    from core.store.db import get_engine

    cfg = get_settings()
    entry_days = cfg.job_retention_days if days is None else days
    summary_days = max(cfg.job_summary_retention_days, entry_days)
    engine = get_engine(url)
    if dry_run:
        with engine.connect() as conn:
            found = prune_preview(conn, entry_days=entry_days, summary_days=summary_days)
        click.echo(orjson.dumps({"dryRun": True, **found}, option=orjson.OPT_INDENT_2))
        return
    started = time.monotonic()
    done = run_prune(engine, entry_days=entry_days, summary_days=summary_days)
    click.echo(orjson.dumps({"entriesDeleted": done.entries, "jobsEmptied": done.jobs_emptied,
                             "summariesDeleted": done.jobs_deleted,
                             "seconds": round(time.monotonic() - started, 2)},
                            option=orjson.OPT_INDENT_2))


def _jobs_table(found: list[dict[str, Any]], wide: bool) -> str:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    if wide:
        for name in ("id", "kind", "state", "done", "succeeded", "failed", "total",
                     "entries/s", "created", "finished"):
            table.add_column(name, no_wrap=True,
                             justify="right" if name in ("done", "succeeded", "failed",
                                                         "total", "entries/s") else "left")
        for job in found:
            c = job["counts"]
            table.add_row(job["id"], job["kind"], job["state"], f"{c['done']:,}",
                          f"{c['succeeded']:,}", f"{c['failed']:,}", f"{c['total']:,}",
                          f"{job['rate']:,.0f}" if job.get("rate") else "-",
                          _when(job["createdAt"]), _when(job.get("finishedAt")))
    else:
        short = _short_ids([j["id"] for j in found])
        table.add_column("id", no_wrap=True)
        table.add_column("kind", no_wrap=True)
        table.add_column("state", no_wrap=True)
        table.add_column("done/total", no_wrap=True, justify="right")
        table.add_column("failed", no_wrap=True, justify="right")
        table.add_column("created", no_wrap=True)
        for job in found:
            c = job["counts"]
            table.add_row(short[job["id"]], job["kind"], job["state"],
                          f"{compact(c['done'])}/{compact(c['total'])}", compact(c["failed"]),
                          _when(job["createdAt"]))
    # The narrow table fits 80 columns by construction; --wide takes what it needs when the
    # output is not a terminal (a pipe, a file), else the terminal's width.
    out = Console(record=True, width=None if wide and sys.stdout.isatty() else (
        200 if wide else None), force_terminal=False, file=io.StringIO())
    out.print(table)
    return out.export_text()

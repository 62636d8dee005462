"""`fhirq submit / status / results / jobs`: the job API from the command line, over HTTP.

    fhirq submit big.json more.ndjson --wait     # one job per file, live progress bars
    fhirq status JOB                              # the job's JSON status
    fhirq results JOB --failed                    # per-entry results as NDJSON
    fhirq results JOB --bundle > response.json    # the final response document
    fhirq jobs --state running                    # your jobs

The server is `--server` (env FHIRQ_SERVER, default http://127.0.0.1:8080); `--token` (env
FHIRQ_TOKEN) is sent as a Bearer token.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

__all__ = ["register", "submit", "status", "results", "jobs"]

DEFAULT_SERVER = "http://127.0.0.1:8080"
NDJSON_SUFFIXES = (".ndjson", ".jsonl")
TERMINAL = ("completed", "failed", "cancelled")

console = Console(stderr=True)


def register(group: click.Group) -> None:
    for command in (submit, status, results, jobs):
        group.add_command(command)


def _server_options(f: Any) -> Any:
    f = click.option("--token", envvar="FHIRQ_TOKEN", default=None,
                     help="Bearer token (env FHIRQ_TOKEN).")(f)
    f = click.option("--server", envvar="FHIRQ_SERVER", default=DEFAULT_SERVER,
                     show_default=True, help="fhirq API root (env FHIRQ_SERVER).")(f)
    return f


def _client(server: str, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=60)


def _fail(response: httpx.Response) -> None:
    """Exit with the server's OperationOutcome diagnostics."""
    try:
        body = response.json()
        issues = body.get("issue") or []
        text = "; ".join(i.get("diagnostics", "") for i in issues) or response.text
    except ValueError:
        text = response.text
    raise click.ClickException(f"{response.status_code}: {text}")


def _kind_of(path: Path) -> tuple[str, str]:
    """(HTTP method, content type) for a file: NDJSON by suffix, else by its first byte."""
    if path.suffix.lower() in NDJSON_SUFFIXES:
        return "PUT", "application/fhir+ndjson"
    with path.open("rb") as f:
        while chunk := f.read(4096):
            first = chunk.lstrip()[:1]
            if first == b"[":
                return "PUT", "application/json"
            if first:
                return "POST", "application/fhir+json"
    raise click.ClickException(f"{path} is empty")


@click.command()
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Show progress until every job has ended.")
@click.option("--prefer", type=click.Choice(["representation", "minimal", "OperationOutcome"]),
              default=None, help="Prefer: return= for the response bundle.")
@click.option("--idempotency-key", default=None,
              help="Idempotency-Key (one file only): resubmitting returns the same job.")
@click.option("--callback-url", default=None, help="Called once when each job ends.")
@_server_options
def submit(files: tuple[Path, ...], wait: bool, prefer: str | None,
           idempotency_key: str | None, callback_url: str | None, server: str,
           token: str | None) -> None:
    """Submit FILE(s) as async jobs: a batch/transaction Bundle, a JSON array of resources
    (batch upsert) or NDJSON (upsert, one resource a line). Prints one job id per line."""
    if idempotency_key and len(files) > 1:
        raise click.UsageError("--idempotency-key takes one file")
    job_ids: list[str] = []
    with _client(server, token) as client:
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
                response = client.request(method, "/fhir", content=body, headers=headers,
                                          timeout=600)
            if response.status_code != 202:
                _fail(response)
            job_id = response.headers["X-Job-Id"]
            job_ids.append(job_id)
            console.print(f"{path}: job {job_id} accepted in "
                          f"{time.monotonic() - started:.2f}s")
            click.echo(job_id)
        if wait and not _wait(client, job_ids):
            sys.exit(1)


def _wait(client: httpx.Client, job_ids: list[str]) -> bool:
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
    with Progress(*columns, console=console) as progress:
        bars: dict[str, TaskID] = {
            j: progress.add_task(j[:8], total=None, counts="", failed=0, rate="-",
                                 state="accepted")
            for j in job_ids
        }
        while len(final) < len(job_ids):
            for job_id, bar in bars.items():
                if job_id in final:
                    continue
                response = client.get(f"/jobs/{job_id}")
                if response.status_code != 200:
                    _fail(response)
                job = response.json()
                counts = job["counts"]
                progress.update(bar, total=counts["total"], completed=counts["done"],
                                counts=f"{counts['done']:>9,}/{counts['total']:,}",
                                failed=counts["failed"], state=job["state"],
                                rate=f"{job['rate']:,.0f}" if job.get("rate") else "-")
                if job["state"] in TERMINAL:
                    final[job_id] = job
            if len(final) < len(job_ids):
                time.sleep(0.5)
    ok = True
    for job_id, job in final.items():
        counts = job["counts"]
        line = (f"job {job_id}: {job['state']}, {counts['succeeded']:,} succeeded, "
                f"{counts['failed']:,} failed")
        if job.get("rate"):
            line += f", {job['rate']:,.0f} entries/s"
        if job.get("outcome"):
            issue = (job["outcome"].get("issue") or [{}])[0]
            line += f" — {issue.get('diagnostics')} at {issue.get('expression')}"
        console.print(line)
        ok = ok and job["state"] == "completed"
    return ok


@click.command()
@click.argument("job_id")
@_server_options
def status(job_id: str, server: str, token: str | None) -> None:
    """Print a job's JSON status (state, counts, rate, timestamps, links)."""
    with _client(server, token) as client:
        response = client.get(f"/jobs/{job_id}")
    if response.status_code != 200:
        _fail(response)
    click.echo(orjson.dumps(response.json(), option=orjson.OPT_INDENT_2))


@click.command()
@click.argument("job_id")
@click.option("--failed", is_flag=True, help="Only the entries that failed.")
@click.option("--bundle", is_flag=True,
              help="Write the final response document (Bundle or upsert array) instead.")
@click.option("--page-size", type=int, default=1000, show_default=True)
@_server_options
def results(job_id: str, failed: bool, bundle: bool, page_size: int, server: str,
            token: str | None) -> None:
    """Print per-entry results as NDJSON (index, status, location, etag, outcome)."""
    out = sys.stdout.buffer
    with _client(server, token) as client:
        if bundle:
            with client.stream("GET", f"/fhir/_async/{job_id}") as response:
                if response.status_code == 202:
                    raise click.ClickException(
                        f"job {job_id} is still running: {response.headers.get('X-Progress')}")
                if response.status_code != 200:
                    response.read()
                    _fail(response)
                for chunk in response.iter_bytes():
                    out.write(chunk)
            out.write(b"\n")
            return
        params: dict[str, Any] | None = {"_count": page_size}
        if failed:
            params = {**params, "outcome": "failed"}
        url: str | None = f"/jobs/{job_id}/entries"
        while url:
            response = client.get(url, params=params)
            if response.status_code != 200:
                _fail(response)
            page = response.json()
            for entry in page["entries"]:
                out.write(orjson.dumps(entry) + b"\n")
            url, params = page.get("next"), None  # `next` carries its own query


@click.command("jobs")
@click.option("--state", type=click.Choice(["accepted", "running", "completed", "failed",
                                            "cancelled"]), default=None)
@click.option("--count", type=int, default=50, show_default=True)
@_server_options
def jobs(state: str | None, count: int, server: str, token: str | None) -> None:
    """List your jobs, newest first."""
    params: dict[str, Any] = {"_count": count}
    if state:
        params["state"] = state
    with _client(server, token) as client:
        response = client.get("/jobs", params=params)
    if response.status_code != 200:
        _fail(response)
    table = Table("kind", "state", "done", "failed", "total", "entries/s", "created")
    table.columns.insert(0, Column("id", no_wrap=True, min_width=36))
    for job in response.json()["jobs"]:
        c = job["counts"]
        table.add_row(job["id"], job["kind"], job["state"], f"{c['done']:,}", f"{c['failed']:,}",
                      f"{c['total']:,}", f"{job['rate']:,.0f}" if job.get("rate") else "-",
                      job["createdAt"])
    Console().print(table)

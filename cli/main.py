"""The `fhirq` command: `up` (everything, embedded default), `api`, `worker`, `beat`,
`db upgrade`, `db reindex`. Other modules add subcommands by exposing
`register(group: click.Group)` and being listed in EXTENSIONS."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from runtime.processes import api_argv, beat_argv, worker_argv

__all__ = ["EXTENSIONS", "cli", "main"]

# Modules that add subcommands (jobs: submit/status/results/jobs; token: API keys; bench).
# Each exposes `register(group: click.Group) -> None`; one not written yet is skipped.
EXTENSIONS = ("cli.jobs_commands", "cli.token_commands", "cli.bench_commands", "cli.slots_commands")

_PASSTHROUGH = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fhirq", prog_name="fhirq")
def cli() -> None:
    """fhirq: asynchronous FHIR R4 batch & transaction processor."""


def _exec(argv: list[str]) -> None:
    """Become the server process, so signals from a supervisor (docker, systemd, `fhirq up`)
    reach gunicorn / celery directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


def _require_database_url() -> None:
    if not os.environ.get("FHIRQ_DATABASE_URL"):
        raise click.ClickException(
            "FHIRQ_DATABASE_URL is not set (`fhirq up` sets it for its embedded PostgreSQL)"
        )


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="FHIRQ_DATA_DIR",
    default=".fhirq",
    show_default=True,
    help="Where the embedded PostgreSQL and Redis keep their data (env FHIRQ_DATA_DIR).",
)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Loopback runs without auth; any other address needs "
              "FHIRQ_AUTH=required.")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--api-workers", type=int, default=2, show_default=True, help="API processes.")
@click.option("--api-threads", type=int, default=4, show_default=True, help="Threads each.")
@click.option("--concurrency", type=int, default=2, show_default=True, help="Worker processes.")
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level.")
def up(
    data_dir: Path,
    host: str,
    port: int,
    api_workers: int,
    api_threads: int,
    concurrency: int,
    loglevel: str,
) -> None:
    """Run everything: database, broker, API and worker, in the foreground.

    Without FHIRQ_DATABASE_URL / FHIRQ_REDIS_URL (or FHIRQ_BROKER_URL) it starts an embedded
    PostgreSQL and Redis under --data-dir and reuses them on the next run. Ctrl-C stops all of
    it."""
    from cli.up import UpOptions, serve

    options = UpOptions(
        data_dir=data_dir,
        host=host,
        port=port,
        api_workers=api_workers,
        api_threads=api_threads,
        concurrency=concurrency,
        loglevel=loglevel,
    )
    sys.exit(serve(options))


@cli.command(context_settings=_PASSTHROUGH)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Processes.")
@click.option("--threads", type=int, default=4, show_default=True, help="Threads each.")
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def api(host: str, port: int, workers: int, threads: int, gunicorn_args: tuple[str, ...]) -> None:
    """Serve the HTTP API with gunicorn. Extra arguments go to gunicorn."""
    _require_database_url()
    _exec(api_argv(host, port, workers, threads, gunicorn_args))


@cli.command(context_settings=_PASSTHROUGH)
@click.option("--concurrency", type=int, default=2, show_default=True, help="Processes.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(concurrency: int, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker. Extra arguments go to `celery worker`."""
    _require_database_url()
    _exec(worker_argv(concurrency, loglevel, celery_args))


@cli.command(context_settings=_PASSTHROUGH)
@click.option(
    "--schedule-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Celery beat's state file [default: FHIRQ_DATA_DIR/celerybeat-schedule].",
)
@click.option("--loglevel", default="INFO", show_default=True)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(schedule_file: str | None, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run Celery beat, the scheduler of recurring jobs (run exactly one)."""
    if schedule_file is None:
        data_dir = Path(os.environ.get("FHIRQ_DATA_DIR", ".fhirq"))
        data_dir.mkdir(parents=True, exist_ok=True)
        schedule_file = str(data_dir / "celerybeat-schedule")
    _exec(beat_argv(schedule_file, loglevel, celery_args))


@cli.group()
def db() -> None:
    """Database administration."""


@db.command()
@click.option("--revision", default="head", show_default=True)
def upgrade(revision: str) -> None:
    """Migrate the schema of FHIRQ_DATABASE_URL to `revision`."""
    _require_database_url()
    from core.store.migrate import upgrade as run_upgrade

    run_upgrade(os.environ["FHIRQ_DATABASE_URL"], revision)
    click.echo(f"database at {revision}")


@db.command()
@click.option("--batch", default=500, show_default=True, help="resources per statement")
def reindex(batch: int) -> None:
    """Recompute the search index of every stored resource (after an upgrade that changed
    it; safe to interrupt and rerun, and while the server runs)."""
    _require_database_url()
    from core.store.db import get_engine
    from core.store.reindex import reindex as run_reindex

    def progress(done: int, last: tuple[str, str]) -> None:
        click.echo(f"{done} re-indexed, up to {last[0]}/{last[1]}")

    total = run_reindex(get_engine(os.environ["FHIRQ_DATABASE_URL"]), batch=batch,
                        progress=progress)
    click.echo(f"done: {total} resources re-indexed")


def _register_extensions(group: click.Group) -> None:
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module exists but something it imports is missing
                raise
            continue
        module.register(group)


_register_extensions(cli)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="fhirq")


if __name__ == "__main__":
    main()

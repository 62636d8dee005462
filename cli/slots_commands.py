"""`fhirq slots generate`: the weekly Slot generation (core.jobs.slots) on demand.

    fhirq slots generate              # submit this week's missing Slots as a job
    fhirq slots generate --weeks 4 --dry-run   # what four weeks would write, without writing

Runs against FHIRQ_DATABASE_URL directly (like `fhirq db upgrade`); the job it submits is run by
the workers of FHIRQ_REDIS_URL. Unset, both are those of the `fhirq up` running under
FHIRQ_DATA_DIR (default `.fhirq`). Prints the run's summary as JSON.
"""

from __future__ import annotations

import os
from dataclasses import replace

import click
import orjson

__all__ = ["register", "slots"]


def register(group: click.Group) -> None:
    group.add_command(slots)


@click.group()
def slots() -> None:
    """Recurring Slot generation from Schedules and PractitionerRole availability."""


@slots.command()
@click.option("--weeks", type=click.IntRange(min=1), default=None,
              help="Weeks from the start of this week (default FHIRQ_SLOT_WEEKS, else 1).")
@click.option("--dry-run", is_flag=True, help="Count what would be written; write nothing.")
def generate(weeks: int | None, dry_run: bool) -> None:
    """Create the free Slots that availability gives and the store lacks (idempotent)."""
    from runtime import running

    running.embedded_environment()
    if not os.environ.get("FHIRQ_DATABASE_URL"):
        raise click.ClickException(
            "FHIRQ_DATABASE_URL is not set and no `fhirq up` is running under "
            f"{running.data_dir()} (start it, or set FHIRQ_DATA_DIR to its data directory)"
        )
    from core.config import get_settings
    from core.jobs.slots import SlotSettings, plan_slot_entries, submit_slot_job
    from core.store.db import get_engine

    settings = SlotSettings()
    if weeks is not None:
        settings = replace(settings, weeks=weeks)
    cfg = get_settings()
    if dry_run:
        with get_engine().connect() as conn:
            run = plan_slot_entries(conn, settings=settings)
    else:
        with get_engine().begin() as conn:
            run = submit_slot_job(conn, settings=settings, base_url=cfg.base_url or "",
                                  chunk_size=cfg.chunk_size,
                                  inflight_chunks=cfg.inflight_chunks)
        if run.accepted is not None:
            from worker.tasks import enqueue_safely

            if not enqueue_safely(run.accepted.dispatches):
                click.echo("the job is stored; the reaper will send it once the broker is up",
                           err=True)
    click.echo(orjson.dumps(run.summary(), option=orjson.OPT_INDENT_2).decode())

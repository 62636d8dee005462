"""Recurring Slot generation (core.jobs.slots): the slot arithmetic in tables, then runs against
the real store through the engine, and once end to end through the beat task's job and a worker.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from sqlalchemy import Connection, Engine, text

from core.fhir.engine import execute_batch
from core.fhir.model import Context
from core.jobs.slots import (
    OWNER,
    SLOT_MINUTES_URL,
    SlotSettings,
    generate_slots,
    plan_slot_entries,
    slot_id,
    submit_slot_job,
    week_start,
)
from tests.jobs_helpers import *  # noqa: F403 - fixtures by name
from tests.jobs_helpers import WorkerProcess, scalar, wait_for
from tests.store_sql import CURRENT

UTC_ZONE = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
# Monday 2024-03-04; the week of 2024-03-10 (US spring forward) and of 2024-11-03 (fall back).
MONDAY = datetime(2024, 3, 4, tzinfo=UTC_ZONE)
WEEKDAYS = {"daysOfWeek": ["mon", "tue", "wed", "thu", "fri"]}


def _role(*available: dict[str, Any], not_available: list[dict[str, Any]] | None = None,
          rid: str = "r1", practitioner: str | None = None) -> dict[str, Any]:
    role: dict[str, Any] = {"resourceType": "PractitionerRole", "id": rid,
                            "availableTime": list(available)}
    if not_available:
        role["notAvailable"] = not_available
    if practitioner:
        role["practitioner"] = {"reference": f"Practitioner/{practitioner}"}
    return role


def _hours(start: str, end: str, **extra: Any) -> dict[str, Any]:
    return {"availableStartTime": start, "availableEndTime": end, **extra}


def _iso(w: Any) -> tuple[str, str]:
    return (w.start.astimezone(UTC).strftime("%a %H:%M"), w.end.astimezone(UTC).strftime("%H:%M"))


# (name, roles, week start, minutes, expected count, first, last) — first/last as (UTC day+time,
# end time) of the sorted slots.
ARITHMETIC = [
    ("weekdays 9-17, 30 min", [_role(_hours("09:00:00", "17:00:00", **WEEKDAYS))],
     MONDAY, 30, 5 * 16, ("Mon 09:00", "09:30"), ("Fri 16:30", "17:00")),
    ("no daysOfWeek means every day", [_role(_hours("09:00:00", "10:00:00"))],
     MONDAY, 30, 7 * 2, ("Mon 09:00", "09:30"), ("Sun 09:30", "10:00")),
    ("allDay on one day", [_role({"daysOfWeek": ["wed"], "allDay": True})],
     MONDAY, 60, 24, ("Wed 00:00", "01:00"), ("Wed 23:00", "00:00")),
    ("a partial last slot is not made", [_role(_hours("09:00:00", "10:45:00", daysOfWeek=["tue"]))],
     MONDAY, 30, 3, ("Tue 09:00", "09:30"), ("Tue 10:00", "10:30")),
    ("night shift runs past midnight", [_role(_hours("22:00:00", "02:00:00", daysOfWeek=["fri"]))],
     MONDAY, 60, 4, ("Fri 22:00", "23:00"), ("Sat 01:00", "02:00")),
    ("Sunday night shift runs out of the week",
     [_role(_hours("23:00:00", "01:00:00", daysOfWeek=["sun"]))],
     MONDAY, 60, 2, ("Mon 00:00", "01:00"), ("Sun 23:00", "00:00")),
    ("two roles overlapping give one slot per start",
     [_role(_hours("09:00:00", "11:00:00", daysOfWeek=["mon"])),
      _role(_hours("10:00:00", "12:00:00", daysOfWeek=["mon"]), rid="r2")],
     MONDAY, 30, 6, ("Mon 09:00", "09:30"), ("Mon 11:30", "12:00")),
    ("notAvailable instants remove overlapping slots",
     [_role(_hours("09:00:00", "12:00:00", daysOfWeek=["mon"]), not_available=[
         {"description": "meeting", "during": {"start": "2024-03-04T10:15:00Z",
                                                "end": "2024-03-04T11:00:00Z"}}])],
     MONDAY, 30, 4, ("Mon 09:00", "09:30"), ("Mon 11:30", "12:00")),
    ("notAvailable dates cover whole days, end included",
     [_role(_hours("09:00:00", "10:00:00", **WEEKDAYS), not_available=[
         {"description": "leave", "during": {"start": "2024-03-05", "end": "2024-03-07"}}])],
     MONDAY, 60, 2, ("Mon 09:00", "10:00"), ("Fri 09:00", "10:00")),
    ("notAvailable without end blocks the rest",
     [_role(_hours("09:00:00", "10:00:00", **WEEKDAYS), not_available=[
         {"description": "retired", "during": {"start": "2024-03-06T00:00:00Z"}}])],
     MONDAY, 60, 2, ("Mon 09:00", "10:00"), ("Tue 09:00", "10:00")),
    # New York, week of Mon 2024-03-04: EST (UTC-5).
    ("wall-clock hours in a zone", [_role(_hours("09:00:00", "17:00:00", daysOfWeek=["mon"]))],
     datetime(2024, 3, 4, tzinfo=NEW_YORK), 60, 8, ("Mon 14:00", "15:00"), ("Mon 21:00", "22:00")),
]


@pytest.mark.parametrize(
    "roles, start, minutes, count, first, last",
    [pytest.param(*case[1:], id=case[0]) for case in ARITHMETIC],
)
def test_slot_arithmetic(roles: list[dict[str, Any]], start: datetime, minutes: int,
                         count: int, first: tuple[str, str], last: tuple[str, str]) -> None:
    zone = start.tzinfo
    assert isinstance(zone, ZoneInfo)
    slots = generate_slots(roles, start, 1, minutes, zone)
    assert len(slots) == count
    assert (_iso(slots[0]), _iso(slots[-1])) == (first, last)
    assert all(s.end - s.start == slots[0].end - slots[0].start for s in slots)


@pytest.mark.parametrize(
    "week, day, hours_that_day, nine_utc",
    [
        # Spring forward on Sunday 2024-03-10: 23 hours; Monday after is EDT (UTC-4).
        (datetime(2024, 3, 4, tzinfo=NEW_YORK), "sun", 23, "Mon 13:00"),
        # Fall back on Sunday 2024-11-03: 25 hours; Monday after is EST (UTC-5).
        (datetime(2024, 10, 28, tzinfo=NEW_YORK), "sun", 25, "Mon 14:00"),
    ],
)
def test_dst_boundary(week: datetime, day: str, hours_that_day: int, nine_utc: str) -> None:
    all_day = generate_slots([_role({"daysOfWeek": [day], "allDay": True})], week, 1, 60,
                             NEW_YORK)
    assert len(all_day) == hours_that_day
    # The next week's Monday 09:00 local is 09:00 local in the new offset.
    nine = generate_slots([_role(_hours("09:00:00", "10:00:00", daysOfWeek=["mon"]))],
                          week, 2, 60, NEW_YORK)
    assert _iso(nine[-1])[0] == nine_utc


def test_week_start_is_local_monday() -> None:
    # Monday 03:00 UTC is still Sunday evening in New York: that week began on the 4th.
    now = datetime(2024, 3, 11, 3, 0, tzinfo=UTC)
    assert week_start(now, NEW_YORK) == datetime(2024, 3, 4, tzinfo=NEW_YORK)
    assert week_start(now, UTC_ZONE) == datetime(2024, 3, 11, tzinfo=UTC_ZONE)


def test_slot_ids_are_deterministic_fhir_ids() -> None:
    a = slot_id("s1", datetime(2024, 3, 4, 9, tzinfo=UTC))
    assert a == slot_id("s1", datetime(2024, 3, 4, 4, tzinfo=NEW_YORK))  # same instant
    assert a != slot_id("s2", datetime(2024, 3, 4, 9, tzinfo=UTC))
    assert len(a) <= 64


# --------------------------------------------------------------------------- against the store

NOW = datetime(2024, 3, 6, 12, 0, tzinfo=UTC)  # a Wednesday; the week began Monday the 4th
SETTINGS = SlotSettings(minutes=30, weeks=1, timezone="UTC")


def _put(resource: dict[str, Any]) -> dict[str, Any]:
    return {"resource": resource,
            "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}}


def _store(conn: Connection, *resources: dict[str, Any]) -> None:
    results = execute_batch(conn, list(enumerate(_put(r) for r in resources)), Context())
    assert all(r.ok for r in results), [r.outcome for r in results if not r.ok]


def _clinic(conn: Connection, *, via: str = "PractitionerRole", **schedule: Any) -> None:
    """Practitioner p1 with role r1 (Mon+Tue 09:00–11:00) and Schedule s1 of `via`."""
    actor = "PractitionerRole/r1" if via == "PractitionerRole" else "Practitioner/p1"
    _store(
        conn,
        {"resourceType": "Practitioner", "id": "p1", "name": [{"family": "Ng"}]},
        {"resourceType": "PractitionerRole", "id": "r1",
         "practitioner": {"reference": "Practitioner/p1"},
         "availableTime": [_hours("09:00:00", "11:00:00", daysOfWeek=["mon", "tue"])]},
        {"resourceType": "Schedule", "id": "s1", "actor": [{"reference": actor}], **schedule},
    )


def _run(conn: Connection) -> Any:
    """One run written through the engine directly (what the job's worker does)."""
    run = plan_slot_entries(conn, NOW, SETTINGS)
    results = execute_batch(conn, [(i, e) for i, e in enumerate(run.entries)], Context())
    assert all(r.ok for r in results), [r.outcome for r in results if not r.ok]
    return run


def _count(conn: Connection, sql: str) -> int:
    return conn.execute(text(sql)).scalar_one()


@pytest.mark.parametrize("via", ["PractitionerRole", "Practitioner"])
def test_run_creates_the_slots_of_a_schedule(conn: Connection, via: str) -> None:
    _clinic(conn, via=via, serviceType=[{"text": "GP"}])
    run = _run(conn)
    assert (run.schedules, run.generated, len(run.entries)) == (1, 8, 8)
    slots = conn.execute(text(
        f"SELECT content FROM {CURRENT} r WHERE res_type = 'Slot' ORDER BY content->>'start'"
    )).scalars().all()
    assert [(s["start"], s["end"]) for s in slots[:2]] == [
        ("2024-03-04T09:00:00Z", "2024-03-04T09:30:00Z"),
        ("2024-03-04T09:30:00Z", "2024-03-04T10:00:00Z"),
    ]
    assert slots[-1]["start"] == "2024-03-05T10:30:00Z"
    assert {s["status"] for s in slots} == {"free"}
    assert {s["schedule"]["reference"] for s in slots} == {"Schedule/s1"}
    assert slots[0]["serviceType"] == [{"text": "GP"}]
    # Found by the search the brief's users run.
    from core.fhir.search import find_ids

    assert len(find_ids(conn, "Slot", [("schedule", "Schedule/s1"),
                                        ("start", "ge2024-03-05")], limit=10)) == 4


def test_second_run_writes_nothing(conn: Connection) -> None:
    _clinic(conn)
    _run(conn)
    history = _count(conn, "SELECT count(*) FROM resource_history WHERE res_type = 'Slot'")
    again = _run(conn)
    assert (again.generated, again.unchanged, len(again.entries)) == (8, 8, 0)
    assert _count(conn, "SELECT count(*) FROM resource_history WHERE res_type = 'Slot'") == history
    assert _count(conn, "SELECT count(*) FROM resource WHERE res_type = 'Slot'") == 8


def test_booked_and_deleted_slots_are_left_alone(conn: Connection) -> None:
    _clinic(conn)
    _run(conn)
    booked = slot_id("s1", datetime(2024, 3, 4, 9, tzinfo=UTC))
    gone = slot_id("s1", datetime(2024, 3, 4, 9, 30, tzinfo=UTC))
    slot = conn.execute(text(f"SELECT content FROM {CURRENT} r WHERE res_id = :id"),
                        {"id": booked}).scalar_one()
    _store(conn, {**slot, "status": "busy"})
    execute_batch(conn, [(0, {"request": {"method": "DELETE", "url": f"Slot/{gone}"}})],
                  Context())
    # The Schedule changes, so every free Slot needs an update; the busy and deleted do not.
    _store(conn, {"resourceType": "Schedule", "id": "s1",
                  "actor": [{"reference": "PractitionerRole/r1"}],
                  "serviceType": [{"text": "vaccination"}]})
    run = _run(conn)
    assert (run.kept, len(run.entries)) == (2, 6)
    assert all(e["request"]["ifMatch"] == 'W/"1"' for e in run.entries)
    rows = dict(conn.execute(text(
        f"SELECT res_id, content->>'status' FROM {CURRENT} r "
        "WHERE res_type = 'Slot' AND NOT deleted"
    )).all())
    assert rows[booked] == "busy" and gone not in rows and len(rows) == 7


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param({"role": {"availableTime": []}}, id="role without availableTime"),
        pytest.param({"role": {"active": False}}, id="inactive role"),
        pytest.param({"schedule": {"active": False}}, id="inactive schedule"),
        pytest.param({"schedule": {"actor": [{"reference": "Practitioner/other"}]}},
                     id="actor without roles"),
    ],
)
def test_nothing_without_availability(conn: Connection, setup: dict[str, Any]) -> None:
    _store(
        conn,
        {"resourceType": "Practitioner", "id": "p1"},
        {"resourceType": "Practitioner", "id": "other"},
        {"resourceType": "PractitionerRole", "id": "r1",
         "practitioner": {"reference": "Practitioner/p1"},
         "availableTime": [_hours("09:00:00", "11:00:00")], **setup.get("role", {})},
        {"resourceType": "Schedule", "id": "s1",
         "actor": [{"reference": "PractitionerRole/r1"}], **setup.get("schedule", {})},
    )
    run = plan_slot_entries(conn, NOW, SETTINGS)
    assert (run.schedules, run.generated, run.entries) == (0, 0, [])
    assert submit_slot_job(conn, NOW, SETTINGS).job_id is None


def test_schedule_extension_sets_slot_length(conn: Connection) -> None:
    _clinic(conn, extension=[{"url": SLOT_MINUTES_URL, "valuePositiveInt": 60}])
    assert plan_slot_entries(conn, NOW, SETTINGS).generated == 4


# --------------------------------------------------------------------------- end to end


def test_beat_task_runs_a_job_on_a_worker(worker: WorkerProcess, clean_db: Engine) -> None:
    """`fhirq.slots` as beat sends it: a job of fhirq-scheduler, run by a worker; twice."""
    from worker.tasks import slots

    with clean_db.begin() as c:
        _clinic(c)
    # Availability every day from 00:00 so that this week has slots whatever today is.
    with clean_db.begin() as c:
        _store(c, {"resourceType": "PractitionerRole", "id": "r1",
                   "practitioner": {"reference": "Practitioner/p1"},
                   "availableTime": [_hours("00:00:00", "02:00:00")]})

    def job_done() -> Any:
        with clean_db.connect() as c:
            return c.execute(text(
                "SELECT count(*) FILTER (WHERE state = 'completed'), sum(succeeded) FROM job "
                "WHERE owner = :o"), {"o": OWNER}).one()

    slots.delay()
    done = wait_for(lambda: job_done()[0] == 1 and job_done(), 60, "the slot job",
                    on_timeout=worker.tail)
    assert done[1] == 28  # 7 days × 4 half-hours
    assert scalar(clean_db, "SELECT count(*) FROM resource WHERE res_type = 'Slot'") == 28
    # The second run in this process, so that its end is known: the same task body and
    # transaction as in a worker.
    slots()
    assert scalar(clean_db, "SELECT count(*) FROM job WHERE owner = :o", o=OWNER) == 1
    assert scalar(clean_db, "SELECT count(*) FROM resource_history WHERE res_type = 'Slot'") == 28


def test_cli_dry_run_writes_nothing(clean_db: Engine) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    with clean_db.begin() as c:
        _clinic(c)
        _store(c, {"resourceType": "PractitionerRole", "id": "r1",
                   "practitioner": {"reference": "Practitioner/p1"},
                   "availableTime": [_hours("00:00:00", "01:00:00")]})
    result = CliRunner().invoke(cli, ["slots", "generate", "--weeks", "2", "--dry-run"])
    assert result.exit_code == 0, result.output
    summary = orjson.loads(result.output)
    assert (summary["generated"], summary["submitted"], summary["job"]) == (28, 28, None)
    assert scalar(clean_db, "SELECT count(*) FROM resource WHERE res_type = 'Slot'") == 0
    assert scalar(clean_db, "SELECT count(*) FROM job") == 0

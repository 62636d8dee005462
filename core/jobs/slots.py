"""Recurring Slot generation: free `Slot`s for each active `Schedule` from its practitioners'
availability (`PractitionerRole.availableTime` minus `notAvailable`), for the next weeks.

Idempotent by construction: a Slot's id is a UUIDv5 of its schedule and start instant, so a
second run names the same Slots. Before submitting, the current state of every generated id is
read in one statement; a Slot that exists unchanged, is no longer `free` (booked, busy) or was
deleted by someone is left alone, so a second run submits nothing. A free Slot whose content
differs (say the Schedule's serviceType changed) is updated with `ifMatch` on the version just
read, so a booking that lands between this read and the worker's write is never overwritten
(that entry fails with 412 instead).

Why a job and not `execute_batch` in the beat task: the writes become an ordinary batch job
(owner `fhirq-scheduler`) with per-entry results, progress, metrics and retry like any client's
submission, and the beat task stays a short transaction that only reads and enqueues.

Settings (environment): FHIRQ_SLOT_MINUTES (slot length, default 30), FHIRQ_SLOT_WEEKS (weeks
ahead, default 1), FHIRQ_SLOT_TIMEZONE (IANA zone of availability times and of the weekly run,
default UTC). A Schedule may set its own slot length with the extension `SLOT_MINUTES_URL`
(`valueInteger` or `valuePositiveInt`).

Rules the FHIR spec leaves open, as decided here:
- an `availableTime` without `daysOfWeek` applies to every day; without start / end time it
  starts at 00:00 / ends at 24:00; an end not after the start ends the next day (night shift);
- a slot must fit whole in its window; the last partial one is not generated;
- times are wall-clock times in the configured zone, so across a DST change a 09:00–17:00
  window stays 09:00–17:00 local (an all-day window has 23 or 25 hours that day);
- `notAvailable.during` removes every slot that overlaps it; a date-only bound means the whole
  day (an end date includes that day); a missing bound is open-ended;
- actors may be PractitionerRoles, or Practitioners (their roles with availability are used);
  availability of several roles is merged; slots before the horizon's start are not made, but
  slots already past within the current week are (the weekly run starts at Monday 00:05).

Not done: free Slots that availability no longer covers are not removed.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from sqlalchemy import Connection, and_, select

from core.config import get_settings
from core.fhir.model import format_instant
from core.jobs.intake import Accepted, Submission, accept_job
from core.store import repository as repo
from core.store.schema import resource as R

__all__ = [
    "OWNER",
    "SLOT_MINUTES_URL",
    "SlotRun",
    "SlotSettings",
    "Window",
    "availability_windows",
    "generate_slots",
    "plan_slot_entries",
    "slot_id",
    "submit_slot_job",
    "week_start",
]

OWNER = "fhirq-scheduler"
SLOT_MINUTES_URL = "https://fhirq.dev/StructureDefinition/slot-minutes"
# Fixed namespace: ids must be the same in every process and release, or reruns duplicate.
_NAMESPACE = uuid.UUID("6f1c4f0e-3a52-5d43-9a0e-5c2b8f0d7a11")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class SlotSettings:
    """The FHIRQ_SLOT_* settings (read in core.config), overridable one by one in tests."""

    minutes: int = field(default_factory=lambda: get_settings().slot_minutes)
    weeks: int = field(default_factory=lambda: get_settings().slot_weeks)
    timezone: str = field(default_factory=lambda: get_settings().slot_timezone)

    def __post_init__(self) -> None:
        if self.minutes < 1 or self.weeks < 1:
            raise ValueError("FHIRQ_SLOT_MINUTES and FHIRQ_SLOT_WEEKS must be at least 1")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


@dataclass(frozen=True, slots=True)
class Window:
    """A half-open interval of instants [start, end), both aware."""

    start: datetime
    end: datetime

    def overlaps(self, other: Window) -> bool:
        return self.start < other.end and other.start < self.end


# --------------------------------------------------------------------------- pure arithmetic


def week_start(now: datetime, zone: ZoneInfo) -> datetime:
    """Monday 00:00 (local, aware) of the week that contains `now` in `zone`."""
    local = now.astimezone(zone)
    monday = local.date() - timedelta(days=local.weekday())
    return datetime.combine(monday, time(0), zone)


def _clock(value: str | None, default: time) -> time:
    return time.fromisoformat(value) if value else default


def availability_windows(
    available: Sequence[dict[str, Any]], first_day: date, days: int, zone: ZoneInfo
) -> list[Window]:
    """Windows of `availableTime` entries over `days` local days from `first_day`."""
    out: list[Window] = []
    for offset in range(days):
        day = first_day + timedelta(days=offset)
        code = _DAYS[day.weekday()]
        for at in available:
            if code not in at.get("daysOfWeek", _DAYS):
                continue
            if at.get("allDay"):
                begin, finish = time(0), time(0)
            else:
                begin = _clock(at.get("availableStartTime"), time(0))
                finish = _clock(at.get("availableEndTime"), time(0))
            start = datetime.combine(day, begin, zone)
            end_day = day if finish > begin else day + timedelta(days=1)
            out.append(Window(start, datetime.combine(end_day, finish, zone)))
    return out


def _bound(value: str | None, zone: ZoneInfo, *, end: bool) -> datetime | None:
    """A Period bound as an instant; a date (or year-month) means that whole day."""
    if not value:
        return None
    if "T" not in value:
        parts = [int(p) for p in value.split("-")] + [1, 1]
        day = date(parts[0], parts[1], parts[2])
        if end:
            day += timedelta(days=1)
        return datetime.combine(day, time(0), zone)
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


def _unavailable(not_available: Sequence[dict[str, Any]], zone: ZoneInfo) -> list[Window]:
    out = []
    for na in not_available:
        during = na.get("during") or {}
        start = _bound(during.get("start"), zone, end=False) or datetime.min.replace(tzinfo=UTC)
        end = _bound(during.get("end"), zone, end=True) or datetime.max.replace(tzinfo=UTC)
        out.append(Window(start, end))
    return out


def generate_slots(
    roles: Sequence[dict[str, Any]], start: datetime, weeks: int, minutes: int, zone: ZoneInfo
) -> list[Window]:
    """Slots of `minutes` from the roles' availability in [start, start + weeks), sorted and
    without duplicates (overlapping availability of two roles gives one slot per start)."""
    horizon = Window(start, datetime.combine(start.date() + timedelta(weeks=weeks), time(0), zone))
    length = timedelta(minutes=minutes)
    blocked: list[Window] = []
    for role in roles:
        blocked += _unavailable(role.get("notAvailable", ()), zone)
    starts: dict[datetime, Window] = {}
    for role in roles:
        # One day earlier: a night window that began on Sunday runs into Monday.
        windows = availability_windows(
            role.get("availableTime", ()), start.date() - timedelta(days=1), weeks * 7 + 1, zone
        )
        for w in windows:
            # Step in absolute time: a window over a DST change has its real length.
            t, end = w.start.astimezone(UTC), w.end.astimezone(UTC)
            while t + length <= end:
                slot = Window(t, t + length)
                if (horizon.start <= t < horizon.end
                        and not any(slot.overlaps(b) for b in blocked)):
                    starts.setdefault(t, slot)
                t += length
    return [starts[t] for t in sorted(starts)]


def slot_id(schedule_id: str, start: datetime) -> str:
    """Deterministic Slot id: the same schedule and start give the same id in every run."""
    return str(uuid.uuid5(_NAMESPACE, f"Schedule/{schedule_id}|{format_instant(start)}"))


def slot_resource(schedule: dict[str, Any], slot: Window) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Slot",
        "id": slot_id(schedule["id"], slot.start),
    }
    # What the Schedule offers, so that a Slot search by service type finds these.
    for key in ("serviceCategory", "serviceType", "specialty"):
        if schedule.get(key):
            resource[key] = schedule[key]
    resource.update(
        schedule={"reference": f"Schedule/{schedule['id']}"},
        status="free",
        start=_instant(slot.start),
        end=_instant(slot.end),
    )
    return resource


def _instant(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- store reads


def _reference_key(ref: dict[str, Any]) -> tuple[str, str] | None:
    """("Practitioner", "x") from a literal reference, relative or absolute; else None."""
    value = (ref or {}).get("reference") or ""
    parts = value.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) < 2 or not parts[-1] or parts[-2] not in ("Practitioner", "PractitionerRole"):
        return None
    return parts[-2], parts[-1]


def _current(conn: Connection, resource_type: str) -> Iterator[dict[str, Any]]:
    rows = conn.execute(
        select(repo.content_of(R))
        .where(and_(R.c.res_type == resource_type, R.c.deleted.is_(False)))
    )
    for (content,) in rows:
        if content.get("active") is not False:
            yield content


def _roles_by_actor(conn: Connection) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Active PractitionerRoles with availability, by their own key and by their practitioner."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for role in _current(conn, "PractitionerRole"):
        if not role.get("availableTime"):
            continue
        out.setdefault(("PractitionerRole", role["id"]), []).append(role)
        practitioner = _reference_key(role.get("practitioner") or {})
        if practitioner and practitioner[0] == "Practitioner":
            out.setdefault(practitioner, []).append(role)
    return out


def _schedule_minutes(schedule: dict[str, Any], default: int) -> int:
    for ext in schedule.get("extension", ()):
        if ext.get("url") == SLOT_MINUTES_URL:
            value = ext.get("valuePositiveInt", ext.get("valueInteger"))
            if isinstance(value, int) and value > 0:
                return value
    return default


# --------------------------------------------------------------------------- planning a run


@dataclass(slots=True)
class SlotRun:
    """What one run found and did."""

    start: datetime
    end: datetime
    schedules: int = 0  # active Schedules with availability
    generated: int = 0  # Slots the availability gives over the horizon
    unchanged: int = 0  # already stored as generated
    kept: int = 0  # stored but booked / busy / deleted: left alone
    entries: list[dict[str, Any]] = field(default_factory=list)  # batch entries to submit
    job_id: str | None = None
    accepted: Accepted | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "start": format_instant(self.start),
            "end": format_instant(self.end),
            "schedules": self.schedules,
            "generated": self.generated,
            "unchanged": self.unchanged,
            "kept": self.kept,
            "submitted": len(self.entries),
            "job": self.job_id,
        }


def plan_slot_entries(
    conn: Connection, now: datetime | None = None, settings: SlotSettings | None = None
) -> SlotRun:
    """Batch entries (PUT Slot/<id>) that bring the store up to the availability of the
    weeks from `now`'s week; reads only."""
    cfg = settings or SlotSettings()
    zone = cfg.zone
    start = week_start(now or datetime.now(UTC), zone)
    run = SlotRun(start, datetime.combine(start.date() + timedelta(weeks=cfg.weeks), time(0), zone))
    roles_by_actor = _roles_by_actor(conn)
    wanted: list[dict[str, Any]] = []
    for schedule in _current(conn, "Schedule"):
        roles = _roles_of(schedule, roles_by_actor)
        if not roles:
            continue
        run.schedules += 1
        minutes = _schedule_minutes(schedule, cfg.minutes)
        for slot in generate_slots(roles, start, cfg.weeks, minutes, zone):
            wanted.append(slot_resource(schedule, slot))
    run.generated = len(wanted)
    stored = repo.read_current(conn, [("Slot", s["id"]) for s in wanted])
    for slot in wanted:
        cur = stored.get(("Slot", slot["id"]))
        request: dict[str, Any] = {"method": "PUT", "url": f"Slot/{slot['id']}"}
        if cur is not None:
            content = cur.content or {}
            if cur.deleted or content.get("status") != "free":
                run.kept += 1
                continue
            if {k: v for k, v in content.items() if k != "meta"} == slot:
                run.unchanged += 1
                continue
            request["ifMatch"] = f'W/"{cur.version}"'
        run.entries.append({"resource": slot, "request": request})
    return run


def _roles_of(
    schedule: dict[str, Any], roles_by_actor: dict[tuple[str, str], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for actor in schedule.get("actor", ()):
        key = _reference_key(actor)
        for role in roles_by_actor.get(key, ()) if key else ():
            seen.setdefault(role["id"], role)
    return list(seen.values())


def submit_slot_job(
    conn: Connection,
    now: datetime | None = None,
    settings: SlotSettings | None = None,
    *,
    base_url: str = "",
    chunk_size: int = 500,
    inflight_chunks: int = 4,
) -> SlotRun:
    """Plan a run and, when there is anything to write, accept it as a batch job of
    `fhirq-scheduler`. Nothing commits here: enqueue `run.accepted.dispatches` after commit."""
    run = plan_slot_entries(conn, now, settings)
    if not run.entries:
        return run
    body = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": run.entries})
    sub = Submission(
        kind="bundle",
        owner=OWNER,
        base_url=base_url,
        prefer_return="minimal",
        chunk_size=chunk_size,
        max_bytes=max(len(body), 1),
        inflight_chunks=inflight_chunks,
        scopes=("system/*.*",),  # the server's own job
    )
    run.accepted = accept_job(conn, io.BytesIO(body), sub)
    run.job_id = run.accepted.job_id
    return run


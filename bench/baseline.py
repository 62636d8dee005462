"""The raw PostgreSQL baseline: COPY of a workload's resource rows, as the store would hold them,
into scratch tables created `LIKE <store table> INCLUDING ALL` (same columns, same indexes:
the tokens GIN, the last_updated btree, the string, date and number indexes).

It stays the yardstick issue 11 defined: the content goes into both the resource table and the
history table, as the store did before it kept a version's content once (in history only). The
scratch resource table is the store's plus a `content` column (its `content_hash` left out), so
the baseline copies each resource's JSON twice while the product writes it once.

The rows are what the engine writes for the same resources — stored content (id set, server
meta removed), `tokens` and the `resource_string`, `resource_date` and `resource_number` rows,
all computed by `core.fhir.search_index.extract_index` — prepared in memory beforehand, so the
timed part is PostgreSQL alone: five COPYs and the commit.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg2

from core.fhir.search_index import extract_index

__all__ = ["CopyRows", "copy_rows", "prepare_rows", "resolve_placeholders", "time_copy"]

SCRATCH = {
    "resource": "bench_resource",
    "resource_history": "bench_resource_history",
    "resource_string": "bench_resource_string",
    "resource_date": "bench_resource_date",
    "resource_number": "bench_resource_number",
}


@dataclass(frozen=True)
class CopyRows:
    """COPY text for the three store tables, and how many resources it holds."""

    resource: bytes
    history: bytes
    strings: bytes
    count: int
    dates: bytes = b""
    numbers: bytes = b""

    @property
    def bytes(self) -> int:
        return (len(self.resource) + len(self.history) + len(self.strings) + len(self.dates)
                + len(self.numbers))


def _esc(text: str) -> str:
    """A field in COPY's text format."""
    return (text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            .replace("\t", "\\t"))


def _array(values: list[str]) -> str:
    """A text[] literal."""
    items = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return "{" + ",".join(items) + "}"


def _ts(value: datetime | None) -> str:
    return value.isoformat() if value is not None else "\\N"


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _rewrite(v, mapping) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    if isinstance(node, str):
        if node in mapping:
            return mapping[node]
        if node[:1].isupper() and "?" in node and "/" not in node.partition("?")[0]:
            # A conditional reference (Synthea's `Practitioner?identifier=…`): the engine
            # stores the id it resolves to; a made-up one indexes the same way.
            return mapping.setdefault(node, f"{node.partition('?')[0]}/{uuid.uuid4()}")
    return node


def resolve_placeholders(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The resources of transaction entries with server-like ids given and every `urn:uuid`
    (and conditional) reference rewritten to `Type/id`, as the engine stores them."""
    mapping: dict[str, str] = {}
    resources: list[dict[str, Any]] = []
    for entry in entries:
        resource = dict(entry["resource"])
        resource["id"] = str(uuid.uuid4())
        full_url = entry.get("fullUrl")
        if full_url and full_url.startswith(("urn:uuid:", "urn:oid:")):
            mapping[full_url] = f"{resource['resourceType']}/{resource['id']}"
        resources.append(resource)
    return [_rewrite(r, mapping) for r in resources]


def prepare_rows(resources: Iterable[dict[str, Any]]) -> CopyRows:
    """COPY text for `resources` (each with resourceType and id) as version 1 of each."""
    now = _ts(datetime.now(UTC))
    res, hist, strings = io.StringIO(), io.StringIO(), io.StringIO()
    dates, numbers = io.StringIO(), io.StringIO()
    count = 0
    for resource in resources:
        stored = dict(resource)
        meta = stored.get("meta")
        if isinstance(meta, dict):
            stored["meta"] = {k: v for k, v in meta.items() if k not in ("versionId",
                                                                         "lastUpdated")}
        rtype, rid = stored["resourceType"], stored.get("id") or str(uuid.uuid4())
        stored["id"] = rid
        index = extract_index(stored)
        content = _esc(orjson.dumps(stored).decode())
        res.write(f"{rtype}\t{rid}\t1\t{now}\tf\t{content}\t{_esc(_array(index.tokens))}\n")
        hist.write(f"{rtype}\t{rid}\t1\t{now}\tf\tPOST\t{content}\n")
        for param, value in index.strings:
            strings.write(f"{rtype}\t{rid}\t{param}\t{_esc(value)}\n")
        for param, lo, hi in index.dates:
            dates.write(f"{rtype}\t{rid}\t{param}\t{_ts(lo)}\t{_ts(hi)}\n")
        for param, system, code, nlo, nhi in index.numbers:
            numbers.write(f"{rtype}\t{rid}\t{param}\t{_esc(system)}\t{_esc(code)}\t{nlo}\t{nhi}\n")
        count += 1
    return CopyRows(res.getvalue().encode(), hist.getvalue().encode(),
                    strings.getvalue().encode(), count, dates.getvalue().encode(),
                    numbers.getvalue().encode())


def _ensure_scratch(cur: Any) -> None:
    for table, scratch in SCRATCH.items():
        cur.execute(f"CREATE TABLE IF NOT EXISTS {scratch} (LIKE {table} INCLUDING ALL)")
    cur.execute("ALTER TABLE bench_resource ADD COLUMN IF NOT EXISTS content jsonb NOT NULL")
    cur.execute("ALTER TABLE bench_resource DROP COLUMN IF EXISTS content_hash")


def copy_rows(database_url: str, rows: CopyRows) -> float:
    """Seconds to COPY `rows` into the empty scratch tables and commit."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            _ensure_scratch(cur)
            cur.execute("TRUNCATE " + ", ".join(SCRATCH.values()))
        conn.commit()
        with conn.cursor() as cur:
            t0 = time.perf_counter()
            cur.copy_expert(
                "COPY bench_resource (res_type, res_id, version, last_updated, deleted, content,"
                " tokens) FROM STDIN", io.BytesIO(rows.resource))
            cur.copy_expert(
                "COPY bench_resource_history (res_type, res_id, version, last_updated, deleted,"
                " method, content) FROM STDIN", io.BytesIO(rows.history))
            cur.copy_expert("COPY bench_resource_string (res_type, res_id, param, value) "
                            "FROM STDIN", io.BytesIO(rows.strings))
            cur.copy_expert("COPY bench_resource_date (res_type, res_id, param, lo, hi) "
                            "FROM STDIN", io.BytesIO(rows.dates))
            cur.copy_expert("COPY bench_resource_number (res_type, res_id, param, system, code,"
                            " lo, hi) FROM STDIN", io.BytesIO(rows.numbers))
            conn.commit()
            seconds = time.perf_counter() - t0
        with conn.cursor() as cur:
            cur.execute("TRUNCATE " + ", ".join(SCRATCH.values()))
        conn.commit()
        return seconds
    finally:
        conn.close()


def time_copy(database_url: str, rows: CopyRows, runs: int) -> list[float]:
    """Rows per second of `runs` COPY runs."""
    return [rows.count / copy_rows(database_url, rows) for _ in range(runs)]

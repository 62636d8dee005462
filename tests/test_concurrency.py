"""Races between concurrent requests and workers, on real PostgreSQL connections."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

from core.fhir.engine import execute_batch, execute_transaction
from core.fhir.model import Context
from tests.builders import ident, patient, post, put

SYS = "http://example.org/race"


def _together(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run `work(i)` in n threads released at the same instant; return results or exceptions."""
    barrier = threading.Barrier(n)
    out: list[Any] = [None] * n

    def target(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except Exception as exc:  # noqa: BLE001 - collected and asserted on by the test
            out[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_if_none_exist_creates_exactly_one(clean_db: Any) -> None:
    for round_ in range(5):
        key = f"k{round_}"
        entry = post(
            patient("Race", identifier=ident(SYS, key)), if_none_exist=f"identifier={SYS}|{key}"
        )

        def work(i: int, entry: dict[str, Any] = entry) -> Any:
            with clean_db.begin() as conn:
                return execute_transaction(conn, [(0, entry)], Context())

        results = _together(2, work)
        assert not [r for r in results if isinstance(r, Exception)], results
        statuses = sorted(r[0].status for r in results)
        assert statuses == [200, 201], statuses
        with clean_db.connect() as c:
            n = c.execute(
                text(
                    "SELECT count(*) FROM resource WHERE res_type='Patient' AND tokens @> ARRAY[:t]"
                ),
                {"t": f"identifier:{SYS}|{key}"},
            ).scalar_one()
        assert n == 1


def test_eight_concurrent_updates_make_eight_consecutive_versions(clean_db: Any) -> None:
    with clean_db.begin() as conn:
        execute_batch(conn, [(0, put(patient("v0", id="hot")))], Context())

    def work(i: int) -> Any:
        with clean_db.begin() as conn:
            return execute_batch(conn, [(0, put(patient(f"v{i + 1}", id="hot")))], Context())

    results = _together(8, work)
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r[0].etag for r in results) == sorted(f'W/"{v}"' for v in range(2, 10))
    with clean_db.connect() as c:
        versions = [
            r[0]
            for r in c.execute(
                text("SELECT version FROM resource_history WHERE res_id='hot' ORDER BY version")
            )
        ]
        families = {
            r[0]
            for r in c.execute(
                text(
                    "SELECT content->'name'->0->>'family' FROM resource_history WHERE res_id='hot'"
                )
            )
        }
        current = c.execute(text("SELECT version FROM resource WHERE res_id='hot'")).scalar_one()
    assert versions == list(range(1, 10))
    assert families == {f"v{i}" for i in range(9)}, "every update kept as a version"
    assert current == 9

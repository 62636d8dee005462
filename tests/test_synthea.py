"""Real Synthea output (../shared/data/synthea/): the two batch bundles of organisations and
practitioners, then patient transactions whose conditional references need them."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text

from core.fhir.engine import execute_batch, execute_transaction
from core.fhir.model import Context
from tests.store_sql import CURRENT

DATA = Path(os.environ.get("FHIRQ_SYNTHEA_DIR", Path(__file__).parents[2] / "shared/data/synthea"))
BATCHES = ["hospitalInformation1633536936158.json", "practitionerInformation1633536936158.json"]
# Two of the smallest patient bundles keep the test quick.
PATIENTS = [
    "Bob965_Keeling57_3f6fd0bb-6cd3-eb3f-4401-cd38ace25f2b.json",
    "Jani266_Reynolds644_304f9946-5db8-dc6f-e060-48b9fea3ca5d.json",
]

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="Synthea sample data not present")


def _entries(name: str) -> list[tuple[int, Any]]:
    return list(enumerate(orjson.loads((DATA / name).read_bytes())["entry"]))


def _load_batches(engine: Any) -> list[Counter[int]]:
    out = []
    for name in BATCHES:
        entries = _entries(name)
        with engine.begin() as conn:
            results = []
            for start in range(0, len(entries), 500):
                results += execute_batch(conn, entries[start : start + 500], Context())
        out.append(Counter(r.status for r in results))
    return out


def test_synthea_batches_then_patient_transactions(clean_db: Any) -> None:
    first = _load_batches(clean_db)
    assert first == [Counter({201: 2382}), Counter({201: 2382})]
    # Replaying the batches: every ifNoneExist now finds its resource (200). The 1,191
    # PractitionerRoles are plain POSTs without a condition, so they are created again.
    assert _load_batches(clean_db) == [Counter({200: 2382}), Counter({200: 1191, 201: 1191})]

    for name in PATIENTS:
        entries = _entries(name)
        with clean_db.begin() as conn:
            results = execute_transaction(conn, entries, Context())
        assert {r.status for r in results} == {201}
        assert len(results) == len(entries)

    with clean_db.connect() as c:
        dangling = c.execute(
            text(
                f"SELECT count(*) FROM {CURRENT} r, jsonb_path_query(r.content, "
                "'strict $.**.reference') ref WHERE ref #>> '{}' LIKE 'urn:uuid:%' "
                "OR ref #>> '{}' LIKE '%?%'"
            )
        ).scalar_one()
        patients = c.execute(
            text("SELECT count(*) FROM resource WHERE res_type = 'Patient'")
        ).scalar_one()
        # Every Encounter's serviceProvider resolved to a stored Organization.
        orphans = c.execute(
            text(
                f"SELECT count(*) FROM {CURRENT} e WHERE e.res_type = 'Encounter' AND NOT EXISTS ("
                " SELECT 1 FROM resource o WHERE o.res_type = 'Organization'"
                " AND 'Organization/' || o.res_id = e.content->'serviceProvider'->>'reference')"
            )
        ).scalar_one()
    assert dangling == 0, "placeholders and conditional references are all rewritten"
    assert patients == len(PATIENTS)
    assert orphans == 0

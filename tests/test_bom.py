"""A body that starts with a UTF-8 byte-order mark (as files saved on Windows often do) is read
as if the mark were not there, on every route that reads JSON or NDJSON, sync and async."""

from __future__ import annotations

import io
from codecs import BOM_UTF8
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from core.jobs import Submission, accept_job
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, patients_batch, scalar, submit, wait_job
from tests.store_sql import CURRENT, ENTRIES


def with_bom(body: Any) -> bytes:
    return BOM_UTF8 + orjson.dumps(body, option=orjson.OPT_INDENT_2)


def patient(family: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Patient", "name": [{"family": family}], **extra}


def families(engine: Engine) -> list[str]:
    with engine.connect() as c:
        return sorted(c.execute(text(
            f"SELECT content->'name'->0->>'family' FROM {CURRENT} r WHERE res_type = 'Patient'"
        )).scalars())


# --------------------------------------------------------------------------- synchronous


def test_sync_bundle(client: Any, clean_db: Engine) -> None:
    r = client.post("/fhir", data=with_bom(patients_batch(2)),
                    content_type="application/fhir+json")
    assert r.status_code == 200, r.json
    assert [e["response"]["status"] for e in r.json["entry"]] == ["201 Created"] * 2
    assert families(clean_db) == ["F0", "F1"]


def test_rest_create_and_update(client: Any, clean_db: Engine) -> None:
    r = client.post("/fhir/Patient", data=with_bom(patient("Bom")),
                    content_type="application/fhir+json")
    assert r.status_code == 201, r.json
    r = client.put(f"/fhir/Patient/{r.json['id']}",
                   data=with_bom(patient("Bom2", id=r.json["id"])), content_type="application/json")
    assert r.status_code == 200, r.json
    assert families(clean_db) == ["Bom2"]


def test_upsert_array(client: Any, clean_db: Engine) -> None:
    body = [patient("A", id="bom-a"), patient("B", id="bom-b")]
    r = client.put("/fhir", data=with_bom(body), content_type="application/fhir+json")
    assert r.status_code == 200, r.json
    assert [p["id"] for p in r.json] == ["bom-a", "bom-b"]
    assert families(clean_db) == ["A", "B"]


def test_upsert_ndjson(client: Any, clean_db: Engine) -> None:
    lines = b"\n".join(orjson.dumps(patient(f, id=f"bom-{f.lower()}")) for f in "AB")
    r = client.put("/fhir", data=BOM_UTF8 + lines, content_type="application/fhir+ndjson")
    assert r.status_code == 200, r.json
    assert [p["id"] for p in r.json] == ["bom-a", "bom-b"]


def test_only_a_leading_mark_is_ignored(client: Any) -> None:
    # A mark elsewhere is not whitespace in JSON: still a 400 saying the body is not JSON.
    r = client.post("/fhir", data=b" " + with_bom(patients_batch(1)),
                    content_type="application/fhir+json")
    assert r.status_code == 400 and "not valid JSON" in r.json["issue"][0]["diagnostics"]
    r = client.post("/fhir", data=BOM_UTF8, content_type="application/fhir+json")
    assert r.status_code == 400 and "empty" in r.json["issue"][0]["diagnostics"]


# --------------------------------------------------------------------------- asynchronous


class Trickle(io.RawIOBase):
    """A body that arrives a byte or two at a time, as a chunked upload may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.step, self.pos = data, step, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        out = self.data[self.pos:self.pos + min(self.step, size if size > 0 else self.step)]
        self.pos += len(out)
        return out


@pytest.mark.parametrize("step", [1, 2, 1 << 20])
@pytest.mark.parametrize(("kind", "ndjson", "body"), [
    ("bundle", False, with_bom(patients_batch(3))),
    ("upsert", False, with_bom([patient("A", id="a"), patient("B", id="b")])),
    ("upsert", True, BOM_UTF8 + b'{"resourceType": "Patient", "id": "a"}\n{"resourceType": '
     b'"Patient", "id": "b"}\n'),
])
def test_intake_drops_the_mark_however_the_body_arrives(
    clean_db: Engine, kind: str, ndjson: bool, body: bytes, step: int
) -> None:
    sub = Submission(kind=kind, owner="alice", base_url="http://x/fhir",  # type: ignore[arg-type]
                     ndjson=ndjson)
    with clean_db.begin() as conn:
        acc = accept_job(conn, Trickle(body, step), sub)  # type: ignore[arg-type]
    plain = body.removeprefix(BOM_UTF8)
    if ndjson:
        expected = [orjson.loads(line) for line in plain.splitlines()]
    else:
        value = orjson.loads(plain)
        expected = value["entry"] if kind == "bundle" else value
    with clean_db.connect() as c:
        rows = c.execute(text(f"SELECT request, status FROM {ENTRIES} e WHERE job_id = :id "
                              "ORDER BY idx"), {"id": acc.job_id}).all()
    assert [r.request for r in rows] == expected
    assert all(r.status is None for r in rows)


def test_async_bundle_end_to_end(api: Any, worker: Any, clean_db: Engine) -> None:
    r = submit(api, with_bom(patients_batch(3)))
    job = wait_job(api, job_id_of(r), worker=worker)
    assert (job["state"], job["counts"]["succeeded"]) == ("completed", 3)
    assert scalar(clean_db, "SELECT count(*) FROM resource WHERE res_type = 'Patient'") == 3


def test_async_upsert_array_and_ndjson_through_the_api(api: Any) -> None:
    r = submit(api, with_bom([patient("A", id="a")]), method="PUT",
               content_type="application/fhir+json")
    assert r.status_code == 202, r.json
    r = submit(api, BOM_UTF8 + orjson.dumps(patient("A", id="a")), method="PUT",
               content_type="application/fhir+ndjson")
    assert r.status_code == 202, r.json
    assert api.get(f"/jobs/{job_id_of(r)}").json["counts"]["failed"] == 0

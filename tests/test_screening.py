"""A job's entries are screened on their JSON text (core.fhir.bundle.screen_entries) instead of
being serialised again: the screen may only ever spare work, never a check. Table-driven on the
text rules, then end to end through accept_job → run_chunk / run_transaction_job with bodies
written byte by byte, escapes included, so that what a client can spell is what is tested."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, text

from core.fhir.bundle import screen_entries
from core.fhir.references import text_may_reference
from core.fhir.strings import plain_json_text
from core.jobs import Submission, accept_job, run_chunk, run_transaction_job
from core.jobs.views import list_entries

PATIENT = '{"resourceType":"Patient","name":[{"family":"%s"}]}'


@pytest.mark.parametrize(("raw", "plain"), [
    (PATIENT % "plain", True),
    (PATIENT % "tab\\tcr\\rlf\\n quote\\\" slash\\/ backslash\\\\", True),  # allowed escapes
    (PATIENT % "caf\\u00e9", False),  # no control character, but the walk decides
    (PATIENT % "a\\u0001b", False),
    (PATIENT % "a\\u001Fb", False),
    (PATIENT % "a\\bb", False),
    (PATIENT % "a\\fb", False),
    (PATIENT % "backslash then b: \\\\b", False),  # spares nothing, costs a walk
    ('{"resourceType":"Patient","fa\\u0000mily":1}', False),  # an element name
])
def test_plain_text_is_text_without_a_control_escape(raw: str, plain: bool) -> None:
    orjson.loads(raw)  # every case is JSON
    assert plain_json_text(raw) is plain


@pytest.mark.parametrize(("raw", "may"), [
    (PATIENT % "x", False),
    ('{"subject":{"reference":"Patient/1"}}', True),
    ('{"subject":{"reference" : "Patient/1"}}', True),
    ('{"subject":{"refer\\u0065nce":"Patient/1"}}', True),  # a key spelled with an escape
    ('{"note":"caf\\u00e9"}', True),  # any \\u escape: the resource is walked
    ('{"text":"the word \\"reference\\""}', False),  # a value, not a key
])
def test_a_reference_key_is_never_missed(raw: str, may: bool) -> None:
    value = orjson.loads(raw)
    assert text_may_reference(raw) is may
    if not may:
        assert b'"reference"' not in orjson.dumps(value)


def test_screen_entries_by_index() -> None:
    screening = screen_entries([(0, PATIENT % "x"), (1, PATIENT % "a\\bb"), (2, None),
                                (3, '{"subject":{"reference":"Patient/1"}}')])
    assert screening.plain == {0, 3}
    assert screening.unreferenced == {0, 1}


# --------------------------------------------------------------------------- through a job


def _entry(resource: str) -> str:
    return '{"resource":' + resource + ',"request":{"method":"POST","url":"Patient"}}'


def _bundle(kind: str, *entries: str) -> str:
    return '{"resourceType":"Bundle","type":"' + kind + '","entry":[' + ",".join(entries) + "]}"


def _accept(engine: Engine, body: str) -> str:
    sub = Submission(kind="bundle", owner="o", base_url="http://x/fhir", chunk_size=100,
                     scopes=("system/*.*",))
    with engine.begin() as conn:
        return accept_job(conn, io.BytesIO(body.encode()), sub).job_id


def _results(engine: Engine, job_id: str) -> list[dict[str, Any]]:
    with engine.connect() as c:
        return list_entries(c, job_id)


def _issue(result: dict[str, Any]) -> dict[str, Any]:
    return result["outcome"]["issue"][0]


def test_a_batch_job_still_refuses_what_its_text_hides(clean_db: Engine) -> None:
    entries = [
        _entry(PATIENT % "fine"),
        _entry(PATIENT % "a\\u0001b"),
        _entry(PATIENT % "a\\fb"),
        _entry('{"resourceType":"Patient","generalPractitioner":'
               '[{"refer\\u0065nce":"Practitioner/nobody"}]}'),
        _entry('{"resourceType":"Patient","generalPractitioner":'
               '[{"reference":"Practitioner/nobody"}]}'),
        _entry(PATIENT % "caf\\u00e9"),
    ]
    job_id = _accept(clean_db, _bundle("batch", *entries))
    with clean_db.begin() as conn:
        run_chunk(conn, job_id, 0, clean_db.begin)
    results = _results(clean_db, job_id)
    assert [r["status"] for r in results] == [201, 400, 400, 400, 400, 201]
    assert _issue(results[1])["expression"] == ["Bundle.entry[1].resource.name[0].family"]
    assert "U+0001" in _issue(results[1])["diagnostics"]
    assert _issue(results[2])["expression"] == ["Bundle.entry[2].resource.name[0].family"]
    for i in (3, 4):
        assert _issue(results[i])["code"] == "not-found"
        assert _issue(results[i])["expression"] == [
            f"Bundle.entry[{i}].resource.generalPractitioner[0].reference"]
    with clean_db.connect() as c:
        families = c.execute(text(
            "SELECT h.content #>> '{name,0,family}' FROM resource_history h ORDER BY 1"
        )).scalars().all()
    assert families == ["café", "fine"]


def test_a_transaction_job_still_refuses_a_control_character(clean_db: Engine) -> None:
    job_id = _accept(clean_db, _bundle("transaction", _entry(PATIENT % "fine"),
                                       _entry(PATIENT % "a\\u001fb")))
    with clean_db.begin() as conn:
        run_transaction_job(conn, job_id, clean_db.begin)
    with clean_db.connect() as c:
        state, outcome = c.execute(text("SELECT state, outcome FROM job WHERE id = :id"),
                                   {"id": job_id}).one()
        written = c.execute(text("SELECT count(*) FROM resource_history")).scalar_one()
    assert state == "failed" and written == 0
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[1].resource.name[0].family"]

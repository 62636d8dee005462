"""Client-written FHIRPath runs in bounded time: regexes on RE2 (linear), string growth capped,
and a per-entry CPU budget that interrupts evaluation in any thread — directly, through the
synchronous API and inside an async batch on a real worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from core.errors import BadRequest, FhirError, Unprocessable
from core.fhir.fhirpath import bounded, evaluate
from core.fhir.patch import apply_fhirpath_patch, apply_json_patch
from tests.builders import send
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import WorkerProcess, job_id_of, submit, wait_job
from tests.test_patch import operation, parameters

# Python's `re` backtracks 2^29 ways on this before failing: minutes of CPU.
EVIL_REGEX = "^(a|a)*$"
EVIL_TEXT = "a" * 29 + "!"
# Four nested scans of every element: 10^7 steps or so, minutes without a budget.
SLOW_PATH = ("%context.descendants().all(%context.descendants().all(%context.descendants()"
             ".all(%context.descendants().count() > 0)))")
SLACK = 5.0  # seconds; the machine running the tests may be busy


def slow_patient(pid: str = "slow") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid,
            "name": [{"family": f"F{i}", "given": ["a", "b", "c"]} for i in range(12)]}


def test_matches_runs_in_linear_time() -> None:
    doc = {"resourceType": "Patient", "id": "p", "name": [{"family": EVIL_TEXT},
                                                          {"family": "a" * 30}]}
    t0 = time.monotonic()
    with bounded():
        found = evaluate(doc, f"Patient.name.where(family.matches('{EVIL_REGEX}')).family")
    assert [n.data for n in found] == ["a" * 30]
    assert time.monotonic() - t0 < 1
    with bounded():
        changed = evaluate(doc, "Patient.name.family.select(replaceMatches('^(a|a)*!$', 'x$1y'))")
    assert [getattr(n, "data", n) for n in changed] == ["xay", "a" * 30]


def test_regexes_that_need_backtracking_are_refused() -> None:
    doc = {"resourceType": "Patient", "id": "p", "name": [{"family": "aa"}]}
    with pytest.raises(BadRequest) as err, bounded():
        evaluate(doc, r"Patient.name.where(family.matches('(a)\\1'))", expression="X.path")
    assert "not supported" in err.value.diagnostics and err.value.expression == ["X.path"]


def test_replace_cannot_grow_a_string_exponentially() -> None:
    path = "Patient.id" + ".replace('', %context.id)" * 5
    started = time.monotonic()
    with pytest.raises(Unprocessable) as err, bounded():
        evaluate({"resourceType": "Patient", "id": "a" * 64}, path)
    assert err.value.code == "too-costly" and "FHIRQ_MAX_STRING_BYTES" in err.value.diagnostics
    assert time.monotonic() - started < 1


def steps(n: int) -> str:
    return "(" + "|".join(str(i) for i in range(n)) + ")"


@pytest.mark.parametrize("path", [
    f"{steps(40)}.aggregate($total.combine($total), 1)",
    f"{steps(40)}.aggregate($total & $total, 'ab')",
    f"{steps(40)}.aggregate($total + $total, 'ab')",
    # 131,072 references to one string (allowed), joined into 8 MB (not)
    f"{steps(17)}.aggregate($total.combine($total), %context.id).join('')",
])
def test_results_that_double_each_step_are_refused_before_they_are_built(path: str) -> None:
    """Each doubling is one C call that the time budget cannot interrupt: 40 of them would
    need terabytes."""
    started = time.monotonic()
    with pytest.raises(Unprocessable) as err, bounded():
        evaluate({"resourceType": "Patient", "id": "a" * 64}, path)
    assert err.value.code == "too-costly", err.value.diagnostics
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("in_thread", [False, True], ids=["main-thread", "other-thread"])
def test_the_budget_interrupts_evaluation(in_thread: bool) -> None:
    """Threads matter: the API serves requests from gthread threads, where signals never
    arrive."""
    patch = parameters(
        operation("replace", "Patient.name[0].family", value={"valueString": "ok"}),
        operation("replace", f"Patient.name.where({SLOW_PATH}).first().family",
                  value={"valueString": "never"}),
    )
    outcome: list[Any] = []

    def run() -> None:
        started = time.monotonic()
        try:
            with bounded(0.5):  # the budget of apply_fhirpath_patch inherits this one's clock
                apply_fhirpath_patch(slow_patient(), patch, expression="Bundle.entry[4].resource")
        except FhirError as exc:
            outcome.append((exc, time.monotonic() - started))

    if in_thread:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(60)
        assert not thread.is_alive()
    else:
        run()
    (err, took), = outcome
    assert (err.status, err.code) == (422, "too-costly"), err.diagnostics
    assert err.expression == ["Bundle.entry[4].resource.parameter[1]"]
    assert took < 0.5 + SLACK


def test_sync_patch_over_budget_is_a_422(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRQ_ENTRY_TIME_BUDGET", "0.5")
    assert send(client, "PUT", "/fhir/Patient/slow", slow_patient()).status_code == 201
    started = time.monotonic()
    r = send(client, "PATCH", "/fhir/Patient/slow", parameters(
        operation("delete", f"Patient.name.where({SLOW_PATH})")))
    assert time.monotonic() - started < 0.5 + SLACK
    assert r.status_code == 422, r.json
    issue = r.json["issue"][0]
    assert issue["code"] == "too-costly" and issue["expression"][0] == "Parameters.parameter[0]"
    r = send(client, "PATCH", "/fhir/Patient/slow", parameters(
        operation("replace", f"Patient.name.where(family.matches('{EVIL_REGEX}')).family",
                  value={"valueString": "x"})))
    assert time.monotonic() - started < 0.5 + 2 * SLACK
    assert r.status_code == 422 and "matches no element" in r.json["issue"][0]["diagnostics"]
    assert send(client, "GET", "/fhir/Patient/slow").json["meta"]["versionId"] == "1"


def test_async_batch_entry_over_budget_fails_alone(api: Any, worker: WorkerProcess) -> None:
    assert send(api, "PUT", "/fhir/Patient/slow", slow_patient()).status_code == 201
    assert send(api, "PUT", "/fhir/Patient/evil", {
        "resourceType": "Patient", "id": "evil", "name": [{"family": EVIL_TEXT}]}
    ).status_code == 201

    def patch(pid: str, *ops: dict[str, Any]) -> dict[str, Any]:
        return {"resource": parameters(*ops), "request": {"method": "PATCH", "url": pid}}

    bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
        patch("Patient/slow", operation("delete", f"Patient.name.where({SLOW_PATH})")),
        patch("Patient/evil", operation(
            "add", f"Patient.name.where(family.matches('{EVIL_REGEX}'))", name="text",
            value={"valueString": "x"})),
        {"resource": {"resourceType": "Patient", "id": "fine"},
         "request": {"method": "PUT", "url": "Patient/fine"}},
        patch("Patient/slow", operation("add", "Patient", name="gender",
                                        value={"valueCode": "male"})),
    ]}
    started = time.monotonic()
    job_id = job_id_of(submit(api, bundle))
    status = wait_job(api, job_id, timeout=2 + 30, worker=worker)
    took = time.monotonic() - started
    assert status["state"] == "completed" and status["counts"]["failed"] == 2, status
    entries = {e["index"]: e for e in api.get(f"/jobs/{job_id}/entries").json["entries"]}
    slow, evil = entries[0], entries[1]
    assert slow["status"] == 422, slow
    assert slow["outcome"]["issue"][0]["code"] == "too-costly"
    assert slow["outcome"]["issue"][0]["expression"] == ["Bundle.entry[0].resource.parameter[0]"]
    assert evil["status"] == 422 and "matches no element" in str(evil["outcome"])
    assert [entries[i]["status"] for i in (2, 3)] == [201, 200]
    assert send(api, "GET", "/fhir/Patient/slow").json["gender"] == "male"
    assert took < 2 + 30


def test_json_patch_copies_cannot_grow_the_resource_exponentially() -> None:
    doc = {"resourceType": "Patient", "id": "p", "contained": [
        {"resourceType": "Basic", "id": "b", "code": {"text": "x" * 100}}]}
    doubling = [{"op": "copy", "from": "/contained", "path": "/contained/-"}] * 40
    started = time.monotonic()
    with pytest.raises(Unprocessable) as err:
        apply_json_patch(doc, doubling, expression="Bundle.entry[1].resource")
    assert time.monotonic() - started < 2
    assert err.value.code == "too-costly" and "FHIRQ_SYNC_MAX_BYTES" in err.value.diagnostics
    assert err.value.expression == ["Bundle.entry[1].resource"]
    patched = apply_json_patch(doc, doubling[:3])
    assert len(patched["contained"]) == 4

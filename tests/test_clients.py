"""Real FHIR clients, unchanged, against a running fhirq: gunicorn serving the API and a Celery
worker running the jobs, on this test session's database and queue.

Python: fhirpy and fhirclient (SMART on FHIR), from the `test` extra. Node: fhir-kit-client and
MedplumClient from `@medplum/core`, pinned in tests/clients/package.json (installed there with
`npm ci` when missing); those tests skip only where node or npm is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import ApiServer, WorkerProcess, quiesce, scalar
from tests.store_sql import CURRENT

CLIENTS = Path(__file__).resolve().parent / "clients"
SYSTEM = "urn:fhirq:test"


@pytest.fixture(scope="module")
def server(jobs_env: dict[str, str], session_worker: WorkerProcess, engine: Engine
           ) -> Iterator[ApiServer]:
    # Jobs keep the chunk size they were accepted with: chunks of 500 keep a 6,000-entry
    # batch to a few seconds on the session's worker.
    srv = ApiServer({**jobs_env, "FHIRQ_CHUNK_SIZE": "500"}).start()
    yield srv
    srv.stop()
    quiesce(engine)


@pytest.fixture
def base(server: ApiServer, session_worker: WorkerProcess) -> str:
    if not session_worker.alive:  # a test elsewhere may have killed it
        session_worker.start()
    return f"{server.url}/fhir"


@pytest.fixture
def tag() -> str:
    return uuid.uuid4().hex[:12]


def count(engine: Engine, system: str, value_prefix: str) -> int:
    """Live Patients carrying an identifier of `system` whose value starts with the prefix."""
    return scalar(
        engine,
        f"SELECT count(*) FROM {CURRENT} r WHERE res_type = 'Patient' AND NOT deleted AND EXISTS ("
        "SELECT 1 FROM jsonb_array_elements(content->'identifier') i "
        "WHERE i->>'system' = :s AND i->>'value' LIKE :v)",
        s=system, v=value_prefix + "%",
    )


# --------------------------------------------------------------------------- fhirpy


def fhirpy_client(base: str) -> Any:
    from fhirpy import SyncFHIRClient

    return SyncFHIRClient(base)


def test_fhirpy_batch_and_transaction(base: str, engine: Engine, tag: str) -> None:
    client = fhirpy_client(base)
    batch = client.execute("", method="post", data={
        "resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Patient",
                          "identifier": [{"system": SYSTEM, "value": f"{tag}-{i}"}]},
             "request": {"method": "POST", "url": "Patient"}} for i in range(3)
        ] + [{"request": {"method": "GET", "url": "Patient/no-such-patient"}}],
    })
    assert batch["type"] == "batch-response"
    assert [e["response"]["status"][:3] for e in batch["entry"]] == ["201"] * 3 + ["404"]

    placeholder = f"urn:uuid:{uuid.uuid4()}"
    tx = client.execute("", method="post", data={
        "resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": placeholder,
             "resource": {"resourceType": "Patient",
                          "identifier": [{"system": SYSTEM, "value": f"{tag}-tx"}]},
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "status": "final",
                          "code": {"text": "weight"}, "subject": {"reference": placeholder}},
             "request": {"method": "POST", "url": "Observation"}},
        ],
    })
    assert tx["type"] == "transaction-response"
    patient, observation = (e["resource"] for e in tx["entry"])
    assert observation["subject"]["reference"] == f"Patient/{patient['id']}"
    assert count(engine, SYSTEM, tag) == 4


def test_fhirpy_crud_and_search(base: str, tag: str) -> None:
    client = fhirpy_client(base)
    patient = client.resource("Patient", identifier=[{"system": SYSTEM, "value": tag}],
                              name=[{"family": f"Py{tag}"}], gender="female")
    patient.save()
    assert patient.id and patient["meta"]["versionId"] == "1"
    patient["birthDate"] = "1980-02-03"
    patient.save()
    assert patient["meta"]["versionId"] == "2"

    found = client.resources("Patient").search(family=f"Py{tag}", gender="female").fetch_all()
    assert [p.id for p in found] == [patient.id]
    assert client.resources("Patient").search(identifier=f"{SYSTEM}|{tag}").count() == 1
    assert client.reference("Patient", patient.id).to_resource()["birthDate"] == "1980-02-03"

    patient.delete()
    from fhirpy.base.exceptions import ResourceNotFound

    with pytest.raises(ResourceNotFound):
        client.reference("Patient", patient.id).to_resource()


def test_fhirpy_conditional_update_and_delete(base: str, engine: Engine, tag: str) -> None:
    client = fhirpy_client(base)
    condition = {"identifier": f"{SYSTEM}|{tag}"}
    body = client.resource("Patient", identifier=[{"system": SYSTEM, "value": tag}],
                           name=[{"family": "First"}])
    created, was_created = client.resources("Patient").search(**condition).update(body)
    assert was_created and created["meta"]["versionId"] == "1"
    body["name"] = [{"family": "Second"}]
    updated, was_created = client.resources("Patient").search(**condition).update(body)
    assert not was_created
    assert (updated.id, updated["meta"]["versionId"]) == (created.id, "2")
    assert count(engine, SYSTEM, tag) == 1

    client.resources("Patient").search(**condition).delete()
    assert count(engine, SYSTEM, tag) == 0


def test_fhirpy_get_or_create_twice_makes_one_resource(base: str, engine: Engine,
                                                       tag: str) -> None:
    client = fhirpy_client(base)
    body = client.resource("Patient", identifier=[{"system": SYSTEM, "value": tag}])
    search = client.resources("Patient").search(identifier=f"{SYSTEM}|{tag}")
    first, first_created = search.get_or_create(body)
    again, again_created = search.get_or_create(body)
    assert (first_created, again_created) == (True, False)
    assert again.id == first.id
    assert count(engine, SYSTEM, tag) == 1


# --------------------------------------------------------------------------- fhirclient


def test_fhirclient_reads_capabilities_creates_reads_and_searches(base: str, tag: str) -> None:
    from fhirclient import client
    from fhirclient.models.humanname import HumanName
    from fhirclient.models.identifier import Identifier
    from fhirclient.models.patient import Patient

    smart = client.FHIRClient(settings={"app_id": "fhirq-tests", "api_base": base})
    # prepare() fetches /metadata and parses it with fhirclient's strict R4 models.
    smart.prepare()
    assert smart.server.capabilityStatement.fhirVersion == "4.0.1"

    patient = Patient()
    patient.identifier = [Identifier({"system": SYSTEM, "value": tag})]
    patient.name = [HumanName({"family": f"Smart{tag}", "given": ["Ann"]})]
    created = patient.create(smart.server)
    assert created["resourceType"] == "Patient" and created["meta"]["versionId"] == "1"

    read = Patient.read(created["id"], smart.server)
    assert read.name[0].family == f"Smart{tag}" and read.name[0].given == ["Ann"]

    found = Patient.where(struct={"identifier": f"{SYSTEM}|{tag}"}).perform_resources(
        smart.server)
    assert [p.id for p in found] == [created["id"]]

    read.gender = "other"
    assert read.update(smart.server)["meta"]["versionId"] == "2"


# --------------------------------------------------------------------------- node clients


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with tests/clients' packages installed from package-lock.json."""
    exe, npm = shutil.which("node"), shutil.which("npm")
    if exe is None or npm is None:
        pytest.skip("node and npm are needed for the node client tests (CI has Node 20)")
    if not (CLIENTS / "node_modules").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CLIENTS, check=True,
                       timeout=300)
    return exe


def run_node(node: str, script: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    proc = subprocess.run([node, script, *args], cwd=CLIENTS, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fhir_kit_client(node: str, base: str, engine: Engine, tag: str) -> None:
    seen = run_node(node, "fhirkit.mjs", base, tag)
    assert count(engine, f"{SYSTEM}:fhirkit", tag) == 2  # the deleted one is gone
    assert seen["patient"] != seen["transactionPatient"]


MEDPLUM_ENTRIES = 6000


def test_medplum_execute_batch_async_polls_to_the_result(
    node: str, base: str, server: ApiServer, engine: Engine, tag: str
) -> None:
    seen = run_node(node, "medplum.mjs", server.url, "fhir", tag, str(MEDPLUM_ENTRIES))
    polls = seen["polls"]
    # It polled through at least one 202 (the job was still at work) to the final 200, each
    # time at the status URL the 202 named.
    assert [p["status"] for p in polls][-1] == 200
    assert 202 in [p["status"] for p in polls], polls
    urls = {p["location"] for p in polls if p["status"] == 202}
    assert len(urls) == 1 and urls.pop().startswith(f"{base}/_async/")
    assert count(engine, f"{SYSTEM}:medplum", f"{tag}-") == MEDPLUM_ENTRIES + 1

"""`fhirq submit --wait`, `status`, `results`, `jobs` against a real API server and worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from sqlalchemy import Engine

from cli.main import cli
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import ApiServer, WorkerProcess, patients_batch, scalar


@pytest.fixture
def server(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[str]:
    srv = ApiServer(jobs_env).start()
    yield srv.url
    srv.stop()


def fhirq(server: str, *args: str) -> Any:
    result = CliRunner().invoke(cli, [*args[:1], "--server", server, *args[1:]])
    return result


def test_submit_wait_status_results_jobs(server: str, worker: WorkerProcess, clean_db: Engine,
                                         tmp_path: Path) -> None:
    body = patients_batch(150, "cli")
    body["entry"][42]["request"]["method"] = "FETCH"
    bundle_file = tmp_path / "batch.json"
    bundle_file.write_bytes(orjson.dumps(body))
    ndjson_file = tmp_path / "load.ndjson"
    ndjson_file.write_bytes(b"\n".join(
        orjson.dumps({"resourceType": "Patient", "id": f"nd-{i}"}) for i in range(20)))

    r = fhirq(server, "submit", str(bundle_file), str(ndjson_file), "--wait")
    assert r.exit_code == 0, r.output
    batch_id, ndjson_id = r.stdout.split()
    assert "149 succeeded, 1 failed" in r.output
    assert scalar(clean_db, "SELECT count(*) FROM resource") == 169

    r = fhirq(server, "status", batch_id)
    assert r.exit_code == 0 and orjson.loads(r.stdout)["counts"]["failed"] == 1

    r = fhirq(server, "results", batch_id, "--failed")
    lines = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [(x["index"], x["status"]) for x in lines] == [(42, 400)]

    r = fhirq(server, "results", ndjson_id, "--page-size", "7")
    assert [orjson.loads(x)["index"] for x in r.stdout.splitlines()] == list(range(20))

    r = fhirq(server, "results", ndjson_id, "--bundle")
    assert [x["id"] for x in orjson.loads(r.stdout)] == [f"nd-{i}" for i in range(20)]

    r = fhirq(server, "jobs")
    assert r.exit_code == 0 and batch_id[:8] in r.stdout and ndjson_id[:8] in r.stdout

    r = fhirq(server, "status", "no-such-job")
    assert r.exit_code != 0 and "404" in r.output

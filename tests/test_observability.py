"""Operations: `/metrics` (jobs, entries, entries/s, queue depth, latency) after real jobs ran,
structured logs carrying the job id (formatter and context, a real worker's stderr, a real
gunicorn's), and the `/ui` jobs page."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine, text

from core.config import get_settings
from core.logging import JsonFormatter, TextFormatter, bind, configure_logging, log_context, reset
from core.metrics import RATE_SAMPLE, JobsCollector
from tests.builders import patient, post, transaction
from tests.conftest import BROKER_URL, REDIS_URL
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    ROOT,
    WorkerProcess,
    job_id_of,
    patients_batch,
    submit,
    wait_for,
    wait_job,
)
from worker.broker import RedisBroker, broker_for, kind_of, queue_keys

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def scrape(client: Any) -> Samples:
    r = client.get("/metrics", buffered=True)
    assert r.status_code == 200
    assert r.content_type.startswith("text/plain; version=0.0.4")
    return samples(r.get_data(as_text=True))


def value(s: Samples, name: str, **labels: str) -> float:
    return s[(name, frozenset(labels.items()))]


def collect(collector: JobsCollector) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in collector.collect() for s in family.samples}


# --------------------------------------------------------------------------- /metrics


def test_metrics_after_jobs_ran(api: Any, worker: WorkerProcess, clean_db: Engine) -> None:
    batch = job_id_of(submit(api, patients_batch(120, "m", bad=(7, 99))))
    failing = transaction(post(patient("Ok")), post(patient("Bad", birthDate="not-a-date")))
    tx = job_id_of(submit(api, failing))
    assert wait_job(api, batch, worker=worker)["state"] == "completed"
    assert wait_job(api, tx, worker=worker)["state"] == "failed"
    # An active job that no worker has picked up yet, submitted 30 s ago.
    with clean_db.begin() as c:
        c.execute(text(
            "INSERT INTO job (id, owner, kind, state, base_url, chunk_size, total, created_at) "
            "VALUES ('waiting', 'someone', 'batch', 'accepted', 'http://x/fhir', 50, 5, "
            "now() - interval '30 seconds')"
        ))

    s = scrape(api)
    jobs = {state: value(s, "fhirq_jobs", state=state)
            for state in ("accepted", "running", "completed", "failed", "cancelled")}
    assert jobs == {"accepted": 1, "running": 0, "completed": 1, "failed": 1, "cancelled": 0}
    # The batch: 118 + 2 failed; the transaction: its failing entry only (nothing else ran).
    assert value(s, "fhirq_job_entries", state="succeeded") == 118
    assert value(s, "fhirq_job_entries", state="failed") == 3
    assert value(s, "fhirq_job_entries", state="pending") == 5
    assert value(s, "fhirq_entries_per_second") == pytest.approx(121 / 60)
    assert 29 <= value(s, "fhirq_job_oldest_active_seconds") < 60
    assert value(s, "fhirq_queue_depth", queue=get_settings().queue) >= 0
    assert value(s, "fhirq_metrics_source_up", source="postgresql") == 1
    assert value(s, "fhirq_metrics_source_up", source=kind_of(BROKER_URL)) == 1


def test_rate_counts_the_latest_entries_through_the_index(clean_db: Engine) -> None:
    """Past RATE_SAMPLE entries in the minute, the rate is taken over the latest ones: 10,050
    entries finished 2 ms apart → 500 entries/s, read from RATE_SAMPLE index entries."""
    n = RATE_SAMPLE + 50
    with clean_db.begin() as c:
        c.execute(text(
            "INSERT INTO job (id, owner, kind, state, base_url, chunk_size, total, done) "
            "VALUES ('busy', 'o', 'batch', 'running', 'http://x/fhir', 500, :n, :n)"
        ), {"n": n})
        c.execute(text(
            "INSERT INTO job_result (job_id, idx, status, finished_at) "
            "SELECT 'busy', i, 201, now() - i * interval '2 milliseconds' "
            "FROM generate_series(0, :last) i"
        ), {"last": n - 1})
        c.execute(text("ANALYZE job_result"))
    s = collect(JobsCollector(get_settings(), lambda: clean_db, broker_for(REDIS_URL)))
    assert value(s, "fhirq_entries_per_second") == pytest.approx(500, rel=0.1)

    from core.metrics import _RECENT

    with clean_db.connect() as c:
        plan = "\n".join(r[0] for r in c.execute(
            text("EXPLAIN " + _RECENT), {"window": 60, "sample": RATE_SAMPLE}))
    assert "ix_job_result_finished" in plan and "Seq Scan" not in plan, plan


def test_queue_depth_counts_every_priority_list_of_the_queue() -> None:
    queue = f"fhirq-metrics-{os.getpid()}"
    broker = RedisBroker(REDIS_URL)
    keys = queue_keys(queue)
    try:
        broker.client.lpush(keys[0], "a", "b", "c")
        broker.client.lpush(keys[2], "d")  # a message sent with priority 6
        settings = replace(get_settings(), queue=queue)
        s = collect(JobsCollector(settings, lambda: create_engine("postgresql://nobody@x/y"),
                                  broker))
        assert value(s, "fhirq_queue_depth", queue=queue) == 4
        assert value(s, "fhirq_metrics_source_up", source="redis") == 1
    finally:
        broker.delete(queue)


def test_a_source_down_is_reported_and_the_rest_still_scraped(clean_db: Engine) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    no_db = create_engine(f"postgresql+psycopg2://root@127.0.0.1:{port}/x")
    settings = get_settings()
    s = collect(JobsCollector(settings, lambda: no_db, broker_for(REDIS_URL)))
    assert value(s, "fhirq_metrics_source_up", source="postgresql") == 0
    assert not any(name == "fhirq_jobs" for name, _ in s)
    assert value(s, "fhirq_metrics_source_up", source="redis") == 1

    s = collect(JobsCollector(settings, lambda: clean_db,
                              broker_for(f"redis://127.0.0.1:{port}/0")))
    assert value(s, "fhirq_metrics_source_up", source="redis") == 0
    assert value(s, "fhirq_jobs", state="completed") == 0

    s = collect(JobsCollector(settings, lambda: clean_db,
                              broker_for(f"amqp://guest:guest@127.0.0.1:{port}//")))
    assert value(s, "fhirq_metrics_source_up", source="rabbitmq") == 0
    assert value(s, "fhirq_jobs", state="completed") == 0


def test_request_latency_histogram_by_route_template(api: Any) -> None:
    def count(s: Samples, route: str, status: str) -> float:
        key = ("fhirq_http_request_duration_seconds_count",
               frozenset({"method": "GET", "route": route, "status": status}.items()))
        return s.get(key, 0.0)

    before = scrape(api)
    for _ in range(3):
        assert api.get("/jobs", buffered=True).status_code == 200
    api.get("/jobs/nope-1", buffered=True)
    api.get("/jobs/nope-2", buffered=True)
    after = scrape(api)
    assert count(after, "/jobs", "200") - count(before, "/jobs", "200") == 3
    # One series for every job id: the route's template, not its URL.
    assert count(after, "/jobs/<job_id>", "404") - count(before, "/jobs/<job_id>", "404") == 2


def test_ui_is_open_and_metrics_needs_a_scrape_token_when_auth_is_required(
    clean_db: Engine,
) -> None:
    from api import create_app

    app = create_app(replace(get_settings(), auth="required", metrics_token="scrape-secret"))
    client = app.test_client()
    assert client.get("/ui", buffered=True).status_code == 200
    assert client.get("/jobs", buffered=True).status_code == 401
    # It counts every owner's jobs: tests/test_auth_matrix.py covers who may scrape.
    assert client.get("/metrics", buffered=True).status_code == 401
    scraped = client.get("/metrics", buffered=True,
                         headers={"Authorization": "Bearer scrape-secret"})
    assert scraped.status_code == 200 and b"fhirq_jobs" in scraped.data


# --------------------------------------------------------------------------- a real gunicorn


@pytest.fixture
def gunicorn(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[dict[str, Any]]:
    """Two gunicorn worker processes in prometheus_client's multiprocess mode."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prom_dir = tempfile.mkdtemp(prefix="fhirq-prom-")
    stderr = Path(prom_dir).with_suffix(".log")
    env = {**os.environ, **jobs_env, "PROMETHEUS_MULTIPROC_DIR": prom_dir,
           "FHIRQ_LOG_FORMAT": "json"}
    argv = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "2",
            "api.wsgi:app"]
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "gunicorn", on_timeout=stderr.read_text)
        yield {"url": url, "dir": Path(prom_dir), "stderr": stderr}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        for f in Path(prom_dir).iterdir():
            f.unlink()
        os.rmdir(prom_dir)
        stderr.unlink(missing_ok=True)


def test_multiprocess_latency_and_json_access_log(gunicorn: dict[str, Any]) -> None:
    url = gunicorn["url"]
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}

    def healthz_count() -> float:
        s = samples(httpx.get(f"{url}/metrics").text)
        return value(s, "fhirq_http_request_duration_seconds_count", **healthz)

    before, sent = healthz_count(), 0
    # New connections until both processes have served some (the kernel spreads accepts).
    while sent < 20 or len(list(gunicorn["dir"].glob("histogram_*.db"))) < 2 and sent < 300:
        assert httpx.get(f"{url}/healthz").status_code == 200
        sent += 1
    assert len(list(gunicorn["dir"].glob("histogram_*.db"))) == 2
    assert healthz_count() - before == sent  # summed over both processes
    missing = httpx.get(f"{url}/jobs/not-a-job")
    assert missing.status_code == 404

    s = samples(httpx.get(f"{url}/metrics").text)
    assert value(s, "fhirq_jobs", state="completed") == 0

    def access_line() -> dict[str, Any] | None:
        for line in gunicorn["stderr"].read_text().splitlines():
            if line.startswith("{") and "/jobs/not-a-job" in line:
                return orjson.loads(line)
        return None

    record = wait_for(access_line, 10, "the access log line")
    assert record["logger"] == "api.access" and record["level"] == "INFO"
    assert record["message"].startswith("GET /jobs/not-a-job 404 ")
    assert record["route"] == "/jobs/<job_id>" and record["status"] == 404
    assert record["job_id"] == "not-a-job"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])


# --------------------------------------------------------------------------- logs


def _record(msg: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("fhirq.test").makeRecord(
        "fhirq.test", logging.INFO, __file__, 1, msg, args or ("world",), None, extra=extra)
    return record


def test_json_lines_carry_the_context_of_their_creation() -> None:
    with log_context(job_id="j1", task="fhirq.chunk"):
        token = bind(chunk=100, entries=50)
        inner = _record()
        reset(token)
        outer = _record(status=201)
    after = _record()

    line = JsonFormatter().format(inner)  # formatted later, elsewhere: context kept
    assert "\n" not in line
    body = orjson.loads(line)
    assert body["message"] == "hello world" and body["level"] == "INFO"
    assert body["logger"] == "fhirq.test" and body["time"].endswith("Z")
    assert {k: body[k] for k in ("job_id", "chunk", "entries", "task")} == {
        "job_id": "j1", "chunk": 100, "entries": 50, "task": "fhirq.chunk"}
    assert orjson.loads(JsonFormatter().format(outer)) | {"time": 0, "pid": 0} == {
        "time": 0, "level": "INFO", "logger": "fhirq.test", "message": "hello world",
        "job_id": "j1", "task": "fhirq.chunk", "status": 201, "pid": 0}
    assert "job_id" not in orjson.loads(JsonFormatter().format(after))


def test_json_line_of_an_exception_and_of_odd_extras() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info(),
            extra={"data": {"when": object()}})
    body = orjson.loads(JsonFormatter().format(record))
    assert body["exception"].startswith("Traceback") and "ValueError: boom" in body["exception"]
    assert body["data"]["when"].startswith("<object object")


def test_text_lines_for_people() -> None:
    with log_context(job_id="j2", chunk=0):
        record = _record()
    line = TextFormatter().format(record)
    assert re.fullmatch(r"\S+Z INFO +fhirq\.test \[job_id=j2 chunk=0\] hello world", line), line


def test_configure_logging_is_idempotent_and_keeps_other_handlers() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        configure_logging("text", "WARNING")
        configure_logging("json", "DEBUG")
        ours = [h for h in root.handlers if h not in saved_handlers]
        kept = [h for h in saved_handlers if h in root.handlers]
        assert len(ours) <= 1 and kept == saved_handlers
        handler = next(h for h in root.handlers if type(h).__name__ == "_StderrHandler")
        assert isinstance(handler.formatter, JsonFormatter)
        assert root.level == logging.DEBUG
        with pytest.raises(ValueError):
            configure_logging("xml")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_api_job_routes_bind_the_job_id(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("api.test")
    client.application.add_url_rule("/jobs/<job_id>/probe", "probe",
                                    lambda job_id: (log.info("probing"), "ok")[1])
    caplog.set_level(logging.INFO)
    client.get("/jobs/some-job", buffered=True)
    client.get("/fhir/_async/other-job", buffered=True)
    access = [r for r in caplog.records if r.name == "api.access"]
    assert [orjson.loads(JsonFormatter().format(r))["job_id"] for r in access] == [
        "some-job", "other-job"]

    caplog.clear()
    client.get("/jobs/j-42/probe", buffered=True)
    (probe,) = [r for r in caplog.records if r.name == "api.test"]
    assert orjson.loads(JsonFormatter().format(probe))["job_id"] == "j-42"
    client.get("/healthz", buffered=True)  # the binding ended with its request
    assert "job_id" not in orjson.loads(JsonFormatter().format(_record()))


def test_a_real_workers_log_lines_are_json_with_the_job_id(api: Any, worker: WorkerProcess
                                                           ) -> None:
    job_id = job_id_of(submit(api, patients_batch(60, "log")))
    wait_job(api, job_id, worker=worker)

    def records() -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in worker.log.read_text(errors="replace").splitlines()
                if line.startswith("{")]

    def of_job() -> list[dict[str, Any]] | None:
        found = [r for r in records() if r.get("job_id") == job_id]
        done = [r for r in found if "succeeded" in r["message"]]
        # The reaper (every second here) runs in the same pool processes after the chunks.
        reaped = [r for r in records() if r.get("task") == "fhirq.reap"
                  and r["time"] > max(r["time"] for r in done)] if done else []
        return found if done and reaped else None

    def mentions() -> str:
        return "\n".join(line for line in worker.log.read_text(errors="replace").splitlines()
                         if job_id in line) or worker.tail()

    try:
        found = wait_for(of_job, 60, "the worker's log lines of the job", on_timeout=mentions)
    except AssertionError:
        if job_id not in worker.log.read_text(errors="replace"):
            # Not one line of this worker names the job, not even Celery's "received" line with
            # its arguments: another consumer of the session's queue ran it (seen on a busy
            # machine). That says nothing about the log format, which is what is tested here.
            pytest.skip("the job ran in another worker process of this session")
        raise
    for r in found:
        assert {"time", "level", "logger", "message", "job_id", "pid"} <= r.keys()
    chunks = [r for r in found if r["logger"] == "celery.app.trace"]
    assert {r["task"] for r in chunks} == {"fhirq.chunk"}
    assert all(r["task_id"] for r in chunks)
    # The job id ends with its task: the reaper's lines, in the same processes, have none.
    assert not [r for r in records() if r.get("task") == "fhirq.reap" and "job_id" in r]
    # Celery's own lines are JSON too.
    lines = worker.log.read_text(errors="replace").splitlines()
    assert any(line.startswith("{") and "ready." in line for line in lines)
    assert not [line for line in lines if line.startswith("[") and "INFO" in line]


# --------------------------------------------------------------------------- /ui


def test_ui_is_one_page_that_polls_the_jobs_api(client: Any) -> None:
    r = client.get("/ui", buffered=True)
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert 'api("jobs?_count=50"' in page  # relative: works behind a path prefix too
    assert "sessionStorage" in page and '"Bearer "' in page
    assert "http://" not in page and "https://" not in page  # no CDN: the network may be closed
    # The CSP allows exactly the page's inline script and style.
    csp = r.headers["Content-Security-Policy"]
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert client.get("/ui/", buffered=True).status_code == 404

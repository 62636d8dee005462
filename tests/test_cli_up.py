"""`fhirq up` end to end on the embedded default: it starts real PostgreSQL, Redis, gunicorn and
Celery, answers /healthz and /readyz, prints how to use it, stops on SIGTERM leaving no process
behind, and finds its data again on the next start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import psutil
import psycopg2
import pytest
import redis

from cli.up import curl_example, is_loopback
from runtime import embedded, procutil

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 60
STOP_TIMEOUT = 45


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_without_fhirq() -> dict[str, str]:
    # The test session exports FHIRQ_DATABASE_URL for its own database; `up` must be on the
    # embedded default here, as on a fresh machine.
    return {k: v for k, v in os.environ.items() if not k.startswith("FHIRQ_")}


def _fhirq(*args: str) -> list[str]:
    # `python -m cli.main` from the repository root: the source tree under test, not whichever
    # copy a `fhirq` script on PATH would import.
    return [sys.executable, "-m", "cli.main", *args]


@contextmanager
def _up(data_dir: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    argv = _fhirq(
        "up", "--data-dir", str(data_dir), "--port", str(port),
        "--api-workers", "1", "--concurrency", "1",
    )  # fmt: skip
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=_env_without_fhirq(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        # Only reached with the process still up when the test failed: leave nothing behind.
        if proc.poll() is None:
            procutil.terminate_tree(proc.pid, timeout=10)
            proc.wait()
        embedded.stop_redis(data_dir)
        embedded.stop_postgres(data_dir)


def _wait_ready(proc: subprocess.Popen[bytes], base: str, log: Path) -> None:
    """Until /healthz answers and `fhirq up` has printed its banner (it prints it after its own
    health check, which can come a moment after ours)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"fhirq up exited early:\n{log.read_text()[-3000:]}"
        try:
            healthy = httpx.get(f"{base}/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy and "fhirq is up" in log.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"fhirq up not healthy in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def _processes(proc: subprocess.Popen[bytes], data_dir: Path) -> list[psutil.Process]:
    return procutil.tree(proc.pid) + embedded.server_processes(data_dir)


def _kinds(procs: list[psutil.Process]) -> set[str]:
    kinds = set()
    for p in procs:
        line = " ".join(p.cmdline())
        for kind in ("postgres", "redis-server", "gunicorn", "celery"):
            if kind in line:
                kinds.add(kind)
    return kinds


def _stop(proc: subprocess.Popen[bytes], procs: list[psutil.Process], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=STOP_TIMEOUT)
    assert status == 0, log.read_text()[-3000:]
    left = procutil.wait_gone(procs, 5)
    assert left == [], [" ".join(p.cmdline()) for p in left]


def test_up_serves_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"

    with _up(data_dir, port, log) as up:
        _wait_ready(up, base, log)
        assert httpx.get(f"{base}/readyz", timeout=5, trust_env=False).status_code == 200
        # No authentication on loopback: /metrics, with the summed latency histograms, is open.
        scrape = httpx.get(f"{base}/metrics", timeout=10, trust_env=False)
        assert scrape.status_code == 200
        assert "fhirq_http_request_duration_seconds_count" in scrape.text
        output = log.read_text()
        assert f"{base}/fhir" in output
        assert f"curl -s -X POST {base}/fhir" in output
        assert "loopback" in output

        procs = _processes(up, data_dir)
        assert _kinds(procs) == {"postgres", "redis-server", "gunicorn", "celery"}
        db_url = embedded.postgres_url(data_dir)
        assert db_url is not None
        with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE up_marker (note text)")
            cur.execute("INSERT INTO up_marker VALUES ('kept')")
        conn.close()
        broker = redis.Redis(unix_socket_path=str(embedded.redis_socket(data_dir)))
        broker.set("fhirq:test:up-marker", "kept")
        broker.close()

        # The other commands find this server and its database through the data directory.
        record = orjson.loads((data_dir / "fhirq-up.json").read_bytes())
        assert record["server"] == base and record["auth"] == "off"
        found_env = {**_env_without_fhirq(), "FHIRQ_DATA_DIR": str(data_dir)}
        listed = subprocess.run(_fhirq("jobs", "--json"), cwd=ROOT, env=found_env,
                                capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert orjson.loads(listed.stdout) == []
        slots = subprocess.run(_fhirq("slots", "generate", "--dry-run"), cwd=ROOT,
                               env=found_env, capture_output=True, text=True, timeout=60)
        assert slots.returncode == 0, slots.stderr

        _stop(up, procs, log)
        assert "fhirq: stopped" in log.read_text()
        assert not (data_dir / "fhirq-up.json").exists()

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with _up(data_dir, port, log) as up:
        _wait_ready(up, base, log)
        assert httpx.get(f"{base}/readyz", timeout=5, trust_env=False).status_code == 200
        procs = _processes(up, data_dir)
        db_url = embedded.postgres_url(data_dir)
        assert db_url is not None
        with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT note FROM up_marker")
            assert cur.fetchall() == [("kept",)]
        conn.close()
        broker = redis.Redis(unix_socket_path=str(embedded.redis_socket(data_dir)))
        assert broker.get("fhirq:test:up-marker") == b"kept"
        broker.close()
        _stop(up, procs, log)


def _main_process(up: subprocess.Popen[bytes], word: str) -> psutil.Process:
    """The child of `fhirq up` whose command line has `word` (gunicorn's master, celery's main)."""
    for child in psutil.Process(up.pid).children():
        if word in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no {word} child of fhirq up")


def _wait_log(log: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_up_restarts_a_dead_worker_api_and_redis(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with _up(data_dir, port, log) as up:
        _wait_ready(up, base, log)

        worker = _main_process(up, "celery")
        worker.kill()
        _wait_log(log, "fhirq: worker stopped unexpectedly; restarting it in 1 s")
        _wait_log(log, "fhirq: worker restarted")

        api = _main_process(up, "gunicorn")
        api.kill()
        _wait_log(log, "fhirq: API restarted")
        _wait_ready(up, base, log)  # the banner is in the log already: /healthz again

        # The embedded Redis killed: started again on the same socket; the others reconnect.
        redis_server = next(p for p in embedded.server_processes(data_dir)
                            if "redis-server" in " ".join(p.cmdline()))
        redis_server.kill()
        _wait_log(log, "fhirq: Redis restarted")

        # The restarted worker runs jobs.
        body = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": {"resourceType": "Patient"}, "request": {"method": "POST",
                                                                  "url": "Patient"}}]}
        r = httpx.post(f"{base}/fhir", json=body, trust_env=False, timeout=30,
                       headers={"Prefer": "respond-async"})
        assert r.status_code == 202, r.text
        job = r.headers["X-Job-Id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/jobs/{job}", trust_env=False).json()["state"] != "completed":
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        assert up.poll() is None
        _stop(up, _processes(up, data_dir), log)


def test_up_refuses_a_non_loopback_host_and_starts_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = subprocess.run(
        _fhirq("up", "--host", "0.0.0.0", "--data-dir", str(data_dir)),
        cwd=ROOT,
        env=_env_without_fhirq(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "loopback" in result.stderr
    assert not (data_dir / "postgres").exists()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_curl_example_posts_a_valid_transaction_bundle() -> None:
    command = curl_example("http://127.0.0.1:8080/fhir")
    body = json.loads(command.split("-d '", 1)[1].rstrip("'"))
    assert body["resourceType"] == "Bundle"
    assert body["type"] == "transaction"
    assert [e["request"]["method"] for e in body["entry"]] == ["POST", "POST"]
    placeholder = body["entry"][0]["fullUrl"]
    assert body["entry"][1]["resource"]["subject"]["reference"] == placeholder


@pytest.mark.parametrize("depth", [1, 40])
def test_redis_socket_fits_the_unix_socket_limit(tmp_path: Path, depth: int) -> None:
    data_dir = tmp_path.joinpath(*["d" * 8] * depth)
    sock = embedded.redis_socket(data_dir)
    assert len(os.fsencode(sock)) <= 107
    assert sock == embedded.redis_socket(data_dir)  # stable: a restart finds the same socket
    if depth == 1:
        assert sock.is_relative_to(data_dir)


def test_db_upgrade_migrates_the_configured_database(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    monkeypatch.setenv("FHIRQ_DATABASE_URL", db_url)
    result = CliRunner().invoke(cli, ["db", "upgrade"])
    assert result.exit_code == 0, result.output
    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT version_num FROM alembic_version")
        assert cur.fetchone() is not None
    conn.close()


def test_extension_modules_add_subcommands(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    import click

    from cli import main

    module = types.ModuleType("cli.example_commands")

    def register(group: click.Group) -> None:
        @group.command("hello")
        def hello() -> None:
            click.echo("hello from an extension")

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cli.example_commands", module)
    monkeypatch.setattr(main, "EXTENSIONS", ("cli.example_commands", "cli.not_written_yet"))
    group = click.Group("fhirq")
    main._register_extensions(group)
    assert list(group.commands) == ["hello"]

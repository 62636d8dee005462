"""The client commands as a newcomer meets them: they find the server `fhirq up` started, take
job ids by prefix (or none: the latest), fit an 80-column terminal, and fail with one line and
a documented exit status instead of a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text

from cli.api_client import EXIT_INTERRUPTED, EXIT_NOT_FOUND, EXIT_UNREACHABLE
from cli.jobs_commands import compact
from cli.main import cli
from runtime import running
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import ROOT, ApiServer, WorkerProcess, patients_batch, scalar


@pytest.fixture
def server(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[str]:
    srv = ApiServer(jobs_env).start()
    yield srv.url
    srv.stop()


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def test_compact_numbers() -> None:
    assert [compact(n) for n in (0, 950, 1000, 12_345, 50_000, 999_999, 1_250_000)] == [
        "0", "950", "1k", "12.3k", "50k", "1000k", "1.2M"]


def test_server_down_is_one_line_and_exit_3(tmp_path: Path) -> None:
    env = {"FHIRQ_DATA_DIR": str(tmp_path), "FHIRQ_SERVER": ""}
    for args in (["jobs"], ["status", "abcdef12"], ["results"], ["wait"]):
        r = run(*args, "--server", "http://127.0.0.1:9", env=env)
        assert r.exit_code == EXIT_UNREACHABLE, (args, r.output)
        assert "Traceback" not in r.output and isinstance(r.exception, SystemExit)
        assert "cannot reach fhirq at http://127.0.0.1:9" in r.output
        assert "fhirq up" in r.output


def test_commands_find_the_server_fhirq_up_recorded(server: str, worker: WorkerProcess,
                                                    tmp_path: Path) -> None:
    env = {"FHIRQ_DATA_DIR": str(tmp_path), "FHIRQ_SERVER": ""}
    bundle = tmp_path / "b.json"
    bundle.write_bytes(orjson.dumps(patients_batch(3, "found")))

    # Nothing recorded: the default server, where nothing listens in this test.
    assert running.find(tmp_path) is None

    running.record(tmp_path, running.RunningStack(pid=os.getpid(), server=server, auth="off",
                                                  database_url=None))
    assert (tmp_path / "fhirq-up.json").stat().st_mode & 0o077 == 0
    r = run("submit", str(bundle), "--wait", env=env)
    assert r.exit_code == 0, r.output
    job_id = r.stdout.split()[0]
    r = run("status", env=env)  # no id: the latest job
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["id"] == job_id

    # A record left by a `fhirq up` that is gone is ignored.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    running.record(tmp_path, running.RunningStack(pid=dead.pid, server=server, auth="off",
                                                  database_url=None))
    assert running.find(tmp_path) is None


def test_ids_by_prefix_latest_by_default_and_tables_that_fit(
        server: str, worker: WorkerProcess, clean_db: Engine, tmp_path: Path) -> None:
    bundle = tmp_path / "b.json"
    body = patients_batch(30, "prefix", bad=(4,))
    bundle.write_bytes(orjson.dumps(body))
    ids = []
    for _ in range(3):
        r = run("submit", str(bundle), "--wait", "--server", server)
        assert r.exit_code == 0, r.output  # completed, one entry failed
        ids.append(r.stdout.split()[0])
    assert "fhirq results" in r.output and "--failed" in r.output

    r = run("status", ids[0][:8], "--server", server)
    assert r.exit_code == 0, r.output
    assert orjson.loads(r.stdout)["id"] == ids[0]
    r = run("status", ids[0][:5], "--server", server)  # shorter than 6: not a prefix
    assert r.exit_code == EXIT_NOT_FOUND, r.output
    r = run("results", "--failed", "--server", server)  # the latest job
    assert r.exit_code == 0, r.output
    assert [orjson.loads(x)["index"] for x in r.stdout.splitlines()] == [4]
    r = run("results", ids[1][:6], "--failed", "--server", server)
    assert r.exit_code == 0 and orjson.loads(r.stdout.splitlines()[0])["index"] == 4

    r = run("jobs", "--server", server)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), r.stdout
    assert "…" not in r.stdout
    assert all(any(i[:8] in line for line in lines) for i in ids)
    assert "30/30" in r.stdout

    r = run("jobs", "--wide", "--server", server)
    assert r.exit_code == 0 and all(i in r.stdout for i in ids)
    r = run("jobs", "--json", "--server", server)
    assert r.exit_code == 0
    assert {j["id"] for j in orjson.loads(r.stdout)} == set(ids)
    assert scalar(clean_db, "SELECT count(*) FROM job") == 3


def _wait_in_subprocess(server: str, job_id: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FHIRQ_SERVER": server}
    proc = subprocess.Popen([sys.executable, "-m", "cli", "wait", job_id[:8], *extra], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    seen = b""
    while b"Ctrl-C" not in seen:  # it found the job and follows it; the job never moves
        line = proc.stderr.readline()
        assert line, f"wait ended early: {seen.decode(errors='replace')}"
        seen += line
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    err = seen + err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _idle(engine: Engine, job_id: str) -> None:
    """Dated in the future, the job looks busy to every reaper: nobody runs it."""
    with engine.begin() as c:
        c.execute(text("UPDATE job SET updated_at = now() + interval '1 hour' WHERE id = :id"),
                  {"id": job_id})


def test_ctrl_c_while_waiting_says_the_job_keeps_running(
        jobs_env: dict[str, str], clean_db: Engine, tmp_path: Path) -> None:
    # The server queues its jobs where no worker listens, and no reaper revives them.
    srv = ApiServer({**jobs_env, "FHIRQ_QUEUE": f"fhirq-test-nobody-{os.getpid()}"}).start()
    try:
        bundle = tmp_path / "b.json"
        bundle.write_bytes(orjson.dumps(patients_batch(3, "ctrl-c")))
        job_ids = []
        for _ in range(2):
            r = run("submit", str(bundle), "--server", srv.url)
            assert r.exit_code == 0, r.output
            job_ids.append(r.stdout.strip())
            _idle(clean_db, job_ids[-1])

        done = _wait_in_subprocess(srv.url, job_ids[0])
        err = done.stderr.decode()
        assert done.returncode == EXIT_INTERRUPTED, err
        assert "Traceback" not in err and "keeps running" in err
        assert f"fhirq wait {job_ids[0]}" in err
        assert scalar(clean_db, "SELECT state FROM job WHERE id = :id", id=job_ids[0]) == (
            "accepted")

        done = _wait_in_subprocess(srv.url, job_ids[1], "--cancel-on-interrupt")
        assert done.returncode == EXIT_INTERRUPTED, done.stderr.decode()
        assert "cancelled" in done.stderr.decode()
        assert scalar(clean_db, "SELECT state FROM job WHERE id = :id", id=job_ids[1]) == (
            "cancelled")
        assert run("cancel", job_ids[0][:8], "--server", srv.url).exit_code == 0
    finally:
        srv.stop()

"""The jobs page `/ui` in a real headless Chromium against a real API and worker: what a person
sees once its script has run (failures visible even when few, rates only where they mean
something, a job page with the failed entries and their OperationOutcomes).

Skipped with a reason where no Chromium is installed (Debian's `chromium` package; .ci/run
installs it)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import Engine

from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import ApiServer, WorkerProcess, patients_batch, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt install "
                                "chromium)")


@pytest.fixture
def server(jobs_env: dict[str, str], clean_db: Engine) -> Iterator[str]:
    srv = ApiServer(jobs_env).start()
    yield srv.url
    srv.stop()


def _submit(server: str, body: dict) -> str:
    r = httpx.post(f"{server}/fhir", content=orjson.dumps(body), timeout=60,
                   headers={"Content-Type": "application/fhir+json",
                            "Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    return r.headers["X-Job-Id"]


def _ended(server: str, job_id: str) -> bool:
    return httpx.get(f"{server}/jobs/{job_id}").json()["state"] in ("completed", "failed")


def _dom(url: str, tmp_path: Path, screenshot: str | None = None) -> str:
    """The page's DOM after its script has fetched and drawn (virtual time runs the timers)."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900",
            "--virtual-time-budget=6000"]
    if screenshot:
        argv.append(f"--screenshot={tmp_path / screenshot}")
    else:
        argv.append("--dump-dom")
    done = subprocess.run([*argv, url], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode()


def _row(dom: str, job_id: str) -> str:
    match = re.search(rf'<tr data-job="{job_id}">(.*?)</tr>', dom, re.DOTALL)
    assert match, f"no row for job {job_id} in:\n{dom[-3000:]}"
    return match.group(1)


def test_the_jobs_page_in_a_browser(server: str, worker: WorkerProcess,
                                    tmp_path: Path) -> None:
    big = _submit(server, patients_batch(2000, "ui-big", bad=(7,)))  # 1 failure in 2,000
    small = _submit(server, patients_batch(2, "ui-small"))
    tx = patients_batch(3, "ui-tx", bad=(1,))
    tx["type"] = "transaction"
    rolled_back = _submit(server, tx)
    for job_id in (big, small, rolled_back):
        wait_for(lambda j=job_id: _ended(server, j), 90, f"job {job_id} to end",
                 on_timeout=worker.tail)

    dom = _dom(f"{server}/ui", tmp_path)
    big_row, small_row, tx_row = (_row(dom, j) for j in (big, small, rolled_back))

    # One failure among 2,000 entries: a badge with its count and a marker in the bar.
    assert re.search(r'class="badge fails"[^>]*>1 failed<', big_row), big_row
    assert 'class="bad some"' in big_row
    assert re.search(r'class="num rate">[\d,.]+/s<', big_row), big_row
    # A rate means nothing for 2 entries or a rolled-back transaction.
    assert 'class="num rate">–<' in small_row
    assert 'class="num rate">–<' in tx_row
    assert "rolled back" in tx_row
    assert "/openapi.json" in dom

    # The job page: its failed entries with their OperationOutcomes, and links to the JSON.
    page = _dom(f"{server}/ui?job={big}", tmp_path)
    section = page[page.index('id="job-page"'):]
    assert 'data-index="7"' in section and "entry[7] 400" in section, section[:3000]
    assert "birthDate" in section  # the outcome names the element
    assert f'href="jobs/{big}/entries?outcome=failed"' in section
    assert re.search(r'id="jobs-table"[^>]*hidden', page)

    page = _dom(f"{server}/ui?job={rolled_back}", tmp_path)
    assert "Transaction failed (400)" in page

    _dom(f"{server}/ui", tmp_path, screenshot="ui.png")
    assert (tmp_path / "ui.png").stat().st_size > 10_000

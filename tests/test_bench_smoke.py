"""`fhirq bench --quick` works end to end: it starts the real API and worker processes on a
database of its own, runs a couple of workloads and their COPY baselines, and writes a results
file that renders again as tables and Markdown. Figures are not checked (that is the
benchmark's job); only that each workload ran, every entry succeeded and the numbers are sane.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import psycopg2
import pytest

from bench.report import (
    Run,
    Series,
    percentile,
    render_markdown,
    series_from_json,
    summary_markdown,
    targets,
)

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The test session's servers, when it was given some; otherwise the bench finds its own.
    for test_var, bench_var in (("FHIRQ_TEST_DATABASE_URL", "FHIRQ_BENCH_DATABASE_URL"),
                                ("FHIRQ_TEST_REDIS_URL", "FHIRQ_BENCH_REDIS_URL")):
        if os.environ.get(test_var) and not os.environ.get(bench_var):
            env[bench_var] = os.environ[test_var]
    return env


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    cmd = [sys.executable, "-m", "cli", "bench", "--quick", "--only", "W1,W5",
           "--database", f"fhirq_bench_smoke_{os.getpid()}", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return orjson.loads(out.read_bytes())


def test_runs_the_selected_workloads_with_their_baselines(results: dict) -> None:
    assert {s["workload"] for s in results["series"]} == {"W1", "W5"}
    for s in results["series"]:
        assert s["runs"], s["workload"]
        assert s["baseline"] and all(b > 0 for b in s["baseline"]), s["workload"]
        summary = s["summary"]
        assert summary["median"] > 0 and summary["ratio"] > 0
        assert summary["min"] <= summary["median"] <= summary["max"]
        assert s["met"] in (True, False) or s["target"] is None


def test_w1_counts_every_entry_and_samples_both_process_trees(results: dict) -> None:
    (w1,) = [s for s in results["series"] if s["workload"] == "W1"]
    run = w1["runs"][0]
    assert run["size"] == results["meta"]["sizes"]["w1_repeat"]
    assert run["rate"] == pytest.approx(run["size"] / run["seconds"])
    assert 0 < run["extra"]["accept_s"] < run["seconds"]
    usage = run["usage"]
    assert usage["rss_mb"]["api"] > 20 and usage["rss_mb"]["worker"] > 20
    assert usage["cpu_s"]["worker"] > 0 and usage["cpu_s"]["postgres"] > 0
    per_entry = w1["summary"]["cpu_us_per_entry"]
    assert per_entry["worker"] > 0 and per_entry["postgres"] > 0


def test_w5_reports_the_peak_and_the_latency_at_half_of_it(results: dict) -> None:
    peak, half = [s for s in results["series"] if s["workload"] == "W5"]
    sizes = results["meta"]["sizes"]
    assert peak["label"].startswith("peak") and half["label"].startswith("open loop")
    (p,), (h,) = peak["runs"], half["runs"]
    # The peak is a rate over the whole closed loop, not a burst of a few requests.
    assert p["seconds"] >= sizes["w5_peak_seconds"]
    assert p["extra"]["transactions_per_s"] == pytest.approx(
        p["size"] / sizes["w5_entries"] / p["seconds"])
    assert p["size"] % sizes["w5_entries"] == 0
    # The open loop offered half of that peak, on its own schedule, for its whole duration.
    assert h["extra"]["offered_per_s"] == pytest.approx(p["extra"]["transactions_per_s"] / 2)
    assert h["extra"]["peak_per_s"] == p["extra"]["transactions_per_s"]
    assert h["seconds"] >= sizes["w5_open_seconds"] * 0.9
    expected = h["extra"]["offered_per_s"] * sizes["w5_open_seconds"]
    sent = h["size"] / sizes["w5_entries"]
    assert 0.5 * expected < sent < 1.6 * expected  # Poisson: the count is near rate × time
    assert 0 < h["p50_ms"] <= h["p99_ms"] and h["extra"]["send_lag_p99_ms"] >= 0
    assert half["target"] == "p99 ≤ 50 ms" and half["met"] == (half["summary"]["p99_ms"] <= 50)
    assert results["meta"]["stack"]["api_worker_class"] == "api.server.BufferingWorker"


def test_the_targets_table_reads_this_run(results: dict) -> None:
    series = [series_from_json(s) for s in results["series"]]
    rows = {t.name.split()[0]: t for t in targets(series)}
    assert set(rows) == {"W1", "W3", "W5", "W7", "API"}
    assert rows["W3"].met is None and rows["W7"].met is None and rows["API"].met is None
    (half,) = [s for s in series if s.label.startswith("open loop")]
    assert rows["W5"].met == (half.median_of(lambda r: r.p99_ms) <= 50)
    assert f"{half.extra('offered_per_s'):,.0f} tx/s offered" in rows["W5"].measured
    # --quick runs W1 at 2,000 entries: its ratio is shown, but not as the 100k target met.
    assert rows["W1"].met is False and "not the target's size" in rows["W1"].measured
    text = summary_markdown(series)
    assert "| W5 sync 10-entry transactions |" in text and "**not run**" in text


def _series(workload: str, label: str, rate: float, **extra: float) -> Series:
    return Series(workload, "t", label, "entries/s",
                  runs=[Run(1000, 1000 / rate, rate, extra=dict(extra))], baseline=[rate * 2])


def test_w7_target_reads_the_ratio_over_the_empty_store() -> None:
    loaded = _series("W7", "10,000,000 resources in the store", 4_000, over_empty=0.85,
                     store_resources=10_000_000)
    (w7,) = [t for t in targets([loaded]) if t.name.startswith("W7")]
    assert w7.met is True and w7.measured.startswith("0.85×")
    small = _series("W7", "store of 20,000", 4_000, over_empty=0.95, store_resources=20_000)
    (w7,) = [t for t in targets([small]) if t.name.startswith("W7")]
    assert w7.met is False and "not the target's size" in w7.measured
    empty = _series("W7", "empty store", 5_000)
    slow = _series("W7", "10,000,000 resources in the store", 3_000)
    (w7,) = [t for t in targets([empty, slow]) if t.name.startswith("W7")]
    assert w7.met is False and w7.measured.startswith("0.60×") and "5,000" in w7.baseline


def test_memory_target_needs_the_200_mb_upload() -> None:
    small = _series("W4", "100,000 entries", 1, api_rss_over_body=1.3, body_mb=100)
    big = _series("W4", "200,000 entries", 1, api_rss_over_body=1.3, body_mb=200)
    bloated = _series("W4", "200,000 entries", 1, api_rss_over_body=2.4, body_mb=200)
    verdicts = [[t for t in targets([s]) if t.name.startswith("API")][0].met
                for s in (small, big, bloated)]
    assert verdicts == [False, True, False]


def test_results_render_again_as_markdown(results: dict) -> None:
    text = render_markdown([series_from_json(s) for s in results["series"]])
    lines = text.strip().splitlines()
    assert lines[0].startswith("| workload |") and len(lines) == 2 + len(results["series"])


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [([5.0], 99, 5.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), (list(range(1, 101)), 99, 99.01),
     ([3.0, 1.0, 2.0], 0, 1.0), ([3.0, 1.0, 2.0], 100, 3.0)],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


@pytest.fixture(scope="module")
def w7_results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """W7 at a tiny store (built from scratch by this run, dropped afterwards)."""
    out = tmp_path_factory.mktemp("bench-w7") / "results.json"
    store = f"fhirq_bench_w7_smoke_{os.getpid()}"
    cmd = [sys.executable, "-m", "cli", "bench", "--quick", "--only", "W7", "--w7-store", "6000",
           "--w7-database", store, "--w7-rebuild",
           "--database", f"fhirq_bench_smoke_w7_{os.getpid()}", "--output", str(out)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield orjson.loads(out.read_bytes())
    finally:
        from tests.conftest import ADMIN_URL

        admin = psycopg2.connect(ADMIN_URL)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{store}" WITH (FORCE)')
        admin.close()


def test_w7_reports_the_large_store_against_the_empty_one(w7_results: dict) -> None:
    empty, full = [s for s in w7_results["series"] if s["workload"] == "W7"]
    assert empty["runs"] and empty["baseline"]  # the empty store, beside its COPY baseline
    (run,) = full["runs"]
    assert run["size"] == w7_results["meta"]["sizes"]["w7_batch"]
    # The large store's rate against the empty store's, measured in the same run.
    assert run["baseline"] == pytest.approx(empty["runs"][0]["rate"])
    assert full["summary"]["ratio"] == pytest.approx(run["rate"] / run["baseline"])
    assert full["met"] in (True, False)
    extra = run["extra"]
    assert extra["store_resources"] == 6000  # loaded resources removed again, seed multiplied
    assert 500 < extra["bytes_per_resource"] < 50_000
    assert extra["search_identifier_ms"] > 0 and extra["search_date_ms"] > 0
    assert extra["build_s"] > 0


def test_w7_store_is_multiplied_consistently(w7_results: dict) -> None:
    """Ids, references and identifiers of every copy were rewritten together: each copy's
    Observations point at that copy's Patient."""
    from bench.bigstore import MARK
    from tests.conftest import ADMIN_URL

    del w7_results  # only its store: still there until the module ends
    from tests.embedded_services import database_url

    url = database_url(ADMIN_URL, f"fhirq_bench_w7_smoke_{os.getpid()}")
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), count(DISTINCT res_id) FROM resource")
            total, distinct = cur.fetchone()
            assert total == distinct == 6000
            # Content lives in the history (one version each here).
            cur.execute("SELECT count(*) FROM resource_history o JOIN resource p ON p.res_type "
                        "= 'Patient' AND 'Patient/' || p.res_id = o.content->'subject'->>"
                        "'reference' WHERE o.res_type = 'Observation' AND right(o.res_id, 7) "
                        "<> right(p.res_id, 7)")
            assert cur.fetchone()[0] == 0
            cur.execute("SELECT count(*) FROM resource_history o WHERE res_type = 'Observation' "
                        "AND NOT EXISTS (SELECT 1 FROM resource p WHERE p.res_type = 'Patient' "
                        "AND 'Patient/' || p.res_id = o.content->'subject'->>'reference')")
            assert cur.fetchone()[0] == 0  # no dangling subject
            cur.execute("SELECT count(*) FROM resource_history WHERE content::text LIKE %s",
                        (f"%{MARK[:3]}%",))
            assert cur.fetchone()[0] == 6000
            cur.execute("SELECT count(*) FROM resource_history")
            assert cur.fetchone()[0] == 6000
    finally:
        conn.close()


def test_sync_profile_accounts_a_transaction_request() -> None:
    """`python -m bench.sync_profile`: W5's transactions through the app in one process, with
    the CPU of the API and of the database backends per request."""
    cmd = [sys.executable, "-m", "bench.sync_profile", "--requests", "20",
           "--database", f"fhirq_sync_smoke_{os.getpid()}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "20 transactions of 10 entries" in out
    figures = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    assert {"wall", "API", "PG", "SQL", "collector"} <= figures.keys()
    api_ms = float(figures["API"].split()[2])
    assert api_ms > 0.1  # a 10-entry transaction costs the API real work

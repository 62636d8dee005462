"""`fhirq bench --quick` works end to end: it starts the real API and worker processes on a
database of its own, runs a couple of workloads and their COPY baselines, and writes a results
file that renders again as tables and Markdown. Figures are not checked (that is the
benchmark's job); only that each workload ran, every entry succeeded and the numbers are sane.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.report import percentile, render_markdown, series_from_json

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
    series = {s["workload"]: s for s in results["series"]}
    assert set(series) == {"W1", "W5"}
    for s in series.values():
        assert s["runs"], s["workload"]
        assert s["baseline"] and all(b > 0 for b in s["baseline"]), s["workload"]
        summary = s["summary"]
        assert summary["median"] > 0 and summary["ratio"] > 0
        assert summary["min"] <= summary["median"] <= summary["max"]
        assert s["met"] in (True, False)


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


def test_w5_reports_latency_percentiles(results: dict) -> None:
    (w5,) = [s for s in results["series"] if s["workload"] == "W5"]
    run = w5["runs"][0]
    sizes = results["meta"]["sizes"]
    assert run["size"] == sizes["w5_clients"] * sizes["w5_per_client"] * sizes["w5_entries"]
    assert 0 < run["p50_ms"] <= run["p99_ms"]


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

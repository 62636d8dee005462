"""Foundation figures, in one process: validation and search-index extraction cost per
resource (real Synthea resources) and the time of a 1,000-entry synchronous batch through the
API (Flask app, real PostgreSQL).

    python -m bench.foundation [--runs 5] [--synthea-dir DIR] [--no-batch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import orjson

from bench import data
from bench.services import bench_services

SYNTHEA = Path(
    os.environ.get("FHIRQ_SYNTHEA_DIR", Path(__file__).parents[2] / "shared/data/synthea")
)


def validation_cost(directory: Path) -> tuple[int, float, dict[str, float]]:
    """(resources, µs per resource overall, µs per resource by type), second pass (warm)."""
    from core.fhir.validation import validate_resource

    return _cost(directory, validate_resource)


def index_cost(directory: Path) -> tuple[int, float, dict[str, float]]:
    """Like `validation_cost`, for the search index extraction done at write time."""
    from core.fhir.search_index import date_range, extract_index

    # Timed with an empty date cache: a writer mostly sees instants it has not parsed yet.
    return _cost(directory, extract_index, before=date_range.cache_clear)


def _cost(directory: Path, fn: Callable[[dict], object], before: Callable[[], None] | None = None
          ) -> tuple[int, float, dict[str, float]]:
    resources = [
        e["resource"]
        for f in sorted(directory.glob("*.json"))
        for e in orjson.loads(f.read_bytes()).get("entry", [])
    ]
    for r in resources:  # the first pass warms caches (compiled validators)
        fn(r)
    if before is not None:
        before()
    by_type: dict[str, list[float]] = defaultdict(list)
    t0 = time.perf_counter()
    for r in resources:
        t = time.perf_counter()
        fn(r)
        by_type[r["resourceType"]].append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    per_type = {k: statistics.mean(v) * 1e6 for k, v in by_type.items()}
    return len(resources), total / len(resources) * 1e6, per_type


def sync_batch(database_url: str, runs: int, size: int = 1000) -> list[float]:
    """Seconds for POST [base] with a `size`-entry batch of Patient creates, per run."""
    os.environ["FHIRQ_DATABASE_URL"] = database_url
    os.environ["FHIRQ_AUTH"] = "off"
    from api import create_app

    client = create_app().test_client()
    times = []
    for run in range(runs + 1):
        body = orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": p, "request": {"method": "POST", "url": "Patient"}}
            for p in data.patients(size, seed=100 + run)]})
        t = time.perf_counter()
        r = client.post("/fhir", data=body, content_type="application/fhir+json")
        elapsed = time.perf_counter() - t
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
        assert all(e["response"]["status"] == "201 Created" for e in r.json["entry"])
        if run:  # the first run warms the process up
            times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--synthea-dir", type=Path, default=SYNTHEA)
    parser.add_argument("--no-batch", action="store_true", help="the per-resource costs only")
    args = parser.parse_args()
    if args.synthea_dir.is_dir():
        for label, cost in (("validation", validation_cost), ("index extraction", index_cost)):
            n, mean, per_type = cost(args.synthea_dir)
            print(f"{label}: {n:,} Synthea resources, {mean:.1f} µs per resource (warm)")
            for rtype, us in sorted(per_type.items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {rtype:24s} {us:7.1f} µs")
    if args.no_batch:
        return
    with bench_services("fhirq_foundation") as services:
        times = sync_batch(services.database_url, args.runs)
    print(f"1,000-entry synchronous batch of Patient creates: median "
          f"{statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
          f"{len(times)} runs)")


if __name__ == "__main__":
    main()

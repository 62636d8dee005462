"""In-process cost of reference handling in transactions: scanning each resource for its
references and rewriting placeholders, on the Synthea patient transactions, with no database.

    python -m bench.references            # the 20 Synthea patient bundles, best of 5 rounds
    python -m bench.references --rounds 9

For every resource of every patient transaction it does what execution does to a write: one
`scan_references`, then `rewrite_references` with the bundle's placeholder map (each fullUrl →
`Type/id`) plus each conditional reference resolved to an id. Validation of the same resources
is timed alongside, as the yardstick of per-resource work a worker does anyway. Times are the
process's CPU time (best round), which other work on a shared machine disturbs less than the
wall clock does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import orjson

from bench.data import load_synthea
from core.fhir.references import is_conditional_reference, rewrite_references, scan_references
from core.fhir.validation import validate_resource

__all__ = ["main"]


def _bundles() -> list[tuple[list[dict[str, Any]], dict[str, str]]]:
    """Each patient transaction's resources and its mapping (placeholders + conditionals)."""
    out = []
    for _, body in load_synthea().transactions:
        entries = orjson.loads(body).get("entry") or []
        resources = [e["resource"] for e in entries]
        mapping = {
            e["fullUrl"]: f"{e['resource']['resourceType']}/{n}"
            for n, e in enumerate(entries)
            if e.get("fullUrl")
        }
        for resource in resources:
            for ref in scan_references(resource).references:
                if is_conditional_reference(ref):
                    mapping[ref] = f"{ref.partition('?')[0]}/resolved"
        out.append((resources, mapping))
    return out


def _round(bundles: list[tuple[list[dict[str, Any]], dict[str, str]]]) -> tuple[float, int]:
    start = time.process_time()
    changed = 0
    for resources, mapping in bundles:
        for resource in resources:
            if rewrite_references(scan_references(resource), mapping) is not None:
                changed += 1
    return time.process_time() - start, changed


def _validate(bundles: list[tuple[list[dict[str, Any]], dict[str, str]]]) -> float:
    start = time.process_time()
    for resources, _ in bundles:
        for resource in resources:
            validate_resource(resource)
    return time.process_time() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    bundles = _bundles()
    count = sum(len(r) for r, _ in bundles)
    _round(bundles)  # warm caches (compiled maps, validators)
    _validate(bundles)
    times, changed = [], 0
    for _ in range(args.rounds):
        seconds, changed = _round(bundles)
        times.append(seconds)
    checks = [_validate(bundles) for _ in range(args.rounds)]
    best, median = min(times), statistics.median(times)
    print(f"{len(bundles)} Synthea patient transactions, {count:,} resources, "
          f"{changed:,} rewritten")
    print(f"scan + rewrite: best {best * 1e3:.1f} ms CPU ({best / count * 1e6:.1f} µs/resource), "
          f"median {median * 1e3:.1f} ms over {args.rounds} rounds")
    print(f"validation (for scale): best {min(checks) * 1e3:.1f} ms CPU "
          f"({min(checks) / count * 1e6:.1f} µs/resource)")


if __name__ == "__main__":
    main()

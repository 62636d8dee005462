"""What the FHIRPath time budget costs a normal FHIRPath Patch (core.fhir.fhirpath): the same
4-operation patch applied with the budget's call tracing and without it, in one process.

    python -m bench.patch_budget
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import core.fhir.patch as patch_module
from core.fhir.fhirpath import Budget
from core.fhir.patch import apply_fhirpath_patch

PATIENT: dict[str, Any] = {
    "resourceType": "Patient", "id": "p1", "birthDate": "1974-12-25",
    "name": [{"family": "Chalmers", "given": ["Peter", "James"]}, {"given": ["Jim"]}],
    "identifier": [{"system": f"http://example.org/{i}", "value": str(i)} for i in range(3)],
}


def _op(kind: str, path: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"name": "operation", "part": [{"name": "type", "valueCode": kind},
                                          {"name": "path", "valueString": path}, *parts]}


PATCH = {"resourceType": "Parameters", "parameter": [
    _op("replace", "Patient.birthDate", {"name": "value", "valueDate": "1975-01-01"}),
    _op("add", "Patient", {"name": "name", "valueString": "gender"},
        {"name": "value", "valueCode": "male"}),
    _op("delete", "Patient.identifier.where(system = 'http://example.org/2')"),
    _op("replace", "Patient.name.where(family.matches('^Ch')).family",
        {"name": "value", "valueString": "X"}),
]}


@contextmanager
def _unbounded(seconds: float | None = None, *, expression: str | None = None
               ) -> Iterator[Budget]:
    yield Budget(float("inf"))  # no budget in effect: nothing is traced


def _ms_per_patch(apply: Any, patch: Any, n: int = 500) -> float:
    def run() -> None:
        apply(PATIENT, patch)

    run()  # parse (and cache) the paths first
    # CPU time of this thread: the machine may be busy with other work
    return min(timeit.repeat(run, number=n, repeat=5, timer=time.thread_time)) / n * 1e3


def main() -> None:
    bounded = _ms_per_patch(apply_fhirpath_patch, PATCH)
    real = patch_module.bounded
    patch_module.bounded = _unbounded
    try:
        unbounded = _ms_per_patch(apply_fhirpath_patch, PATCH)
    finally:
        patch_module.bounded = real
    print(f"4-operation FHIRPath Patch: {unbounded:.3f} ms without the budget, {bounded:.3f} ms "
          f"with it (+{bounded - unbounded:.3f} ms, {(bounded / unbounded - 1) * 100:.0f}%)")


if __name__ == "__main__":
    main()

"""How a worker process keeps Python's garbage collector out of its chunks' way.

A worker's heap is large and long-lived (the compiled validators, the search registry), and a
chunk allocates many short-lived containers (decoded entries, index values, COPY rows) that
reference counting alone frees. Freezing the start-up heap keeps the collector from rescanning
it (collections were ~13 % of a chunk's time before, ~2 % after, `bench.inprocess`); a larger
first-generation threshold makes the remaining young collections rarer: with Python's default
of 700 allocations a chunk of 1,000 Patients ran hundreds of them. Cyclic garbage is still
collected, only in bigger batches, which costs a few MB at most.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle_heap"]

# Container allocations between young-generation collections (Python's default: 700).
YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Freeze what is allocated so far and raise the young generation's threshold."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)

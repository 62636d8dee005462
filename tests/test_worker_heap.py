"""A worker process's collector settings (worker.heap)."""

from __future__ import annotations

import gc

from worker.heap import YOUNG_THRESHOLD, settle_heap


def test_settle_heap_freezes_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        settle_heap()
        assert gc.get_freeze_count() > 0
        young, older, oldest = gc.get_threshold()
        assert young == YOUNG_THRESHOLD
        assert (older, oldest) == before[1:]  # the older generations keep their pace
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

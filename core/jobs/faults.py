"""Test-only fault injection. With FHIRQ_TEST_POISON=1 in a worker's environment, an entry whose
request contains `fhirq-test-poison:<kind>` misbehaves when it runs, so that tests can drive
poison isolation through real worker processes:

    exit    the process exits at once (a lost worker, like an OOM kill)
    hang    sleeps ignoring the soft time limit (only the hard kill ends it)
    sleep   sleeps (the soft time limit interrupts it)
    memory  allocates without bound (the per-process memory cap stops it)

Never set it in production: without it nothing here runs and entries are not even looked at.
"""

from __future__ import annotations

import os
import signal
import time

from core.config import get_settings

__all__ = ["ENABLED", "inject"]

ENABLED = get_settings().test_poison
MARK = "fhirq-test-poison:"


def inject(raw: str | None) -> None:
    if raw is None or MARK not in raw:
        return
    kind = raw.split(MARK, 1)[1][:6]
    if kind.startswith("exit"):
        os._exit(70)
    if kind.startswith("hang"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # Celery's soft limit
        time.sleep(3600)
    if kind.startswith("sleep"):
        time.sleep(3600)
    if kind.startswith("memory"):
        hog = []
        try:
            while True:
                hog.append(bytes(64 << 20))  # calloc: address space, not RAM
        except MemoryError:
            hog.clear()  # the traceback keeps this frame: keep it small
            raise

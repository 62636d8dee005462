"""Retrying work that PostgreSQL aborted for colliding with concurrent work: a deadlock or a
serialization failure. Such an error says nothing about the work itself (run again, it usually
succeeds), so fhirq retries it here, and only here; every other error is raised at once.

    retry_conflicts(attempt)        call `attempt()` again after a conflict
    in_transaction(engine, work)    `work(conn)` in a transaction of its own, retried whole
    in_savepoint(conn, work)        `work()` in a savepoint of the caller's transaction

A retry within a savepoint helps at READ COMMITTED (fhirq's level: each statement sees the
latest commits); at REPEATABLE READ or SERIALIZABLE the snapshot is the whole transaction's,
so only `in_transaction` can get past a serialization failure there.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from psycopg2 import errors as pg_errors
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

__all__ = ["ATTEMPTS", "CONFLICTS", "in_savepoint", "in_transaction", "is_conflict",
           "retry_conflicts"]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFLICTS = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
ATTEMPTS = 3
# The colliding transactions back off for a random fraction of this (times the attempt), so
# that they do not meet again at once.
BACKOFF_SECONDS = 0.05


def is_conflict(exc: BaseException) -> bool:
    """True if `exc` is PostgreSQL aborting work for a deadlock or a serialization failure."""
    return isinstance(exc, DBAPIError) and isinstance(exc.orig, CONFLICTS)


def retry_conflicts(attempt: Callable[[], T], *, attempts: int = ATTEMPTS,
                    what: str = "transaction") -> T:
    """Call `attempt()` until it ends other than on a conflict, at most `attempts` times; the
    last conflict is raised. Each call must open (and on failure roll back) its own
    transaction or savepoint: after a conflict, PostgreSQL accepts nothing else in it."""
    for n in range(1, attempts + 1):
        try:
            return attempt()
        except DBAPIError as exc:
            if n == attempts or not is_conflict(exc):
                raise
            log.warning("%s: %s; retrying (attempt %d of %d)", what, type(exc.orig).__name__,
                        n + 1, attempts)
            time.sleep(random.uniform(0, BACKOFF_SECONDS * n))
    raise AssertionError("unreachable")


class _LostBeforeCommit(Exception):
    """The connection died while `work` ran: the server rolled the transaction back."""

    def __init__(self, error: DBAPIError) -> None:
        super().__init__(str(error))
        self.error = error


def in_transaction(engine: Engine, work: Callable[[Connection], T], *,
                   attempts: int = ATTEMPTS, what: str = "transaction") -> T:
    """`work(conn)` in a transaction of its own, committed when it returns (a conflict at
    commit is retried too). A connection found dead while `work` runs (a pooled one whose
    server session ended: a database restart, a dropped link) is replaced and `work` runs
    once more: nothing of it was committed. One lost at COMMIT is raised, as the outcome is
    then unknown."""

    def once() -> T:
        with engine.begin() as conn:
            try:
                return work(conn)
            except DBAPIError as exc:
                if exc.connection_invalidated:
                    raise _LostBeforeCommit(exc) from exc
                raise

    def attempt() -> T:
        try:
            return once()
        except _LostBeforeCommit as lost:
            log.warning("%s: the database connection was lost (%s); running it again on a "
                        "new one", what, type(lost.error.orig).__name__)
        try:
            return once()
        except _LostBeforeCommit as lost:
            raise lost.error from None

    return retry_conflicts(attempt, attempts=attempts, what=what)


def in_savepoint(conn: Connection, work: Callable[[], T], *, attempts: int = ATTEMPTS,
                 what: str = "transaction") -> T:
    """`work()` in a savepoint of `conn`'s open transaction: after a conflict, the transaction
    is rolled back to where it was and the work runs again; what came before it stays."""

    def attempt() -> T:
        with conn.begin_nested():
            return work()

    return retry_conflicts(attempt, attempts=attempts, what=what)

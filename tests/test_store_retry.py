"""core.store.retry against real PostgreSQL conflicts: a deadlock between two connections and a
serialization failure at REPEATABLE READ are retried and then succeed; other errors, and a
conflict that keeps happening, are raised."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from psycopg2 import errors as pg_errors
from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from core.store.retry import in_savepoint, in_transaction, is_conflict

TABLE = "retry_probe"


@pytest.fixture
def rows(engine: Engine) -> Iterator[Engine]:
    """A table of two counters, 1 and 2, for the test alone."""
    with engine.begin() as c:
        c.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        c.execute(text(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, n int NOT NULL, "
                       "note text)"))
        c.execute(text(f"INSERT INTO {TABLE} VALUES (1, 0, NULL), (2, 0, NULL)"))
    yield engine
    with engine.begin() as c:
        c.execute(text(f"DROP TABLE {TABLE}"))


def _bump(conn: Connection, row: int) -> None:
    conn.execute(text(f"UPDATE {TABLE} SET n = n + 1 WHERE id = :id"), {"id": row})


def _counts(engine: Engine) -> dict[int, int]:
    with engine.connect() as c:
        return dict(c.execute(text(f"SELECT id, n FROM {TABLE} ORDER BY id")).all())


def _crossing(attempts: Counter[str], barrier: threading.Barrier, name: str, first: int,
              second: int) -> Callable[[Connection], None]:
    """Work that bumps row `first`, then (the first time, once the other side holds its own
    first row) row `second`: two of them in opposite order close a lock cycle."""

    def work(conn: Connection) -> None:
        attempts[name] += 1
        _bump(conn, first)
        if attempts[name] == 1:
            barrier.wait()
        _bump(conn, second)

    return work


def _run_crossed(work: dict[str, Callable[[], None]]) -> dict[str, BaseException | None]:
    """Run two callables in two threads at once; what each raised (None: returned)."""
    errors: dict[str, BaseException | None] = {}

    def run(name: str) -> None:
        try:
            work[name]()
            errors[name] = None
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[name] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a transaction hung"
    return errors


def test_a_deadlock_is_retried_and_both_transactions_take_effect(rows: Engine) -> None:
    """A locks row 1 then row 2, B row 2 then row 1: PostgreSQL aborts one of them; it runs
    again after the other committed, so each counter is bumped twice, by exactly 3 runs."""
    both_locked_one = threading.Barrier(2, timeout=30)
    attempts: Counter[str] = Counter()

    def crossing(name: str, first: int, second: int) -> Callable[[], None]:
        work = _crossing(attempts, both_locked_one, name, first, second)
        return lambda: in_transaction(rows, work, what=f"deadlock {name}")

    errors = _run_crossed({"A": crossing("A", 1, 2), "B": crossing("B", 2, 1)})

    assert errors == {"A": None, "B": None}
    assert sum(attempts.values()) == 3, attempts  # one of them was the victim, once
    assert _counts(rows) == {1: 2, 2: 2}


def test_a_serialization_failure_is_retried_in_a_new_snapshot(rows: Engine) -> None:
    """At REPEATABLE READ, a row another transaction changed since the snapshot cannot be
    updated (SerializationFailure); the retry takes a new snapshot and succeeds."""
    attempts = 0
    seen: list[int] = []

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        seen.append(conn.execute(text(f"SELECT n FROM {TABLE} WHERE id = 1")).scalar_one())
        if attempts == 1:
            with rows.begin() as other:  # commits under the snapshot taken above
                _bump(other, 1)
        _bump(conn, 1)

    in_transaction(rows, work)

    assert attempts == 2
    assert seen == [0, 1]  # the second run saw the other transaction's commit
    assert _counts(rows)[1] == 2


def test_a_conflict_that_keeps_happening_is_raised_after_the_last_attempt(rows: Engine
                                                                          ) -> None:
    attempts = 0

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        conn.execute(text(f"SELECT n FROM {TABLE} WHERE id = 1"))
        with rows.begin() as other:
            _bump(other, 1)
        _bump(conn, 1)

    with pytest.raises(DBAPIError) as raised:
        in_transaction(rows, work, attempts=2)

    assert isinstance(raised.value.orig, pg_errors.SerializationFailure)
    assert is_conflict(raised.value)
    assert attempts == 2
    assert _counts(rows)[1] == 2  # only the other transaction's two commits


def test_other_errors_are_raised_at_once(rows: Engine) -> None:
    attempts = 0

    def work(conn: Connection) -> None:
        nonlocal attempts
        attempts += 1
        conn.execute(text(f"INSERT INTO {TABLE} VALUES (1, 0, NULL)"))

    with pytest.raises(IntegrityError) as raised:
        in_transaction(rows, work)

    assert not is_conflict(raised.value)
    assert attempts == 1


def test_a_savepoint_retry_keeps_the_work_before_it(rows: Engine) -> None:
    """Within a worker's transaction: the deadlocked savepoint is rolled back and run again,
    and what the transaction did before it is committed with it, once."""
    both_locked_one = threading.Barrier(2, timeout=30)
    attempts: Counter[str] = Counter()

    def crossing(name: str, first: int, second: int) -> Callable[[], None]:
        step = _crossing(attempts, both_locked_one, name, first, second)

        def run() -> None:
            with rows.begin() as conn:
                conn.execute(text(f"INSERT INTO {TABLE} VALUES (:id, 0, 'before')"),
                             {"id": 10 + first})
                in_savepoint(conn, lambda: step(conn), what=f"deadlock {name}")

        return run

    errors = _run_crossed({"A": crossing("A", 1, 2), "B": crossing("B", 2, 1)})

    assert errors == {"A": None, "B": None}
    assert sum(attempts.values()) == 3, attempts
    assert _counts(rows) == {1: 2, 2: 2, 11: 0, 12: 0}

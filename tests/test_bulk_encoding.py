"""COPY's text encoding (core.store.bulk) carries any text intact: random strings over the
characters COPY and array literals escape, compared with a character-by-character reference
encoder, then sent through a real COPY into text and text[] columns and read back."""

from __future__ import annotations

import random

import pytest
from sqlalchemy import Engine

from core.store import bulk

_HOSTILE = 'ab \\"\t\n\r,{}éN\x01'

# The encoding, one character at a time, as the COPY and array documentation state it.
_COPY = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_ARRAY = str.maketrans({"\\": "\\\\", '"': '\\"'})


def _reference_array(values: list[str]) -> str:
    if not values:
        return "{}"
    return ("{" + ",".join('"' + v.translate(_ARRAY) + '"' for v in values) + "}").translate(_COPY)


def _strings(rng: random.Random, n: int) -> list[list[str]]:
    return [["".join(rng.choice(_HOSTILE) for _ in range(rng.randint(0, 8)))
             for _ in range(rng.randint(0, 5))] for _ in range(n)]


def test_fields_are_encoded_as_copy_and_array_literals_say() -> None:
    for values in _strings(random.Random(7), 5000):
        assert bulk.array(values) == _reference_array(values), values
        for v in values:
            assert bulk.text(v) == v.translate(_COPY), v
    assert bulk.array(["plain", "http://loinc.org|8867-4"]) == '{"plain","http://loinc.org|8867-4"}'
    assert bulk.text(None) == bulk.NULL


@pytest.mark.usefixtures("clean_db")
def test_copy_round_trip_keeps_every_character(engine: Engine) -> None:
    rows = _strings(random.Random(11), 400)
    rows.append([])
    lines = [f"{i}\t{bulk.text(''.join(v))}\t{bulk.array(v)}" for i, v in enumerate(rows)]
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE enc (i int, t text, a text[]) ON COMMIT DROP")
        bulk.copy_in(conn, "COPY enc (i, t, a) FROM STDIN", lines)
        back = {i: (t, a) for i, t, a in conn.exec_driver_sql("SELECT i, t, a FROM enc")}
    for i, v in enumerate(rows):
        assert back[i] == ("".join(v), v), v

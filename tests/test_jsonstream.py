"""core.jobs.jsonstream: the top level of a JSON text walked piece by piece gives every value's
exact text, whatever the chunk boundaries (inside strings, escapes, multi-byte characters,
numbers, literals), and refuses broken JSON saying where."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import BadRequest
from core.jobs.jsonstream import JsonStream


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _elements(data: bytes, size: int) -> list[bytes]:
    doc = JsonStream(_chunks(data, size))
    doc.expect(b"[")
    out: list[bytes] = []
    if not doc.take(b"]"):
        while True:
            out.append(doc.value())
            if doc.take(b"]"):
                break
            doc.expect(b",")
    doc.end()
    return out


TRICKY = [
    {"resourceType": "Patient", "name": [{"family": "},{"}, {"given": ["]", "\\\"x"]}]},
    {"text": "é€😀 ünïcödé", "n": [1.5e10, -0, 12345678901234567890]},
    "a string", 12345, -1.25e-7, True, False, None, [], {}, [[[]]],
    {"big": "x" * 100_000, "nested": {"a": [{"b": {"c": "\u0000\t\n"}}]}},
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 4096, 1 << 20])
@pytest.mark.parametrize("indent", [False, True])
def test_every_value_comes_out_exactly_whatever_the_chunks(size: int, indent: bool) -> None:
    option = orjson.OPT_INDENT_2 if indent else 0
    body = orjson.dumps(TRICKY, option=option)
    raws = _elements(body, size)
    assert [orjson.loads(r) for r in raws] == TRICKY
    if not indent:
        assert raws == [orjson.dumps(v) for v in TRICKY]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(values=st.lists(json_values, max_size=8), size=st.integers(1, 40))
def test_generated_arrays_split_back_into_their_elements(values: list[object], size: int) -> None:
    body = orjson.dumps(values)
    assert [orjson.loads(r) for r in _elements(body, size)] == values


@pytest.mark.parametrize(("body", "where"), [
    (b'[{"a": 1}, }', 11),
    (b'[{"a": tru}]', 7),
    (b'[{"a": 1}', None),
    (b'[1] 2', 4),
    (b'[1 2]', 3),
])
@pytest.mark.parametrize("size", [1, 5, 1000])
def test_broken_json_is_refused_saying_where(body: bytes, where: int | None, size: int) -> None:
    with pytest.raises(BadRequest) as info:
        _elements(body, size)
    assert "not valid JSON" in info.value.diagnostics
    if where is not None:
        assert f"at byte {where}" in info.value.diagnostics


def test_deep_nesting_is_refused() -> None:
    with pytest.raises(BadRequest) as info:
        _elements(b"[" + b"[" * 5000 + b"]" * 5000 + b"]", 1000)
    assert "nested too deeply" in info.value.diagnostics

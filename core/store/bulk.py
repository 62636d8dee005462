"""Rows sent to PostgreSQL with COPY: the text-format encoding of fields, and one COPY of a
chunk's rows on the caller's transaction.

A chunk's rows travel as COPY data rather than as statement parameters: no statement text that
grows with the chunk, no parameter adaptation on the client, no parsing of array literals in
a statement on the server.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import Connection

__all__ = ["NULL", "array", "copy_in", "json", "stamp", "text"]

NULL = "\\N"

# Escaping is done with str.replace, and only when a character to escape is there at all:
# str.translate with a table looks each character up in a dict, six times the cost of the
# whole array field on the tokens of a Synthea resource.


def _copy_escaped(value: str) -> str:
    """COPY's text format: backslash, tab, newline and carriage return are escaped."""
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                .replace("\r", "\\r"))
    return value


def text(value: str | None) -> str:
    return NULL if value is None else _copy_escaped(value)


def json(value: Any) -> str:
    """A JSON(B) field; orjson escapes every control character inside strings, so only
    backslashes need COPY's escaping."""
    if value is None:
        return NULL
    return orjson.dumps(value).decode().replace("\\", "\\\\")


def array(values: Sequence[str]) -> str:
    """A text[] field."""
    if not values:
        return "{}"
    every = "".join(values)
    if "\\" in every or '"' in every:
        # Inside an array literal: backslash and double quote (before COPY's own escaping).
        values = [v.replace("\\", "\\\\").replace('"', '\\"') for v in values]
    return _copy_escaped('{"' + '","'.join(values) + '"}')


def stamp(value: datetime | None) -> str:
    return NULL if value is None else value.isoformat()


def copy_in(conn: Connection, sql: str, lines: Sequence[str], *, before: str | None = None
            ) -> None:
    """COPY `lines` (tab-separated fields, already encoded) with `sql`, in `conn`'s
    transaction; `before` is a statement to run first on the same cursor."""
    data = io.BytesIO(("\n".join(lines) + "\n").encode())
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    with dbapi.cursor() as cur:
        try:
            if before is not None:
                cur.execute(before)
            cur.copy_expert(sql, data)
        except Exception as exc:
            # What SQLAlchemy does for its own statements: the DBAPIError subclass, and the
            # pooled connection invalidated when the database went away, so that retries on
            # conflicts and the handling of lost connections see a COPY like any statement.
            conn._handle_dbapi_exception(exc, sql, None, cur, None)

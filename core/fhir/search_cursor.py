"""The `_cursor` of a searchset's `next` link: where the previous page ended, as the sort key
values and id of its last resource.

A page starts strictly after that position in the search's order, so resources written or
deleted between two page fetches never shift the pages (no duplicates, no misses among the
resources present throughout), unlike `_offset`. The text is opaque to clients: base64url of
a small JSON array `[sort, keys, id]` and a check digest. The digest catches truncated or
edited cursors; it is not a signature, and need not be — a cursor only says where to start,
which the caller could equally ask with search criteria. A cursor made for another `_sort`
is refused, since its key values would not be comparable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from core.errors import BadRequest

__all__ = ["Position", "decode_cursor", "encode_cursor"]

_VERSION = 1
_DIGEST_CHARS = 12
_MAX_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Position:
    keys: tuple[Any, ...]  # one per sort key (datetime, str, Decimal or None)
    res_id: str


def encode_cursor(sort: str, keys: tuple[Any, ...], res_id: str) -> str:
    body = json.dumps([_VERSION, sort, [_encode(k) for k in keys], res_id],
                      separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(body).decode().rstrip("=") + "." + _digest(body)


def decode_cursor(text: str, sort: str, kinds: list[str]) -> Position:
    """The position `text` names, for a search sorted by `sort` with key kinds `kinds`
    ("ts" datetime, "text", "number"); anything else is a 400 naming `_cursor`."""
    try:
        if len(text) > _MAX_CHARS:
            raise ValueError("too long")
        b64, _, digest = text.partition(".")
        body = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        if digest != _digest(body):
            raise ValueError("its check digest does not match")
        version, made_for, keys, res_id = json.loads(body)
        if version != _VERSION or not isinstance(res_id, str) or not isinstance(keys, list):
            raise ValueError("unknown form")
        if made_for != sort or len(keys) != len(kinds):
            raise ValueError(f"it was made for _sort={made_for or '(none)'}")
        return Position(tuple(_decode(k, kind) for k, kind in zip(keys, kinds, strict=True)),
                        res_id)
    except (ValueError, TypeError, ArithmeticError, binascii.Error) as err:
        raise BadRequest(
            f"Invalid '_cursor': {err if isinstance(err, ValueError) else 'not a cursor'}; "
            "follow the next link as given",
            expression="_cursor",
            code="value",
        ) from None


def _digest(body: bytes) -> str:
    return hashlib.sha256(b"fhirq-cursor:" + body).hexdigest()[:_DIGEST_CHARS]


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, Decimal):
        return {"n": str(value)}
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"cannot put a {type(value).__name__} in a cursor")


def _decode(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "ts" and isinstance(value, dict) and isinstance(value.get("t"), str):
        parsed = datetime.fromisoformat(value["t"])
        if parsed.tzinfo is None:
            raise ValueError("a time without a zone")
        return parsed
    if kind == "number" and isinstance(value, dict) and isinstance(value.get("n"), str):
        return Decimal(value["n"])
    if kind == "text" and isinstance(value, str):
        return value
    raise ValueError("a key of the wrong kind")

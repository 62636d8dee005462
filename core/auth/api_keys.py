"""Static API keys: creating, listing, revoking and verifying them (table `api_key`).

A key is the token `fhq_<id>_<secret>`: `id` is 16 hex digits that find the row, `secret` is
256 random bits. Only the SHA-256 of the whole token is stored, so the database never holds a
usable token; a fast hash is enough because the secret is random, not a password. Verification
looks the row up by id and compares hashes in constant time.

Functions take a live `Connection` and never commit: the CLI (or a test) owns the transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, func, insert, select, update

from core.auth.scopes import METRICS, is_known_scope
from core.store.schema import api_key

__all__ = [
    "PREFIX",
    "ApiKey",
    "NewKey",
    "create_key",
    "hash_token",
    "is_api_key",
    "list_keys",
    "revoke_key",
    "verify_key",
]

PREFIX = "fhq_"
_TOKEN = re.compile(r"fhq_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})")
MAX_OWNER = 255


@dataclass(frozen=True)
class ApiKey:
    id: str
    owner: str
    name: str | None
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class NewKey:
    """A key just created, with the only copy of its token."""

    key: ApiKey
    token: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_api_key(token: str) -> bool:
    """True for anything in API key form (`fhq_...`); JWTs never start so."""
    return token.startswith(PREFIX)


def _row_to_key(row: object) -> ApiKey:
    m = row._mapping  # type: ignore[attr-defined]
    return ApiKey(
        id=m["id"],
        owner=m["owner"],
        name=m["name"],
        scopes=tuple(m["scopes"]),
        created_at=m["created_at"],
        revoked_at=m["revoked_at"],
    )


def _columns() -> list[object]:
    return [api_key.c.id, api_key.c.owner, api_key.c.name, api_key.c.scopes,
            api_key.c.created_at, api_key.c.revoked_at]


def create_key(
    conn: Connection, owner: str, scopes: Iterable[str], name: str | None = None
) -> NewKey:
    """Store a new key for `owner` with `scopes`; ValueError when either is unusable (a scope
    that grants nothing would make a key that can do nothing, which is always a mistake)."""
    owner = owner.strip()
    if not owner or len(owner) > MAX_OWNER:
        raise ValueError(f"owner must have 1 to {MAX_OWNER} characters")
    scopes = tuple(dict.fromkeys(s for scope in scopes for s in scope.split()))
    if not scopes:
        raise ValueError("a key needs at least one scope, e.g. 'system/*.read'")
    useless = [s for s in scopes if not is_known_scope(s)]
    if useless:
        raise ValueError(
            f"not a SMART system scope: {', '.join(useless)} (use e.g. system/*.read, "
            f"system/Patient.write, system/*.*, v2 letters system/*.cruds, or {METRICS})"
        )
    key_id = secrets.token_hex(8)
    token = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    row = conn.execute(
        insert(api_key)
        .values(id=key_id, owner=owner, name=name, key_hash=hash_token(token),
                scopes=list(scopes))
        .returning(*_columns())
    ).one()
    return NewKey(_row_to_key(row), token)


def list_keys(conn: Connection, owner: str | None = None) -> list[ApiKey]:
    query = select(*_columns()).order_by(api_key.c.created_at, api_key.c.id)
    if owner is not None:
        query = query.where(api_key.c.owner == owner)
    return [_row_to_key(r) for r in conn.execute(query)]


def revoke_key(conn: Connection, key_id: str) -> ApiKey | None:
    """Revoke key `key_id` (a no-op if it already is); None if there is no such key."""
    row = conn.execute(
        update(api_key)
        .where(api_key.c.id == key_id)
        .values(revoked_at=func.coalesce(api_key.c.revoked_at, func.now()))
        .returning(*_columns())
    ).one_or_none()
    return None if row is None else _row_to_key(row)


def verify_key(conn: Connection, token: str) -> ApiKey | None:
    """The live key whose token this is, or None (malformed, unknown, wrong secret, revoked)."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        return None
    row = conn.execute(
        select(*_columns(), api_key.c.key_hash).where(api_key.c.id == m["id"])
    ).one_or_none()
    if row is None:
        return None
    if not hmac.compare_digest(row.key_hash, hash_token(token)):
        return None
    key = _row_to_key(row)
    return None if key.revoked_at is not None else key

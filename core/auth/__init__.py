"""Authentication and authorization: who a bearer token belongs to and what it may do.

    core.auth              Principal, authenticate(), check_settings()
    core.auth.api_keys     static API keys `fhq_<id>_<secret>`, stored hashed (table api_key)
    core.auth.jwt_tokens   JWTs checked against a JWKS (RS256 / ES256)
    core.auth.scopes       SMART `system/` scopes and what a request needs
    core.auth.permissions  what the FHIR engine lets a caller do, from its scopes

The owner a token names is the owner of the jobs it submits; every job query filters on it.
API keys and JWTs share one owner namespace: a key created for `etl` and a JWT with
`sub: etl` see the same jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Engine

from core.auth.api_keys import hash_token, is_api_key, verify_key
from core.auth.jwt_tokens import jwks_for, verify_jwt
from core.auth.permissions import Permissions
from core.auth.scopes import Grant, Requirement, allows, parse_scopes
from core.config import Settings
from core.errors import Unauthorized
from core.store.retry import in_transaction

__all__ = ["ANONYMOUS", "Principal", "authenticate", "check_settings", "jwt_enabled"]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the owner its jobs belong to and the scopes it holds."""

    owner: str
    scopes: tuple[str, ...]
    method: str  # "api-key" | "jwt" | "none" (FHIRQ_AUTH=off)
    key_id: str | None = None

    @property
    def grants(self) -> tuple[Grant, ...]:
        return parse_scopes(self.scopes)

    def allows(self, need: Requirement) -> bool:
        return allows(self.grants, need)

    @property
    def permissions(self) -> Permissions:
        """What the FHIR engine lets this caller do, entry by entry."""
        return Permissions.of(self.scopes)


# Everyone, when authentication is off (`fhirq up` on loopback).
ANONYMOUS = Principal("anonymous", ("system/*.*",), "none")


def jwt_enabled(settings: Settings) -> bool:
    return bool(settings.jwks_url or settings.jwks_file)


def check_settings(settings: Settings) -> None:
    """Refuse, at startup, a configuration that would accept tokens meant for someone else."""
    if settings.jwks_url and settings.jwks_file:
        raise ValueError("set FHIRQ_JWKS_URL or FHIRQ_JWKS_FILE, not both")
    if jwt_enabled(settings):
        missing = [name for name, value in (("FHIRQ_JWT_ISSUER", settings.jwt_issuer),
                                            ("FHIRQ_JWT_AUDIENCE", settings.jwt_audience))
                   if not value]
        if missing:
            raise ValueError(
                f"JWT authentication (a JWKS is configured) also needs {' and '.join(missing)}"
            )


# Verified API keys: SHA-256 of the token → (monotonic expiry, principal). Only successes are
# kept; dict operations are atomic, which is all the API's threads need.
_verified: dict[str, tuple[float, Principal]] = {}
_VERIFIED_MAX = 10_000


def _api_key_principal(token: str, settings: Settings, engine: Engine) -> Principal:
    ttl = settings.api_key_cache_seconds
    digest = hash_token(token)
    now = time.monotonic()
    if ttl > 0:
        hit = _verified.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
    # A read: run again on a new connection if a pooled one turns out dead (core.store.retry).
    key = in_transaction(engine, lambda conn: verify_key(conn, token), what="API key lookup")
    if key is None:
        _verified.pop(digest, None)
        raise Unauthorized("The API key is unknown, revoked or malformed")
    principal = Principal(key.owner, key.scopes, "api-key", key.id)
    if ttl > 0:
        if len(_verified) >= _VERIFIED_MAX:
            _verified.clear()
        _verified[digest] = (now + ttl, principal)
    return principal


def authenticate(token: str, settings: Settings, engine: Engine) -> Principal:
    """The principal of a bearer token: an API key (looked up in `engine`'s database, then
    trusted for FHIRQ_API_KEY_CACHE_SECONDS) or a JWT (when a JWKS is configured).
    Unauthorized, saying why, for anything else."""
    if is_api_key(token):
        return _api_key_principal(token, settings, engine)
    if not jwt_enabled(settings):
        raise Unauthorized("The bearer token is not an API key (fhq_...), and this server "
                           "accepts no JWTs (no JWKS configured)")
    assert settings.jwt_issuer and settings.jwt_audience  # check_settings ran at startup
    claims = verify_jwt(
        token,
        jwks_for(settings.jwks_url, settings.jwks_file),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )
    return Principal(claims.owner, claims.scopes, "jwt")

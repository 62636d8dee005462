"""JWT bearer tokens: verifying them against the configured JWKS (RS256 and ES256 only).

The JWKS comes from `FHIRQ_JWKS_FILE` (re-read when the file changes) or `FHIRQ_JWKS_URL`
(fetched with httpx, kept for `JWKS_TTL` seconds, fetched again early, at most every
`JWKS_MIN_REFETCH` seconds, when a token names a key id it does not hold: that is how an issuer
rotates keys). Each key is bound to one algorithm by its type (RSA → RS256, EC P-256 → ES256),
so a token cannot pick the algorithm its key is checked with.

A token must carry `exp`, the configured `iss` and `aud`, and `sub` (or `client_id`), which
becomes the owner. Scopes come from `scope` (space-separated) or `scp` (a list or a string).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import orjson

from core.auth.api_keys import MAX_OWNER
from core.errors import FhirError, Unauthorized, Unavailable

__all__ = ["ALGORITHMS", "JwtClaims", "Jwks", "jwks_for", "verify_jwt"]

ALGORITHMS = ("RS256", "ES256")
JWKS_TTL = 300.0
JWKS_MIN_REFETCH = 30.0
FETCH_TIMEOUT = 5.0
# Clock skew tolerated on exp / nbf / iat between the issuer and this server.
LEEWAY = 30


@dataclass(frozen=True)
class JwtClaims:
    owner: str
    scopes: tuple[str, ...]


def _algorithm(jwk: dict[str, Any]) -> str | None:
    """The one algorithm fhirq checks this key with, or None when it is not a signing key."""
    if jwk.get("use", "sig") != "sig":
        return None
    kty, crv = jwk.get("kty"), jwk.get("crv")
    alg = {("RSA", None): "RS256", ("EC", "P-256"): "ES256"}.get((kty, crv))
    if alg is None or jwk.get("alg", alg) != alg:
        return None
    return alg


def _parse_jwks(raw: bytes, source: str) -> list[jwt.PyJWK]:
    try:
        doc = orjson.loads(raw)
        entries = doc["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise _unavailable(f"The JWKS at {source} is not a JSON Web Key Set ({exc})") from exc
    keys = []
    for entry in entries:
        alg = _algorithm(entry) if isinstance(entry, dict) else None
        if alg is None:
            continue
        with contextlib.suppress(jwt.PyJWTError, ValueError, TypeError):
            keys.append(jwt.PyJWK(entry, algorithm=alg))
    return keys


def _unavailable(diagnostics: str) -> Unavailable:
    # The server's key source failed, not the client's token: 503, so clients retry rather
    # than discard a good token.
    return Unavailable(diagnostics)


@dataclass
class Jwks:
    """The signing keys of one JWKS source, cached."""

    url: str | None = None
    path: str | None = None
    _keys: list[jwt.PyJWK] = field(default_factory=list)
    _stamp: object = None  # file: its mtime/size; URL: when it was fetched (monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def keys(self, refresh: bool = False) -> list[jwt.PyJWK]:
        with self._lock:
            if self.path is not None:
                self._load_file()
            else:
                self._load_url(refresh)
            return self._keys

    def _load_file(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.path, "rb") as f:
                    self._keys = _parse_jwks(f.read(), self.path)
                self._stamp = stamp
        except OSError as exc:
            raise _unavailable(f"Cannot read the JWKS file {self.path}: {exc}") from exc

    def _load_url(self, refresh: bool) -> None:
        assert self.url is not None
        age = time.monotonic() - self._stamp if isinstance(self._stamp, float) else None
        fresh = age is not None and age < JWKS_TTL
        if fresh and not (refresh and age >= JWKS_MIN_REFETCH):
            return
        try:
            response = httpx.get(self.url, timeout=FETCH_TIMEOUT, follow_redirects=True)
            response.raise_for_status()
            self._keys = _parse_jwks(response.content, self.url)
            self._stamp = time.monotonic()
        except (httpx.HTTPError, FhirError) as exc:
            if self._keys:
                # An outage of the issuer does not lock out holders of valid tokens; try again
                # in JWKS_MIN_REFETCH seconds rather than on every request.
                self._stamp = time.monotonic() - JWKS_TTL + JWKS_MIN_REFETCH
                return
            raise _unavailable(f"Cannot fetch the JWKS from {self.url}: {exc}") from exc


_sources: dict[tuple[str | None, str | None], Jwks] = {}
_sources_lock = threading.Lock()


def jwks_for(url: str | None, path: str | None) -> Jwks:
    """The process-wide cache of one JWKS source."""
    with _sources_lock:
        return _sources.setdefault((url, path), Jwks(url=url, path=path))


def _key_for(jwks: Jwks, header: dict[str, Any]) -> jwt.PyJWK:
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise Unauthorized(f"Token algorithm {alg!r} is not accepted; use RS256 or ES256")
    kid = header.get("kid")

    def pick(keys: list[jwt.PyJWK]) -> list[jwt.PyJWK]:
        if kid is None:
            return [k for k in keys if k.algorithm_name == alg]
        return [k for k in keys if k.key_id == kid]

    found = pick(jwks.keys())
    if not found and kid is not None:
        found = pick(jwks.keys(refresh=True))
    if not found:
        raise Unauthorized(f"Token key id {kid!r} is not in the configured JWKS"
                           if kid is not None else "Token has no key id (kid)")
    if len(found) > 1:
        raise Unauthorized(f"The JWKS holds several keys the token could mean (kid {kid!r})")
    if found[0].algorithm_name != alg:
        raise Unauthorized(f"Token algorithm {alg} does not match its key ({kid})")
    return found[0]


_REASONS: list[tuple[type[jwt.PyJWTError], str]] = [
    (jwt.ExpiredSignatureError, "The token has expired"),
    (jwt.ImmatureSignatureError, "The token is not valid yet"),
    (jwt.InvalidAudienceError, "The token is not meant for this server (aud)"),
    (jwt.InvalidIssuerError, "The token was issued by an issuer this server does not trust"),
    (jwt.InvalidSignatureError, "The token's signature does not verify"),
]


def verify_jwt(token: str, jwks: Jwks, *, issuer: str, audience: str) -> JwtClaims:
    """The owner and scopes of a valid token; Unauthorized saying why otherwise."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthorized("The bearer token is neither an API key nor a JWT") from exc
    key = _key_for(jwks, header)
    try:
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[key.algorithm_name],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY,
            options={"require": ["exp", "iss", "aud"]},
        )
    except jwt.MissingRequiredClaimError as exc:
        raise Unauthorized(f"The token has no '{exc.claim}' claim") from exc
    except jwt.PyJWTError as exc:
        reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
        raise Unauthorized(reason or f"The token is not valid: {exc}") from exc
    owner = claims.get("sub") or claims.get("client_id")
    if not isinstance(owner, str) or not owner.strip():
        raise Unauthorized("The token names no owner ('sub' or 'client_id')")
    # The owner is stored with every job and matched in every job query: hold it to what an
    # API key's owner may be, and keep out control characters (PostgreSQL text refuses NUL).
    if len(owner) > MAX_OWNER or any(ord(ch) < 32 or ord(ch) == 127 for ch in owner):
        raise Unauthorized(f"The token's owner ('sub' or 'client_id') must have at most "
                           f"{MAX_OWNER} characters and no control characters")
    return JwtClaims(owner=owner, scopes=_scopes(claims))


def _scopes(claims: dict[str, Any]) -> tuple[str, ...]:
    raw = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw, str):
        return tuple(raw.split())
    if isinstance(raw, list):
        return tuple(s for s in raw if isinstance(s, str))
    return ()

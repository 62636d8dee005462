"""Authentication and ownership (SPEC §5): API keys stored hashed, JWTs against a JWKS (file and
URL), SMART scopes per route, 401/403 answers, open health and metadata, owner isolation of
jobs through real tokens, `fhirq token` and `fhirq up`'s loopback rule."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import Engine, text

from core.auth import api_keys, jwt_tokens
from core.auth.scopes import Requirement, allows, parse_scope, parse_scopes, scope_hint
from core.config import Settings, get_settings
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import ApiServer, WorkerProcess, job_id_of, patients_batch, submit

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://issuer.test"
AUDIENCE = "https://fhirq.test/fhir"
PATIENT = {"resourceType": "Patient", "name": [{"family": "Auth"}]}


# --------------------------------------------------------------------------- scopes


@pytest.mark.parametrize(
    ("scope", "rtype", "letters"),
    [
        ("system/*.*", "*", "cruds"),
        ("system/*.read", "*", "rs"),
        ("system/*.write", "*", "cud"),
        ("system/Patient.read", "Patient", "rs"),
        ("system/Patient.*", "Patient", "cruds"),
        ("system/Observation.rs", "Observation", "rs"),
        ("system/*.cruds", "*", "cruds"),
        ("system/*.cud", "*", "cud"),
        ("system/Patient.c", "Patient", "c"),
        # Grant nothing: other contexts, wrong letter order, repeats, queries, non-FHIR scopes.
        ("patient/*.read", None, None),
        ("user/Patient.write", None, None),
        ("system/*.sr", None, None),
        ("system/*.rr", None, None),
        ("system/Observation.rs?category=laboratory", None, None),
        ("system/patient.read", None, None),
        ("system/*.", None, None),
        ("openid", None, None),
        ("", None, None),
    ],
)
def test_parse_scope(scope: str, rtype: str | None, letters: str | None) -> None:
    grant = parse_scope(scope)
    if rtype is None:
        assert grant is None
    else:
        assert grant is not None
        assert (grant.resource_type, grant.letters) == (rtype, frozenset(letters or ""))


@pytest.mark.parametrize(
    ("scopes", "rtype", "letters", "ok"),
    [
        ("system/*.*", "*", "cruds", True),
        ("system/*.write", "*", "cruds", False),  # bundles read too
        ("system/*.read system/*.write", "*", "cruds", True),  # grants add up
        ("system/*.write", "*", "cu", True),
        ("system/*.read", "Patient", "r", True),
        ("system/Patient.read", "Patient", "s", True),
        ("system/Patient.read", "Observation", "r", False),
        ("system/Patient.*", "*", "r", False),  # a need on every type needs a grant on `*`
        ("system/Patient.rs", "Patient", "c", False),
        ("system/Patient.c system/Patient.u", "Patient", "cu", True),
        ("patient/*.*", "Patient", "r", False),
        ("", "Patient", "r", False),
    ],
)
def test_allows(scopes: str, rtype: str, letters: str, ok: bool) -> None:
    assert allows(parse_scopes(scopes.split()), Requirement.of(rtype, letters)) is ok


def test_scope_hint_names_v1_and_v2_scopes() -> None:
    assert scope_hint(Requirement.of("*", "cud")) == "system/*.write (SMART v2: system/*.cud)"
    assert scope_hint(Requirement.of("*", "sdcur")) == (
        "system/*.read and system/*.write (SMART v2: system/*.cruds)")


# --------------------------------------------------------------------------- route needs


@pytest.mark.parametrize(
    ("method", "path", "headers", "need"),
    [
        ("POST", "/fhir", {}, ("*", "cruds")),
        ("POST", "/fhir/", {}, ("*", "cruds")),
        ("PUT", "/fhir", {}, ("*", "cu")),
        ("GET", "/fhir/Patient/1", {}, ("Patient", "r")),
        ("HEAD", "/fhir/Patient/1", {}, ("Patient", "r")),
        ("GET", "/fhir/Patient/1/_history/2", {}, ("Patient", "r")),
        ("GET", "/fhir/Patient/1/_history", {}, ("Patient", "r")),
        ("GET", "/fhir/Patient?name=x", {}, ("Patient", "s")),
        ("POST", "/fhir/Patient/_search", {}, ("Patient", "s")),
        ("GET", "/fhir/Patient/_history", {}, ("Patient", "s")),
        ("POST", "/fhir/Patient", {}, ("Patient", "c")),
        ("POST", "/fhir/Patient", {"If-None-Exist": "identifier=a|b"}, ("Patient", "cs")),
        ("POST", "/fhir/Patient?identifier=a|b", {}, ("Patient", "cs")),
        ("PUT", "/fhir/Patient/1", {}, ("Patient", "cu")),
        ("PATCH", "/fhir/Patient/1", {}, ("Patient", "u")),
        ("DELETE", "/fhir/Patient/1", {}, ("Patient", "d")),
        ("PUT", "/fhir/Patient?identifier=a|b", {}, ("Patient", "cus")),
        ("PATCH", "/fhir/Patient?identifier=a|b", {}, ("Patient", "us")),
        ("DELETE", "/fhir/Patient?identifier=a|b", {}, ("Patient", "ds")),
        ("GET", "/fhir/_async/abc", {}, ("*", "r")),
        ("DELETE", "/fhir/_async/abc", {}, ("*", "cud")),
        ("GET", "/jobs", {}, ("*", "r")),
        ("GET", "/jobs/abc", {}, ("*", "r")),
        ("GET", "/jobs/abc/entries", {}, ("*", "r")),
        ("POST", "/jobs/abc/retry", {}, ("*", "cruds")),
        ("GET", "/no/such/route", {}, None),
    ],
)
def test_every_route_needs_its_scope(
    method: str, path: str, headers: dict[str, str], need: tuple[str, str] | None
) -> None:
    from api import create_app
    from api.auth import requirement

    app = create_app(Settings(auth="required", database_url="postgresql://unused/x"))
    with app.test_request_context(path, method=method, headers=headers):
        from flask import request

        expected = None if need is None else Requirement.of(*need)
        assert requirement(request) == expected


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def keys(clean_db: Engine) -> Iterator[Callable[..., str]]:
    """`keys(owner, *scopes)` → a fresh API key's token; the table is emptied around the test."""
    with clean_db.begin() as c:
        c.execute(text("TRUNCATE api_key"))

    def make(owner: str, *scopes: str) -> str:
        with clean_db.begin() as c:
            return api_keys.create_key(c, owner, scopes).token

    yield make
    with clean_db.begin() as c:
        c.execute(text("TRUNCATE api_key"))


def make_client(**overrides: Any) -> Any:
    from api import create_app

    settings = replace(get_settings(), **{"auth": "required", **overrides})
    app = create_app(settings)
    app.config["TESTING"] = True
    return app.test_client()


@pytest.fixture
def client_for(clean_db: Engine) -> Callable[..., Any]:
    """A test client with authentication required and the given Settings overrides."""
    return make_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def bundle(*entries: dict[str, Any], kind: str = "batch") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def assert_challenge(r: Any, status: int, code: str, error: str | None) -> None:
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.json["resourceType"] == "OperationOutcome"
    assert r.json["issue"][0]["code"] == code
    challenge = r.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="fhirq"')
    if error is None:
        assert "error=" not in challenge
    else:
        assert f'error="{error}"' in challenge


# --------------------------------------------------------------------------- API keys


def test_api_key_is_stored_hashed_and_used_then_revoked_through_the_cli(
    client_for: Callable[..., Any], keys: Any, clean_db: Engine
) -> None:
    from cli.token_commands import token as token_cli

    runner = CliRunner()
    r = runner.invoke(token_cli, ["create", "--owner", "etl", "--scope", "system/*.*",
                                  "--name", "nightly load"])
    assert r.exit_code == 0, r.output
    token = r.stdout.strip()
    assert token.startswith("fhq_") and len(token.splitlines()) == 1
    assert "shown once" in r.stderr
    key_id = token.split("_")[1]

    with clean_db.connect() as c:
        row = c.execute(text("SELECT * FROM api_key")).mappings().one()
    assert row["id"] == key_id and row["owner"] == "etl" and row["scopes"] == ["system/*.*"]
    assert token not in json.dumps({k: str(v) for k, v in row.items()})  # only its hash
    assert row["key_hash"] == api_keys.hash_token(token)

    listed = runner.invoke(token_cli, ["list"])
    assert listed.exit_code == 0 and key_id in listed.stdout and "nightly load" in listed.stdout
    assert token not in listed.stdout

    client = client_for(api_key_cache_seconds=0)
    created = client.post("/fhir/Patient", json=PATIENT, headers=bearer(token))
    assert created.status_code == 201, created.get_data(as_text=True)
    assert client.get("/fhir/Patient", headers=bearer(token)).status_code == 200

    r = runner.invoke(token_cli, ["revoke", key_id])
    assert r.exit_code == 0 and "revoked" in r.stdout
    assert_challenge(client.get("/fhir/Patient", headers=bearer(token)), 401, "login",
                     "invalid_token")
    assert runner.invoke(token_cli, ["list", "--owner", "etl"]).stdout.count(key_id) == 1
    assert runner.invoke(token_cli, ["revoke", "0000000000000000"]).exit_code != 0


def test_a_verified_key_is_trusted_for_the_cache_time_then_looked_up_again(
    client_for: Callable[..., Any], keys: Any, clean_db: Engine
) -> None:
    token = keys("etl", "system/*.read")
    client = client_for(api_key_cache_seconds=0.5)
    assert client.get("/jobs", headers=bearer(token)).status_code == 200
    with clean_db.begin() as c:
        assert api_keys.revoke_key(c, token.split("_")[1]) is not None
    assert client.get("/jobs", headers=bearer(token)).status_code == 200  # still trusted
    time.sleep(0.6)
    assert client.get("/jobs", headers=bearer(token)).status_code == 401


@pytest.mark.parametrize(
    "args",
    [
        ["--owner", "etl", "--scope", "patient/*.read"],  # grants nothing here
        ["--owner", "etl", "--scope", "system/*.read openid"],
        ["--owner", " ", "--scope", "system/*.*"],
        ["--owner", "etl"],
    ],
)
def test_token_create_refuses_useless_keys(keys: Any, args: list[str], clean_db: Engine) -> None:
    from cli.token_commands import token as token_cli

    r = CliRunner().invoke(token_cli, ["create", *args])
    assert r.exit_code != 0
    with clean_db.connect() as c:
        assert c.execute(text("SELECT count(*) FROM api_key")).scalar_one() == 0


def test_token_commands_register_as_a_cli_extension() -> None:
    import click

    from cli import token_commands

    group = click.Group("fhirq")
    token_commands.register(group)
    assert set(group.commands["token"].commands) == {"create", "list", "revoke"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer   ",
        "Basic ZXRsOnNlY3JldA==",
    ],
)
def test_missing_or_malformed_authorization_is_401_without_error(
    client_for: Callable[..., Any], header: str | None
) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = client_for().get("/fhir/Patient", headers=headers)
    assert_challenge(r, 401, "login", None)


def test_wrong_tokens_are_401_invalid_token(client_for: Callable[..., Any], keys: Any) -> None:
    good = keys("etl", "system/*.*")
    key_id = good.split("_")[1]
    wrong_secret = f"fhq_{key_id}_{'A' * 43}"
    client = client_for()
    for token in (wrong_secret, "fhq_0123456789abcdef_" + good.rsplit("_", 1)[1][-43:],
                  "fhq_nonsense", good + "x", "not-a-jwt-either"):
        r = client.get("/jobs", headers=bearer(token))
        assert_challenge(r, 401, "login", "invalid_token")
    assert client.get("/jobs", headers=bearer(good)).status_code == 200
    assert client.get("/jobs", headers={"Authorization": f"bearer {good}"}).status_code == 200


def test_insufficient_scope_is_403_naming_the_scope_needed(
    client_for: Callable[..., Any], keys: Any
) -> None:
    client = client_for()
    reader = keys("r", "system/Patient.read")
    writer = keys("w", "system/*.write")

    assert client.get("/fhir/Patient", headers=bearer(reader)).status_code == 200
    r = client.get("/fhir/Observation", headers=bearer(reader))
    assert_challenge(r, 403, "forbidden", "insufficient_scope")
    assert 'scope="system/Observation.read"' in r.headers["WWW-Authenticate"]
    assert "system/Observation.read" in r.json["issue"][0]["diagnostics"]
    r = client.post("/fhir/Patient", json=PATIENT, headers=bearer(reader))
    assert_challenge(r, 403, "forbidden", "insufficient_scope")
    assert client.get("/jobs", headers=bearer(reader)).status_code == 403  # needs *.read

    # Bundles may read as well as write: write alone is not enough.
    body = bundle({"resource": PATIENT, "request": {"method": "POST", "url": "Patient"}})
    r = client.post("/fhir", json=body, headers=bearer(writer))
    assert_challenge(r, 403, "forbidden", "insufficient_scope")
    assert 'scope="system/*.read system/*.write"' in r.headers["WWW-Authenticate"]
    upsert = client.put("/fhir", json=[{"resourceType": "Patient", "id": "p1"}],
                        headers=bearer(writer))
    assert upsert.status_code == 200, upsert.get_data(as_text=True)
    assert client.get("/fhir/Patient/p1", headers=bearer(writer)).status_code == 403

    both = keys("rw", "system/*.read", "system/*.write")
    assert client.post("/fhir", json=body, headers=bearer(both)).status_code == 200
    v2 = keys("v2", "system/*.cruds")
    assert client.post("/fhir", json=body, headers=bearer(v2)).status_code == 200


def test_health_and_metadata_stay_open(client_for: Callable[..., Any]) -> None:
    client = client_for()
    for path in ("/healthz", "/readyz", "/fhir/metadata"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert "WWW-Authenticate" not in r.headers
    assert client.get("/fhir/metadata").json["resourceType"] == "CapabilityStatement"
    assert client.open("/fhir/Patient", method="OPTIONS").status_code == 200
    # Open means read-only: writes at an open path still need a token.
    assert client.post("/fhir/metadata", json=PATIENT).status_code == 401
    for path in ("/jobs", "/fhir/Patient", "/fhir/_async/x", "/no/such/route"):
        assert client.get(path).status_code == 401, path


def test_auth_off_runs_everything_as_anonymous(clean_db: Engine) -> None:
    client = make_client(auth="off")
    r = client.post("/fhir/Patient", json=PATIENT)
    assert r.status_code == 201
    assert client.get("/jobs").status_code == 200


def test_fhirq_auth_must_be_required_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FHIRQ_AUTH", "Required")
    assert Settings().auth == "required"
    monkeypatch.setenv("FHIRQ_AUTH", "none")
    with pytest.raises(ValueError, match="FHIRQ_AUTH"):
        Settings()


# --------------------------------------------------------------------------- JWT


class Issuer:
    """An RSA and an EC P-256 signing key, their JWKS, and tokens signed with them."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.keys = {"rsa-1": (self.rsa, "RS256"), "ec-1": (self.ec, "ES256")}

    def jwks(self, kids: tuple[str, ...] = ("rsa-1", "ec-1")) -> dict[str, Any]:
        out = []
        for kid in kids:
            key, alg = self.keys[kid]
            codec = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
            jwk = json.loads(codec.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig"})
        return {"keys": out}

    def token(self, kid: str = "rsa-1", *, alg: str | None = None, key: Any = None,
              headers: dict[str, Any] | None = None, **claims: Any) -> str:
        signing_key, key_alg = self.keys.get(kid, (self.rsa, "RS256"))
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "svc", "scope": "system/*.*",
                "iat": now, "exp": now + 300, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or signing_key, algorithm=alg or key_alg,
                          headers={"kid": kid, **(headers or {})})


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
def jwks_file(issuer: Issuer, tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(issuer.jwks()))
    return path


@pytest.fixture
def jwt_client(clean_db: Engine, jwks_file: Path) -> Any:
    return make_client(jwks_file=str(jwks_file), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
def test_jwt_rs256_and_es256_authenticate_with_owner_and_scopes(
    jwt_client: Any, issuer: Issuer, kid: str
) -> None:
    token = issuer.token(kid, sub=f"svc-{kid}", scope="system/Patient.read system/Patient.write")
    created = jwt_client.post("/fhir/Patient", json=PATIENT, headers=bearer(token))
    assert created.status_code == 201, created.get_data(as_text=True)
    assert jwt_client.get("/fhir/Patient", headers=bearer(token)).status_code == 200
    r = jwt_client.get("/fhir/Observation", headers=bearer(token))
    assert_challenge(r, 403, "forbidden", "insufficient_scope")


def test_jwt_scopes_from_scp_and_owner_from_client_id(jwt_client: Any, issuer: Issuer) -> None:
    as_list = issuer.token(scope=None, scp=["system/*.read"], sub=None, client_id="app-7")
    assert jwt_client.get("/jobs", headers=bearer(as_list)).status_code == 200
    as_text = issuer.token("ec-1", scope=None, scp="system/Patient.rs")
    assert jwt_client.get("/fhir/Patient", headers=bearer(as_text)).status_code == 200
    no_scope = issuer.token(scope=None)
    assert jwt_client.get("/fhir/Patient", headers=bearer(no_scope)).status_code == 403


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "expired"),
        ("not yet valid", "not valid yet"),
        ("wrong audience", "aud"),
        ("no audience", "'aud'"),
        ("wrong issuer", "issuer"),
        ("no expiry", "'exp'"),
        ("no owner", "owner"),
        ("owner with NUL", "control characters"),
        ("owner too long", "at most 255"),
        ("unknown kid", "'rsa-9'"),
        ("other key, same kid", "signature"),
        ("HS256 with the public key", "HS256"),
        ("ES256 header on the RSA key", "does not match"),
        ("alg none", "'none'"),
        ("garbage", "neither"),
    ],
)
def test_bad_jwts_are_401_saying_why(jwt_client: Any, issuer: Issuer, case: str,
                                     reason: str) -> None:
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: issuer.token(exp=now - 3600, iat=now - 7200),
        "not yet valid": lambda: issuer.token(nbf=now + 3600),
        "wrong audience": lambda: issuer.token(aud="https://other.test"),
        "no audience": lambda: issuer.token(aud=None),
        "wrong issuer": lambda: issuer.token(iss="https://evil.test"),
        "no expiry": lambda: issuer.token(exp=None),
        "no owner": lambda: issuer.token(sub=None),
        "owner with NUL": lambda: issuer.token(sub="etl\u0000x"),
        "owner too long": lambda: issuer.token(sub="x" * 256),
        "unknown kid": lambda: issuer.token("rsa-9"),
        "other key, same kid": lambda: issuer.token("rsa-1", key=other),
        "HS256 with the public key": lambda: _hs256_confusion(issuer),
        "ES256 header on the RSA key": lambda: _forge_alg(issuer.token("rsa-1"), "ES256"),
        "alg none": lambda: jwt.encode({"sub": "x", "iss": ISSUER, "aud": AUDIENCE,
                                        "exp": now + 60}, None, algorithm="none",
                                       headers={"kid": "rsa-1"}),
        "garbage": lambda: "abc.def.ghi",
    }
    r = jwt_client.get("/fhir/Patient", headers=bearer(tokens[case]()))
    assert_challenge(r, 401, "login", "invalid_token")
    assert reason in r.json["issue"][0]["diagnostics"]


def _hs256_confusion(issuer: Issuer) -> str:
    """The classic attack: an HMAC token keyed with the server's public RSA key."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}).encode())
    body = b64(json.dumps({"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 60,
                           "scope": "system/*.*"}).encode())
    secret = json.dumps(issuer.jwks(("rsa-1",))["keys"][0]).encode()
    sig = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(sig)}"


def _forge_alg(token: str, alg: str) -> str:
    import base64

    header, body, sig = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    decoded["alg"] = alg
    new = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{new}.{body}.{sig}"


def test_jwts_are_refused_without_a_jwks(client_for: Callable[..., Any],
                                          issuer: Issuer) -> None:
    r = client_for().get("/fhir/Patient", headers=bearer(issuer.token()))
    assert_challenge(r, 401, "login", "invalid_token")
    assert "no JWKS" in r.json["issue"][0]["diagnostics"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"jwks_file": "/x.json", "jwt_issuer": ISSUER},
        {"jwks_url": "https://x/jwks", "jwt_audience": AUDIENCE},
        {"jwks_url": "https://x/jwks", "jwks_file": "/x.json", "jwt_issuer": ISSUER,
         "jwt_audience": AUDIENCE},
    ],
)
def test_a_jwks_without_issuer_and_audience_stops_the_app(overrides: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="FHIRQ_JW"):
        make_client(**overrides)


def test_jwks_file_is_reread_when_it_changes(jwt_client: Any, issuer: Issuer,
                                             jwks_file: Path) -> None:
    ec_token = issuer.token("ec-1")
    assert jwt_client.get("/fhir/Patient", headers=bearer(ec_token)).status_code == 200
    jwks_file.write_text(json.dumps(issuer.jwks(("rsa-1",)) | {"padding": "changed size"}))
    assert jwt_client.get("/fhir/Patient", headers=bearer(ec_token)).status_code == 401
    assert jwt_client.get("/fhir/Patient", headers=bearer(issuer.token())).status_code == 200


class _JwksServer:
    """A real HTTP server on loopback serving whatever JWKS `document` holds, counting hits."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.hits = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                owner.hits += 1
                body = json.dumps(owner.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server() -> Iterator[_JwksServer]:
    server = _JwksServer()
    yield server
    server.close()


def test_jwks_url_is_fetched_cached_and_refetched_for_a_new_kid(
    clean_db: Engine, issuer: Issuer, jwks_server: _JwksServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    jwks_server.document = issuer.jwks(("rsa-1",))
    client = make_client(jwks_url=jwks_server.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    for _ in range(3):
        assert client.get("/fhir/Patient", headers=bearer(issuer.token())).status_code == 200
    assert jwks_server.hits == 1

    # The issuer rotates in a new key: a token naming it makes one early refetch.
    monkeypatch.setattr(jwt_tokens, "JWKS_MIN_REFETCH", 0.0)
    jwks_server.document = issuer.jwks(("rsa-1", "ec-1"))
    assert client.get("/fhir/Patient", headers=bearer(issuer.token("ec-1"))).status_code == 200
    assert jwks_server.hits == 2

    # A JWKS that cannot be fetched at all is the server's failure, not the token's.
    jwks_server.close()
    down = make_client(jwks_url=jwks_server.url + "?other", jwt_issuer=ISSUER,
                       jwt_audience=AUDIENCE)
    r = down.get("/fhir/Patient", headers=bearer(issuer.token()))
    assert r.status_code == 503 and r.json["issue"][0]["code"] == "transient"
    # ...while the cached keys keep serving the first app.
    assert client.get("/fhir/Patient", headers=bearer(issuer.token())).status_code == 200


# --------------------------------------------------------------------------- ownership


def test_jobs_are_visible_to_their_owner_only_through_real_tokens(
    jobs_env: dict[str, str], worker: WorkerProcess, keys: Any, clean_db: Engine,
    jwks_file: Path, issuer: Issuer
) -> None:
    client = make_client(jwks_file=str(jwks_file), jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    alice = bearer(keys("alice", "system/*.*"))
    alice_jwt = bearer(issuer.token("ec-1", sub="alice"))  # same owner, other kind of token
    bob = bearer(keys("bob", "system/*.*"))

    job_id = job_id_of(submit(client, patients_batch(3), **alice))
    with clean_db.connect() as c:
        assert c.execute(text("SELECT owner FROM job")).scalar_one() == "alice"

    def finished() -> bool:
        return client.get(f"/jobs/{job_id}", headers=alice).json["state"] == "completed"

    from tests.jobs_helpers import wait_for

    wait_for(finished, 60, "the job to complete", on_timeout=worker.tail)
    assert client.get(f"/fhir/_async/{job_id}", headers=alice).status_code == 200
    assert client.get(f"/jobs/{job_id}/entries", headers=alice_jwt).status_code == 200

    for method, url in [("GET", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/entries"),
                        ("GET", f"/fhir/_async/{job_id}"), ("POST", f"/jobs/{job_id}/retry"),
                        ("DELETE", f"/fhir/_async/{job_id}")]:
        r = client.open(url, method=method, headers=bob)
        assert r.status_code == 404, (method, url)
        assert r.json["resourceType"] == "OperationOutcome"
    assert client.get("/jobs", headers=bob).json["jobs"] == []
    assert [j["id"] for j in client.get("/jobs", headers=alice_jwt).json["jobs"]] == [job_id]

    # Jobs of an unauthenticated server (owner "anonymous") belong to no token holder.
    anonymous = make_client(auth="off")
    anon_job = job_id_of(submit(anonymous, patients_batch(1, "anon")))
    assert client.get(f"/jobs/{anon_job}", headers=alice).status_code == 404
    assert anonymous.get(f"/jobs/{job_id}").status_code == 404


def test_cli_sends_its_token_to_a_real_server(
    jobs_env: dict[str, str], keys: Any, clean_db: Engine
) -> None:
    from cli.main import cli

    server = ApiServer({**jobs_env, "FHIRQ_AUTH": "required"}).start()
    try:
        token = keys("carol", "system/*.read")
        ok = CliRunner().invoke(cli, ["jobs", "--server", server.url, "--token", token])
        assert ok.exit_code == 0, ok.output
        refused = CliRunner().invoke(cli, ["jobs", "--server", server.url])
        assert refused.exit_code != 0 and "401" in refused.output
        import httpx

        r = httpx.get(f"{server.url}/jobs", timeout=10, trust_env=False)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert httpx.get(f"{server.url}/healthz", timeout=10, trust_env=False).status_code == 200
    finally:
        server.stop()


# --------------------------------------------------------------------------- fhirq up


@pytest.mark.parametrize(
    ("host", "configured", "mode"),
    [
        ("127.0.0.1", None, "off"),
        ("localhost", "", "off"),
        ("::1", "required", "required"),
        ("127.0.0.1", "off", "off"),
        ("0.0.0.0", "required", "required"),
        ("192.168.1.10", " Required ", "required"),
        ("0.0.0.0", None, None),
        ("0.0.0.0", "off", None),
        ("127.0.0.1", "maybe", None),
    ],
)
def test_up_runs_without_auth_only_on_loopback(host: str, configured: str | None,
                                               mode: str | None) -> None:
    from cli.up import UpError, auth_mode

    if mode is None:
        with pytest.raises(UpError) as err:
            auth_mode(host, configured)
        assert "loopback" in str(err.value) or "FHIRQ_AUTH" in str(err.value)
    else:
        assert auth_mode(host, configured) == mode


def test_up_refuses_auth_off_on_a_public_address_and_starts_nothing(tmp_path: Path) -> None:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRQ_")}
    env["FHIRQ_AUTH"] = "off"
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "up", "--host", "0.0.0.0", "--data-dir",
         str(data_dir)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "FHIRQ_AUTH=off is for loopback only" in result.stderr
    assert not (data_dir / "postgres").exists()

"""Hostile input, generated: every request a client can get wrong gets a 2xx or a 4xx
OperationOutcome — never a 5xx, never a hang — and a request that is refused changes nothing
stored.

Property-based (hypothesis). The sync run sends FHIRQ_HOSTILE_EXAMPLES (default 1,100) requests
through the Flask app over the real PostgreSQL: bundles (batch and transaction) whose envelope
and entries are valid templates with one or two members replaced by hostile JSON (wrong types,
control characters, huge numbers, odd strings), REST writes, JSON Patch and FHIRPath Patch
bodies, batch upserts (array and NDJSON), raw bodies, search URLs, instance paths, job routes,
each with a few hostile headers. A set of canary resources (several versions, a deletion, a
reference) is compared in SQL (content, versions, history) before and after each request; a
refused one must leave it as it was. The async run submits a sample of the same bundles as jobs
to a real Celery worker and polls each to its end. The HTTP run sends raw bytes to a real
gunicorn (odd methods, request targets, versions, header names and values, chunked and sized
bodies), which no HTTP library would send.

Reproducible: FHIRQ_HOSTILE_SEED picks the seed (printed in the summary line and in every
failure), e.g. `FHIRQ_HOSTILE_SEED=7 python -m pytest -q tests/test_hostile.py`.
Not generated here (covered by tests/test_bounded_eval.py and tests/test_slow_clients.py):
catastrophic regular expressions in FHIRPath and slow clients.
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, Phase, given, note, seed, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text

from tests.http_helpers import exchange, gunicorn_api  # noqa: F401 - a fixture
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import wait_job
from tests.store_sql import CURRENT

SEED = int(os.environ.get("FHIRQ_HOSTILE_SEED", "20261201"))
EXAMPLES = int(os.environ.get("FHIRQ_HOSTILE_EXAMPLES", "1100"))
ASYNC_JOBS = int(os.environ.get("FHIRQ_HOSTILE_JOBS", "8"))
HTTP_EXAMPLES = int(os.environ.get("FHIRQ_HOSTILE_HTTP_EXAMPLES", "200"))
# A request that takes longer than this is a hang (the app runs in this process: generous).
REQUEST_SECONDS = float(os.environ.get("FHIRQ_HOSTILE_TIMEOUT", "20"))
# A 503 says the database was briefly unavailable (a shared test server out of connections),
# not that the input broke anything: the request is sent again, and a 503 that lasts fails.
UNAVAILABLE_RETRIES = 5

CANARY = "canary-"

# --------------------------------------------------------------------------- hostile values

CONTROL = [chr(c) for c in range(0x20) if c not in (9, 10, 13)] + ["\x7f"]
NASTY = [
    "", " ", "\x00", "a\x00b", "\x01", "\x1f", "%00", "%", "%zz", "%2F", "²", "١٢", "-1", "0",
    "9223372036854775808", "2147483648", "99999999999999999999999", "1e400", "NaN", "null",
    "true", "'", '"', "\\", "\\u0000", "../..", "Patient", "Patient/canary-1",
    "Patient?identifier=urn:canary|canary-1", "urn:uuid:" + str(uuid.UUID(int=1)), 'W/"1"',
    'W/"²"', "W/", "a" * 300, "💥", "' OR 1=1 --", "$everything", "_history", "_search", "*",
    "|", ",", "$", ":", "gt", "ge2020-01-01", "2020-13-45", "9999-12-31T23:59:59Z",
    "0001-01-01", "1970-01-01T00:00:00+99:00", "Patient.name", "http://127.0.0.1/x",
    "canary-1", "canary-del", "#", "?", "&", "=",
]
# Well-formed but extreme FHIR values: where a type check passes, can indexing or SQL cope?
EDGE = [
    "0001-01-01", "9999-12-31", "9999-12-31T23:59:59.999999999+14:00", "0001-01-01T00:00:00-12:00",
    "2020-02-30", "2020", "2020-01", "-0001", "10000-01-01", "2020-01-01T25:00:00Z", "T00:00",
    "1e308", "-1e308", "1E-400", "0.000000000000000000000000000001",
    "123456789012345678901234567890",
    "Patient/", "Patient/canary-1/_history/1", "urn:uuid:" + str(uuid.UUID(int=9)),
    "Patient?identifier=%00", "Patient?identifier=urn:canary|canary-1", "http://other/Patient/1",
    "Patient/" + "a" * 65, "#", "#x", "Observation/canary-obs", "Patient/canary-del",
]
PREFIXES = ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "xx"]
EDGE_INTS = [2**31 - 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, -1, 0]
KEYS = [
    "resourceType", "id", "meta", "versionId", "name", "family", "given", "url", "method",
    "op", "path", "from", "value", "reference", "_birthDate", "birthDate", "extension",
    "contained", "entry", "request", "resource", "fullUrl", "ifMatch", "ifNoneExist",
    "ifNoneMatch", "parameter", "part", "valueString", "valueCode", "valueInteger", "type",
    "subject", "identifier", "system", "data", "contentType",
]

hostile_text = st.one_of(
    st.sampled_from(NASTY),
    st.sampled_from(EDGE),
    st.text(max_size=12),
    st.text(alphabet=st.sampled_from([*CONTROL, "a", "|", ",", "$", ":", "/"]), max_size=6),
)
hostile_key = st.one_of(st.sampled_from(KEYS), hostile_text)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from(EDGE_INTS),
    st.floats(allow_nan=False, allow_infinity=False),
    hostile_text,
)
json_values = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3), st.dictionaries(hostile_key, kids, max_size=3)
    ),
    max_leaves=6,
)

# --------------------------------------------------------------------------- templates


def patient(rid: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:canary", "value": rid or "new"}],
        "name": [{"family": "Canary", "given": ["A"]}],
        "birthDate": "1970-01-01",
        "telecom": [{"system": "phone", "value": "555"}],
    }
    if rid:
        body["id"] = rid
    return body


def observation() -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": "Patient/canary-1"},
        "effectiveDateTime": "2020-01-01T00:00:00Z",
        "valueQuantity": {"value": 180, "unit": "cm"},
    }


JSON_PATCH = [
    {"op": "replace", "path": "/birthDate", "value": "1980-02-02"},
    {"op": "add", "path": "/name/0/given/-", "value": "B"},
]
FHIRPATH_PATCH = {
    "resourceType": "Parameters",
    "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"},
        {"name": "path", "valueString": "Patient.birthDate"},
        {"name": "value", "valueDate": "1981-03-03"},
    ]}],
}


def binary(ops: Any) -> dict[str, Any]:
    import base64

    return {"resourceType": "Binary", "contentType": "application/json-patch+json",
            "data": base64.b64encode(json.dumps(ops).encode()).decode()}


def entry_templates() -> list[dict[str, Any]]:
    return [
        {"fullUrl": "urn:uuid:" + str(uuid.UUID(int=7)), "resource": patient(),
         "request": {"method": "POST", "url": "Patient",
                     "ifNoneExist": "identifier=urn:canary|new"}},
        {"resource": patient("canary-1"),
         "request": {"method": "PUT", "url": "Patient/canary-1", "ifMatch": 'W/"2"'}},
        {"resource": patient("canary-2"), "request": {"method": "PUT", "url": "Patient/canary-2"}},
        {"resource": observation(), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": "Patient?identifier=urn:canary|canary-3"}},
        {"request": {"method": "DELETE", "url": "Patient/canary-4"}},
        {"request": {"method": "GET", "url": "Patient?family=Canary&_count=2"}},
        {"request": {"method": "GET", "url": "Patient/canary-1/_history/1"}},
        {"resource": binary(JSON_PATCH), "request": {"method": "PATCH", "url": "Patient/canary-2"}},
        {"resource": FHIRPATH_PATCH, "request": {"method": "PATCH", "url": "Patient/canary-1"}},
    ]


# --------------------------------------------------------------------------- mutation


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw: Any, template: Any, max_changes: int = 2) -> Any:
    """`template` with 1..max_changes members replaced by hostile JSON, deleted, or added."""
    doc = copy.deepcopy(template)
    for _ in range(draw(st.integers(1, max_changes))):
        path = draw(st.sampled_from(list(_paths(doc))))
        value = draw(json_values)
        if not path:
            doc = value
            continue
        parent = doc
        for step in path[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = value
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(hostile_key)] = value
        else:
            parent.append(value)
    return doc


# --------------------------------------------------------------------------- requests


@dataclass
class Req:
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = "application/fhir+json"
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        body = (self.body or b"")[:400]
        return (f"Req({self.method} {self.path[:300]!r} type={self.content_type!r} "
                f"headers={self.headers!r} body={body!r})")


def dump(draw: Any, doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()


header_value = st.one_of(
    st.sampled_from(NASTY[:-10]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
            max_size=12),
).filter(lambda v: "respond-async" not in v)  # the sync run queues no jobs
HEADER_NAMES = ["Prefer", "If-Match", "If-None-Exist", "If-None-Match", "Accept",
                "If-Modified-Since", "Idempotency-Key", "X-Callback-Url", "Authorization",
                "X-Forwarded-Host", "X-Hostile"]


@st.composite
def headers(draw: Any) -> dict[str, str]:
    names = draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=2, unique=True))
    out = {n: draw(header_value) for n in names}
    if draw(st.booleans()):
        out["Prefer"] = draw(st.sampled_from(
            ["return=minimal", "return=representation", "return=OperationOutcome"]))
    return out


TARGET_IDS = ["canary-1", "canary-2", "canary-del", "canary-obs", "nobody"]
target_id = st.one_of(st.sampled_from(TARGET_IDS), hostile_text)


def seg(draw: Any, value: str) -> str:
    """A path segment, percent-encoded (or, sometimes, raw where it is safe to send raw)."""
    return quote(value, safe=draw(st.sampled_from(["", "$:@", "/?=&"])))


@st.composite
def bundle_requests(draw: Any) -> Req:
    entries = draw(st.lists(
        st.sampled_from(entry_templates()).flatmap(mutated), min_size=1, max_size=3))
    if draw(st.booleans()):  # some valid entries next to the hostile ones
        entries += draw(st.lists(st.sampled_from(entry_templates()), max_size=2))
    kind = draw(st.sampled_from(["batch", "transaction"]))
    body: Any = {"resourceType": "Bundle", "type": kind, "entry": entries}
    if draw(st.integers(0, 4)) == 0:
        body = draw(mutated(body, 1))
    return Req("POST", "/fhir", dump(draw, body), headers=draw(headers()))


TYPED_PLACES = [
    ("Patient", ("birthDate",)), ("Patient", ("deceasedDateTime",)),
    ("Patient", ("multipleBirthInteger",)), ("Patient", ("managingOrganization", "reference")),
    ("Patient", ("generalPractitioner", 0, "reference")), ("Patient", ("meta", "lastUpdated")),
    ("Patient", ("meta", "versionId")), ("Observation", ("effectiveDateTime",)),
    ("Observation", ("valueQuantity", "value")), ("Observation", ("subject", "reference")),
    ("Observation", ("issued",)), ("Observation", ("valueInteger",)),
]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    """doc[path] = value, creating the objects and arrays on the way."""
    node = doc
    for step, after in zip(path, path[1:], strict=False):
        if isinstance(node, list):
            node.extend({} for _ in range(step + 1 - len(node)))
            node = node[step]
        else:
            node = node.setdefault(step, [] if isinstance(after, int) else {})
    if isinstance(node, list):
        node.extend(None for _ in range(path[-1] + 1 - len(node)))
    node[path[-1]] = value


@st.composite
def typed_edges(draw: Any) -> Req:
    """A resource whose only oddity is an extreme value in a typed element."""
    rtype, path = draw(st.sampled_from(TYPED_PLACES))
    doc: Any = patient() if rtype == "Patient" else observation()
    value = draw(st.one_of(st.sampled_from(EDGE), st.sampled_from(EDGE_INTS),
                           st.floats(allow_nan=False, allow_infinity=False)))
    if rtype == "Observation" and path[0].startswith("value"):
        doc.pop("valueQuantity")
    _set(doc, path, value)
    if draw(st.booleans()):
        body = {"resourceType": "Bundle", "type": draw(st.sampled_from(["batch", "transaction"])),
                "entry": [{"resource": doc, "request": {"method": "POST", "url": rtype}}]}
        return Req("POST", "/fhir", dump(draw, body))
    return Req("POST", f"/fhir/{rtype}", dump(draw, doc), headers=draw(headers()))


@st.composite
def rest_writes(draw: Any) -> Req:
    rid = draw(target_id)
    doc = draw(mutated(patient(rid if rid in TARGET_IDS else "canary-1")))
    if draw(st.booleans()):
        return Req("POST", "/fhir/Patient", dump(draw, doc), headers=draw(headers()))
    return Req("PUT", f"/fhir/Patient/{seg(draw, rid)}", dump(draw, doc),
               headers=draw(headers()))


@st.composite
def patches(draw: Any) -> Req:
    rid = draw(st.one_of(st.sampled_from(TARGET_IDS), target_id))
    path = f"/fhir/Patient/{seg(draw, rid)}"
    if draw(st.booleans()):
        body = dump(draw, draw(mutated(JSON_PATCH)))
        return Req("PATCH", path, body, "application/json-patch+json", draw(headers()))
    return Req("PATCH", path, dump(draw, draw(mutated(FHIRPATH_PATCH))), headers=draw(headers()))


@st.composite
def upserts(draw: Any) -> Req:
    rows = draw(st.lists(
        st.one_of(st.sampled_from(TARGET_IDS[:2]).map(patient).flatmap(mutated),
                  st.just(patient("canary-2"))),
        min_size=1, max_size=3))
    if draw(st.booleans()):
        return Req("PUT", "/fhir", dump(draw, rows), headers=draw(headers()))
    lines = [dump(draw, r) for r in rows] + draw(st.lists(st.binary(max_size=20), max_size=1))
    return Req("PUT", "/fhir", b"\n".join(lines), "application/fhir+ndjson", draw(headers()))


RAW_BODIES = [
    b"", b"{", b"[", b"null", b"[]", b"{}", b'"Bundle"', b"\xef\xbb\xbf{}", b"\xff\xfe",
    b'{"resourceType":"Bundle","type":"batch","entry":' + b"[" * 200 + b"]" * 200 + b"}",
    b'{"resourceType":"Bundle","type":"batch","entry":[' + b'{"request":1},' * 50 + b"{}]}",
    b'{"a":"\\ud800"}', b'{"a":1e400}', b'{"a":"\\u0000"}',
    b'{"resourceType":"Bundle","a":1,"a":2}',
]


@st.composite
def raw_bodies(draw: Any) -> Req:
    body = draw(st.one_of(st.sampled_from(RAW_BODIES), st.binary(max_size=64)))
    ctype = draw(st.sampled_from([
        "application/fhir+json", "application/json", "application/fhir+ndjson", "text/plain",
        "application/xml", "multipart/form-data", "application/json; charset=latin-1", None,
    ]))
    method, path = draw(st.sampled_from([
        ("POST", "/fhir"), ("PUT", "/fhir"), ("POST", "/fhir/Patient"),
        ("PUT", "/fhir/Patient/canary-1"), ("PATCH", "/fhir/Patient/canary-1"),
        ("POST", "/fhir/Patient/_search"),
    ]))
    return Req(method, path, body, ctype, draw(headers()))


SEARCH_PARAMS = [
    "family", "name", "_id", "identifier", "birthdate", "gender", "_count", "_offset",
    "_lastUpdated", "general-practitioner", "organization.name", "_include", "_revinclude",
    "_sort", "name:exact", "name:contains", "family:missing", "identifier:of-type", "_total",
    "_summary", "_has:Observation:subject:code", "subject", "value-quantity", "date", "code",
    "_since", "_elements", "_format",
]


@st.composite
def searches(draw: Any) -> Req:
    rtype = draw(st.one_of(st.sampled_from(["Patient", "Observation", "Patient/_history",
                                            "Patient/canary-1/_history"]), hostile_text))
    value = st.one_of(hostile_text, st.builds(
        lambda p, v, unit: p + v + unit, st.sampled_from(PREFIXES), st.sampled_from(EDGE),
        st.sampled_from(["", "|http://unitsofmeasure.org|cm", "||cm", "|", ",x"])))
    pairs = draw(st.lists(st.tuples(st.one_of(st.sampled_from(SEARCH_PARAMS), hostile_text),
                                    value), min_size=1, max_size=3))
    safe = draw(st.sampled_from(["", "|,:$", "%"]))
    query = "&".join(f"{quote(k, safe=safe)}={quote(v, safe=safe)}" for k, v in pairs)
    if draw(st.integers(0, 5)) == 0:
        return Req("POST", "/fhir/Patient/_search", query.encode(),
                   "application/x-www-form-urlencoded", draw(headers()))
    if draw(st.integers(0, 5)) == 0:
        body = dump(draw, {"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": f"{rtype}?{query}"}}]})
        return Req("POST", "/fhir", body)
    return Req("GET", f"/fhir/{quote(rtype, safe='/')}?{query}", None, None, draw(headers()))


@st.composite
def instance_paths(draw: Any) -> Req:
    parts = draw(st.lists(st.one_of(st.sampled_from(
        ["Patient", "Observation", "canary-1", "canary-del", "_history", "1", "2", "_search",
         "$everything", "metadata"]), hostile_text), min_size=1, max_size=4))
    method = draw(st.sampled_from(["GET", "HEAD", "DELETE", "GET", "OPTIONS"]))
    path = "/fhir/" + "/".join(seg(draw, p) for p in parts)
    return Req(method, path, None, None, draw(headers()))


@st.composite
def job_routes(draw: Any) -> Req:
    job = draw(st.one_of(st.just(str(uuid.UUID(int=5))), hostile_text))
    value = draw(hostile_text)
    method, path = draw(st.sampled_from([
        ("GET", f"/jobs/{quote(job)}"), ("GET", f"/fhir/_async/{quote(job)}"),
        ("DELETE", f"/fhir/_async/{quote(job)}"), ("POST", f"/jobs/{quote(job)}/retry"),
        ("GET", f"/jobs?state={quote(value)}&_count={quote(value)}"),
        ("GET", f"/jobs/{quote(job)}/entries?outcome={quote(value)}&_after={quote(value)}"),
        ("GET", f"/jobs/{quote(job)}/entries?_count={quote(value)}"),
        ("GET", f"/jobs?_offset={quote(value)}"),
    ]))
    return Req(method, path, None, None, draw(headers()))


all_requests = st.one_of(
    bundle_requests(), bundle_requests(), rest_writes(), patches(), upserts(), raw_bodies(),
    searches(), searches(), instance_paths(), job_routes(), typed_edges(),
)

# --------------------------------------------------------------------------- checks


def send(client: Any, req: Req) -> tuple[Any, float]:
    """The response, or None when it did not come within REQUEST_SECONDS (a hang)."""
    out: list[Any] = []

    def run() -> None:
        out.append(client.open(req.path, method=req.method, data=req.body,
                               content_type=req.content_type, headers=req.headers))

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(REQUEST_SECONDS)
    return (out[0] if out else None), time.monotonic() - start


def _statuses(body: Any) -> list[int]:
    """Per-entry statuses of a batch/transaction response or an upsert answer."""
    if isinstance(body, dict) and body.get("resourceType") == "Bundle" and str(
        body.get("type", "")
    ).endswith("-response"):
        return [int(e["response"]["status"][:3]) for e in body.get("entry", [])]
    if isinstance(body, list):
        return [400 if isinstance(x, dict) and x.get("resourceType") == "OperationOutcome"
                else 200 for x in body]
    return []


def _outcome_code(response: Any) -> str | None:
    body = response.get_json(silent=True)
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        return (body.get("issue") or [{}])[0].get("code")
    return None


def judge(req: Req, response: Any) -> tuple[str, bool]:
    """("2xx" | "4xx", refused?) — or AssertionError for a 5xx, or a 4xx that is not an
    OperationOutcome."""
    status = response.status_code
    if status == 501 and (req.method == "HEAD" or _outcome_code(response) == "not-supported"):
        return "501", True  # an operation fhirq does not implement (`$everything`): by design
    assert status < 500, f"{status} for {req!r}: {response.get_data(as_text=True)[:500]}"
    if status >= 400:
        if req.method != "HEAD":
            body = response.get_json(silent=True)
            assert isinstance(body, dict) and body.get("resourceType") == "OperationOutcome", (
                f"{status} is not an OperationOutcome for {req!r}: "
                f"{response.get_data(as_text=True)[:300]}"
            )
            assert body.get("issue"), body
        return "4xx", True
    entries = _statuses(response.get_json(silent=True)) if req.method != "HEAD" else []
    assert all(s < 500 or s == 501 for s in entries), f"entry 5xx {entries} for {req!r}"
    return "2xx", bool(entries) and all(s >= 400 for s in entries)


_CANARIES = text("""
SELECT (SELECT json_agg(json_build_array(res_type, res_id, version, deleted, md5(content::text))
                        ORDER BY res_type, res_id)
        FROM """ + CURRENT + """ r WHERE res_id LIKE 'canary-%')::text,
       (SELECT count(*) || ' ' || coalesce(sum(version), 0)
        FROM resource_history WHERE res_id LIKE 'canary-%')
""")


class Canaries:
    """The canary resources as stored (content, versions, history), one statement a look."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last = self.snapshot()

    def snapshot(self) -> tuple[Any, ...]:
        with self.engine.connect() as c:
            return tuple(c.execute(_CANARIES).one())

    def changed(self) -> bool:
        """Whether they changed since the previous look."""
        now = self.snapshot()
        changed, self.last = now != self.last, now
        return changed


def store_canaries(client: Any) -> None:
    """Patients with two versions each, one of them then deleted, and an Observation pointing
    at one (run again, each gets new versions)."""
    for rid in ("canary-1", "canary-2", "canary-3", "canary-4", "canary-del"):
        for family in ("Canary", "Canary2"):
            doc = patient(rid)
            doc["name"][0]["family"] = family
            r = client.put(f"/fhir/Patient/{rid}", json=doc)
            assert r.status_code in (200, 201), r.get_json()
    assert client.delete("/fhir/Patient/canary-del").status_code == 204
    obs = {**observation(), "id": "canary-obs"}
    assert client.put("/fhir/Observation/canary-obs", json=obs).status_code in (200, 201)


class Tally(Counter[str]):
    def line(self, what: str) -> str:
        return (f"hostile {what}: seed={SEED} requests={self['requests']} 2xx={self['2xx']} "
                f"4xx={self['4xx']} 501-not-supported={self['501']} 5xx={self['5xx']} "
                f"hangs={self['hangs']} 503-retried={self['503-retried']} "
                f"canary_changes={self['canary_changes']}")


def check_one(
    watch: Canaries, tally: Tally, what: object, answer: Callable[[], tuple[str, bool] | None]
) -> None:
    """Count and check one request: `answer` sends it and judges the answer (None: no answer
    in time); a refused request must leave the canaries as they were."""
    note(f"FHIRQ_HOSTILE_SEED={SEED}")
    tally["requests"] += 1
    try:
        verdict = answer()
    except AssertionError:
        tally["5xx"] += 1
        raise
    if verdict is None:
        tally["hangs"] += 1
        raise AssertionError(f"no answer within {REQUEST_SECONDS}s (seed {SEED}): {what!r}")
    kind, refused = verdict
    tally[kind] += 1
    if watch.changed() and refused:
        tally["canary_changes"] += 1
        raise AssertionError(f"a refused request changed the canaries (seed {SEED}): {what!r}")


def _report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():  # the summary line shows in every run, captured or not
        print(f"\n{line}")


HYPOTHESIS = {
    "deadline": None,
    "database": None,
    "derandomize": False,
    "report_multiple_bugs": False,
    "phases": [Phase.generate, Phase.shrink],
    "suppress_health_check": list(HealthCheck),
}


# --------------------------------------------------------------------------- the runs


@pytest.fixture(scope="module")
def hostile_app(engine: Engine) -> Any:
    from dataclasses import replace

    from api import create_app
    from core.config import get_settings

    with engine.begin() as c:
        c.execute(text("TRUNCATE resource, resource_history, resource_string, resource_date, "
                       "resource_number, job, job_entry CASCADE"))
    app = create_app(replace(get_settings(), auth="off"))
    app.config["TESTING"] = True
    return app


def test_sync_hostile_requests(
    hostile_app: Any, engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    client = hostile_app.test_client()
    store_canaries(client)
    tally, watch = Tally(), Canaries(engine)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, **HYPOTHESIS)
    @given(req=all_requests)
    def run(req: Req) -> None:
        def answer() -> tuple[str, bool] | None:
            response, _ = send(client, req)
            for _ in range(UNAVAILABLE_RETRIES):
                if response is None or response.status_code != 503:
                    break
                tally["503-retried"] += 1
                time.sleep(1)
                response, _ = send(client, req)
            return None if response is None else judge(req, response)

        check_one(watch, tally, req, answer)

    try:
        run()
    finally:
        _report(capsys, tally.line("sync"))
    assert tally["requests"] >= min(EXAMPLES, 1000), tally.line("sync")
    assert tally["4xx"] and tally["2xx"], tally.line("sync")  # both kinds were exercised


def test_async_hostile_jobs(
    api: Any, worker: Any, clean_db: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    store_canaries(api)
    tally, watch = Tally(), Canaries(clean_db)
    job_bodies = st.one_of(bundle_requests(), upserts())

    @seed(SEED)
    @settings(max_examples=ASYNC_JOBS, **HYPOTHESIS)
    @given(req=job_bodies)
    def run(req: Req) -> None:
        note(f"FHIRQ_HOSTILE_SEED={SEED}")
        req.headers = {**req.headers, "Prefer": "respond-async"}
        req.headers.pop("X-Callback-Url", None)  # callbacks: tests/test_callbacks
        response, _ = send(api, req)
        tally["requests"] += 1
        assert response is not None, f"no answer to the submission of {req!r}"
        if response.status_code != 202:
            kind, _ = judge(req, response)
            tally[kind] += 1
            assert not watch.changed(), f"a refused submission changed the canaries: {req!r}"
            return
        job_id = response.headers["Content-Location"].rsplit("/", 1)[-1]
        job = wait_job(api, job_id, timeout=120, worker=worker)
        result = api.get(f"/fhir/_async/{job_id}")
        kind, refused = judge(req, result)
        tally[kind] += 1
        tally["jobs"] += 1
        if watch.changed() and refused:
            tally["canary_changes"] += 1
            raise AssertionError(f"job {job_id} ({job['state']}) refused yet changed canaries")

    try:
        run()
    finally:
        _report(capsys, tally.line("async") + f" jobs={tally['jobs']}")
    assert tally["jobs"] >= 1, tally.line("async")


# --------------------------------------------------------------------------- raw HTTP

RAW_METHODS = [b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"HEAD", b"OPTIONS", b"TRACE",
               b"get", b"G\x00T", b"GET\x7f", b"", b"X" * 40]
RAW_TARGETS = [b"/fhir/Patient", b"/fhir/Patient/canary-1", b"/fhir", b"/fhir/metadata",
               b"/jobs", b"/healthz", b"*", b"http://x/fhir/Patient", b"//", b"/fhir/Patient?",
               b"/fhir/Patient/canary-1/_history/1", b"/%", b"/fhir/%00", b"/fhir/\xff\xfe"]
RAW_VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b"FOO", b""]
RAW_HEADER_NAMES = [b"Host", b"Content-Type", b"Prefer", b"If-Match", b"If-None-Exist",
                    b"Accept", b"Authorization", b"X-A", b"Bad Name", b"X:Y", b"\x00", b""]
no_crlf = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def raw_requests(draw: Any) -> bytes:
    odd = draw(st.integers(0, 3)) == 0  # most request lines are well formed, the rest not
    method = draw(st.sampled_from(RAW_METHODS if odd else RAW_METHODS[:6]))
    target = draw(st.sampled_from(RAW_TARGETS)) + (draw(no_crlf) if odd else b"")
    version = draw(st.sampled_from(RAW_VERSIONS)) if odd else b"HTTP/1.1"
    lines = [b" ".join(p for p in (method, target, version) if p or draw(st.booleans()))]
    if draw(st.integers(0, 4)):
        lines.append(b"Host: 127.0.0.1")
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            name = draw(st.one_of(st.sampled_from(RAW_HEADER_NAMES), no_crlf))
            line = name + draw(st.sampled_from([b": ", b":", b" : ", b""])) + draw(no_crlf)
            lines.append(line or b"X")  # an empty line would end the head: a second request
        else:  # a well-formed field with an odd value
            lines.append(draw(st.sampled_from(RAW_HEADER_NAMES[1:7])) + b": " + draw(no_crlf))
    resource = mutated(patient("canary-1")).map(lambda d: json.dumps(d).encode())
    body = draw(st.one_of(st.just(b""), st.binary(max_size=40), st.sampled_from(RAW_BODIES),
                          resource))
    # The framing is ours and always complete, so that a server waiting for more is a hang.
    if body and draw(st.booleans()):
        lines.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    elif body or draw(st.booleans()):
        lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def judge_raw(raw: bytes, status: int, headers: dict[str, str], body: bytes) -> tuple[str, bool]:
    where = f"for {raw[:300]!r}: {status} {body[:300]!r}"
    if status >= 400 and body:
        assert headers.get("content-type", "").startswith("application/fhir+json"), where
        outcome = json.loads(body)
        assert outcome.get("resourceType") == "OperationOutcome", where
        if status == 501 and outcome["issue"][0]["code"] == "not-supported":
            return "501", True
    assert status < 500, where
    return ("4xx", True) if status >= 400 else ("2xx", False)


def test_http_hostile_requests(
    gunicorn_api: int,  # noqa: F811 - the fixture imported above
    hostile_app: Any, engine: Engine, capsys: pytest.CaptureFixture[str],
) -> None:
    store_canaries(hostile_app.test_client())
    tally, watch = Tally(), Canaries(engine)

    @seed(SEED)
    @settings(max_examples=HTTP_EXAMPLES, **HYPOTHESIS)
    @given(raw=raw_requests())
    def run(raw: bytes) -> None:
        def answer() -> tuple[str, bool] | None:
            try:
                status, headers, body = exchange(gunicorn_api, raw, timeout=REQUEST_SECONDS)
                for _ in range(UNAVAILABLE_RETRIES):
                    if status != 503:
                        break
                    tally["503-retried"] += 1
                    time.sleep(1)
                    status, headers, body = exchange(gunicorn_api, raw, timeout=REQUEST_SECONDS)
            except (TimeoutError, IndexError, ValueError):
                return None  # no (parsable) answer in time
            return judge_raw(raw, status, headers, body)

        check_one(watch, tally, raw[:300], answer)

    try:
        run()
    finally:
        _report(capsys, tally.line("http"))
    assert tally["4xx"] and tally["2xx"], tally.line("http")

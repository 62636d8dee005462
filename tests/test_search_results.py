"""The result side of search on real rows: keyset cursor paging (stable under concurrent
writes), `_sort`, `_total`, `_summary`, `_elements`, `_include` / `_revinclude` (with
`:iterate`), chains and `_has`, and what a caller's scopes let an include return.

Rows are stored as the writers store them (`tests.test_search.insert`); the Synthea test at
the end loads real bundles through the engine.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from sqlalchemy import Connection, event

from core.auth.permissions import Permissions
from core.errors import BadRequest, Forbidden
from core.fhir.search import search
from tests.test_search import BASE, T0, insert, observation, patient


def run(conn: Connection, rtype: str, params: list[tuple[str, str]], **kw: Any) -> dict:
    return search(conn, rtype, params, base_url=BASE, **kw)


def matches(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def included(bundle: dict[str, Any]) -> set[str]:
    return {f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", []) if e["search"]["mode"] == "include"}


def outcome_issues(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def link(bundle: dict[str, Any], relation: str) -> list[tuple[str, str]] | None:
    for lk in bundle["link"]:
        if lk["relation"] == relation:
            return parse_qsl(urlsplit(lk["url"]).query)
    return None


def all_pages(conn: Connection, rtype: str, params: list[tuple[str, str]],
              between: Any = None) -> list[list[str]]:
    pages, bundle = [], run(conn, rtype, params)
    while True:
        pages.append(matches(bundle))
        nxt = link(bundle, "next")
        if nxt is None:
            return pages
        if between is not None:
            between(len(pages))
        bundle = run(conn, rtype, nxt)


@pytest.fixture
def clinic(conn: Connection) -> Connection:
    """Six patients at an organisation, observations about them, an encounter, a practitioner."""
    insert(conn, {"resourceType": "Organization", "id": "org1", "name": "Clinic"})
    insert(conn, {"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Who"}]})
    for i, res in enumerate([
        patient("p1", "Smith", "John", "male", "1974", "100"),
        patient("p2", "Smithers", "Ann", "female", "1974-12-15", "200"),
        patient("p3", "Müller", "Zoë", "female", "1980-06", "300"),
        patient("p4", "Jones", "Bob", "male", "1990-01-01", "400"),
        patient("p5", "Adams", "Ed", "other", "2001-02-03", "500"),
        {"resourceType": "Patient", "id": "p6", "gender": "male"},  # no name, no birth date
    ]):
        res["managingOrganization"] = {"reference": "Organization/org1"}
        res["generalPractitioner"] = [{"reference": "Practitioner/dr1"}]
        res["text"] = {"status": "generated", "div": "<div>a patient</div>"}
        insert(conn, res, at=T0 + timedelta(days=10 - i))
    insert(conn, observation("o1", "Patient/p1", "29463-7", "2014-06-04T09:49:30Z"))
    insert(conn, observation("o2", "Patient/p1", "8302-2", "2015-01-01T00:00:00Z"))
    insert(conn, observation("o3", "Patient/p2", "29463-7", "2014-06-05T10:00:00Z", "amended"))
    insert(conn, {**observation("o4", "Patient/p4", "8302-2", "2016-01-01T00:00:00Z"),
                  "encounter": {"reference": "Encounter/e1"}})
    insert(conn, {"resourceType": "Encounter", "id": "e1", "status": "finished",
                  "class": {"code": "AMB"}, "subject": {"reference": "Patient/p4"}})
    return conn


# --------------------------------------------------------------------------- cursor paging


def test_cursor_pages_are_stable_under_concurrent_writes(clinic: Connection) -> None:
    """Between page fetches, resources are created before and after the cursor's position and
    one not yet seen is deleted: every resource present throughout appears exactly once,
    where `_offset` paging would repeat what the inserts pushed down."""
    params = [("_count", "2")]
    before = set(matches(run(clinic, "Patient", [("_count", "100")])))

    def write(page: int) -> None:
        insert(clinic, patient(f"a{page}", "Early", "X", "male", "2000", f"e{page}"))  # sorts first
        insert(clinic, patient(f"z{page}", "Late", "X", "male", "2000", f"l{page}"))  # sorts last
        if page == 1:
            clinic.exec_driver_sql("UPDATE resource SET deleted = true WHERE res_id = 'p6'")

    pages = all_pages(clinic, "Patient", params, between=write)
    seen = [rid for page in pages for rid in page]
    assert len(seen) == len(set(seen)), f"duplicates across pages: {pages}"
    assert before - {"p6"} <= set(seen), f"missed: {before - {'p6'} - set(seen)}"
    assert "a1" not in seen  # created before the position already passed
    assert seen == sorted(seen)

    # The same writes under `_offset` paging shift the pages: something is seen twice.
    offset_seen: list[str] = []
    offset = 0
    for page in range(1, 4):
        got = matches(run(clinic, "Patient", [("_count", "2"), ("_offset", str(offset))]))
        offset_seen += got
        offset += 2
        insert(clinic, patient(f"0{page}", "Early", "Y", "male", "2000", f"b{page}"))
    assert len(offset_seen) != len(set(offset_seen))


def test_cursor_paging_with_a_multi_key_sort(clinic: Connection) -> None:
    params = [("_sort", "gender,-birthdate"), ("_count", "2")]
    whole = matches(run(clinic, "Patient", [("_sort", "gender,-birthdate"), ("_count", "50")]))
    assert whole == ["p3", "p2", "p4", "p1", "p6", "p5"]
    pages = all_pages(clinic, "Patient", params)
    assert [rid for page in pages for rid in page] == whole
    assert [len(p) for p in pages] == [2, 2, 2]


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ([("_cursor", "not-a-cursor")], "check digest"),
        ([("_cursor", "WzEsIiIsW10sInAyIl0.000000000000")], "check digest"),
        ([("_cursor", "%%%.x")], "check digest"),
        ([("_cursor", "x" * 5000)], "too long"),
    ],
)
def test_a_malformed_cursor_is_a_400_naming_it(clinic: Connection, params, why) -> None:
    with pytest.raises(BadRequest) as info:
        run(clinic, "Patient", params)
    assert info.value.expression == ["_cursor"]
    assert why in info.value.diagnostics


def test_a_cursor_is_bound_to_its_sort_and_excludes_offset(clinic: Connection) -> None:
    nxt = link(run(clinic, "Patient", [("_sort", "family"), ("_count", "2")]), "next")
    assert nxt is not None
    cursor = dict(nxt)["_cursor"]
    with pytest.raises(BadRequest) as info:
        run(clinic, "Patient", [("_sort", "-birthdate"), ("_cursor", cursor)])
    assert info.value.expression == ["_cursor"] and "_sort=family" in info.value.diagnostics
    with pytest.raises(BadRequest) as info:
        run(clinic, "Patient", [("_cursor", cursor), ("_offset", "2"), ("_sort", "family")])
    assert "combined" in info.value.diagnostics


# --------------------------------------------------------------------------- sort, total, summary


SORTS = [
    ("_id", ["p1", "p2", "p3", "p4", "p5", "p6"]),
    ("-_id", ["p6", "p5", "p4", "p3", "p2", "p1"]),
    ("_lastUpdated", ["p6", "p5", "p4", "p3", "p2", "p1"]),
    ("-_lastUpdated", ["p1", "p2", "p3", "p4", "p5", "p6"]),
    # Missing values last in either direction; ties broken by id.
    ("family", ["p5", "p4", "p3", "p1", "p2", "p6"]),
    ("-family", ["p2", "p1", "p3", "p4", "p5", "p6"]),
    ("birthdate", ["p1", "p2", "p3", "p4", "p5", "p6"]),
    # Descending by the greatest end: p1's "1974" ends after p2's "1974-12-15".
    ("-birthdate", ["p5", "p4", "p3", "p1", "p2", "p6"]),
    ("gender,family", ["p3", "p2", "p4", "p1", "p6", "p5"]),
    ("-gender,_id", ["p5", "p1", "p4", "p6", "p2", "p3"]),
    ("organization,-_lastUpdated", ["p1", "p2", "p3", "p4", "p5", "p6"]),
]


@pytest.mark.parametrize(("sort", "expected"), SORTS)
def test_sort(clinic: Connection, sort: str, expected: list[str]) -> None:
    bundle = run(clinic, "Patient", [("_sort", sort)])
    assert matches(bundle) == expected
    assert ("_sort", sort) in (link(bundle, "self") or [])


@pytest.mark.parametrize("sort", ["birthdate", "-birthdate", "-birthdate,family",
                                  "birthdate,-_id", "family", "-family,gender", "-name"])
@pytest.mark.parametrize("count", ["1", "2", "4"])
def test_pages_sorted_by_a_date_walk_its_index_and_then_the_missing(
    clinic: Connection, sort: str, count: str
) -> None:
    """Without criteria a leading date or string key pages along its index; the resources
    without a value (p6) follow once the values run out, across page boundaries either way."""
    whole = matches(run(clinic, "Patient", [("_sort", sort), ("_count", "50")]))
    assert len(whole) == 6 and whole[-1] == "p6"
    pages = all_pages(clinic, "Patient", [("_sort", sort), ("_count", count)])
    assert [rid for page in pages for rid in page] == whole
    # With criteria (the other path) the order is the same.
    fenced = run(clinic, "Patient", [("_sort", sort), ("organization", "Organization/org1")])
    assert matches(fenced) == whole


def test_sort_by_quantity(clinic: Connection) -> None:
    for oid, value, unit in (("q1", 70.5, "kg"), ("q2", 3, "kg"), ("q3", 12.25, "kg")):
        insert(clinic, {**observation(oid, "Patient/p5", "29463-7", "2020-01-01T00:00:00Z"),
                        "valueQuantity": {"value": value, "unit": unit,
                                          "system": "http://unitsofmeasure.org", "code": unit}})
    ids = ["q2", "q3", "q1"]
    for params in ([("subject", "Patient/p5")], [("_id", "q1,q2,q3")]):
        up = run(clinic, "Observation", [*params, ("_sort", "value-quantity")])
        assert matches(up) == ids
        down = run(clinic, "Observation", [*params, ("_sort", "-value-quantity")])
        assert matches(down) == ids[::-1]
    everything = matches(run(clinic, "Observation", [("_sort", "value-quantity")]))
    assert everything == ["o1", "o2", "o3", "o4", *ids]  # o1..o4 weigh 1.0
    pages = all_pages(clinic, "Observation", [("_sort", "-value-quantity"), ("_count", "2")])
    assert [rid for page in pages for rid in page] == matches(
        run(clinic, "Observation", [("_sort", "-value-quantity")]))


def test_sort_with_criteria_and_observation_dates(clinic: Connection) -> None:
    bundle = run(clinic, "Observation", [("code", "29463-7,8302-2"), ("_sort", "-date")])
    assert matches(bundle) == ["o4", "o2", "o3", "o1"]
    bundle = run(clinic, "Observation", [("subject", "Patient/p1"), ("_sort", "code")])
    assert matches(bundle) == ["o1", "o2"]


@pytest.mark.parametrize("bad", ["nonsense", "-", "family,family", "_count"])
def test_sort_on_what_cannot_sort_is_a_400(clinic: Connection, bad: str) -> None:
    with pytest.raises(BadRequest) as info:
        run(clinic, "Patient", [("_sort", bad)])
    assert info.value.expression == ["_sort"]


def test_total_and_summary_count(clinic: Connection) -> None:
    for mode in ("accurate", "estimate"):
        bundle = run(clinic, "Patient", [("gender", "male"), ("_total", mode), ("_count", "1")])
        assert bundle["total"] == 3 and len(matches(bundle)) == 1
    none = run(clinic, "Patient", [("gender", "male"), ("_total", "none"), ("_count", "1")])
    assert "total" not in none and link(none, "next") is not None
    counted = run(clinic, "Patient", [("gender", "male"), ("_summary", "count")])
    assert counted["total"] == 3 and "entry" not in counted
    everything = run(clinic, "Patient", [("_summary", "count")])
    assert everything["total"] == 6
    # Without criteria an estimate is the planner's: no count of the whole type.
    clinic.exec_driver_sql("ANALYZE resource")
    statements = count_statements(clinic)
    guessed = run(clinic, "Patient", [("_summary", "count"), ("_total", "estimate")])
    assert 1 <= guessed["total"] <= 30 and statements[0].startswith("EXPLAIN (FORMAT JSON)")
    with pytest.raises(BadRequest) as info:
        run(clinic, "Patient", [("_total", "maybe")])
    assert info.value.expression == ["_total"]


def test_elements_and_summary_subsets(clinic: Connection) -> None:
    subsetted = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                 "code": "SUBSETTED", "display": "subsetted"}
    bundle = run(clinic, "Patient", [("_id", "p1"), ("_elements", "gender,birthDate")])
    (res,) = [e["resource"] for e in bundle["entry"]]
    assert set(res) == {"resourceType", "id", "meta", "gender", "birthDate"}
    assert res["meta"]["tag"] == [subsetted] and res["meta"]["versionId"] == "1"
    # Mandatory elements stay (Observation.status and code are 1..1); `value` is value[x].
    bundle = run(clinic, "Observation", [("_id", "o1"), ("_elements", "value")])
    (obs,) = [e["resource"] for e in bundle["entry"]]
    assert set(obs) == {"resourceType", "id", "meta", "status", "code", "valueQuantity"}
    data = run(clinic, "Patient", [("_id", "p1"), ("_summary", "data")])["entry"][0]["resource"]
    assert "text" not in data and data["name"] and subsetted in data["meta"]["tag"]
    text = run(clinic, "Patient", [("_id", "p1"), ("_summary", "text")])["entry"][0]["resource"]
    assert set(text) == {"resourceType", "id", "meta", "text"}
    # _summary=true: the elements R4 marks isSummary (not text, generalPractitioner).
    short = run(clinic, "Patient", [("_id", "p1"), ("_summary", "true")])["entry"][0]["resource"]
    assert set(short) == {"resourceType", "id", "meta", "identifier", "name", "gender",
                          "birthDate", "managingOrganization"}
    assert subsetted in short["meta"]["tag"]
    obs = run(clinic, "Observation", [("_id", "o1"), ("_summary", "true")])["entry"][0]
    assert set(obs["resource"]) == {"resourceType", "id", "meta", "status", "code", "subject",
                                    "effectiveDateTime", "valueQuantity"}
    whole = run(clinic, "Patient", [("_id", "p1")])["entry"][0]["resource"]
    assert "tag" not in whole["meta"] and "text" in whole
    with pytest.raises(BadRequest):
        run(clinic, "Patient", [("_elements", "name.family")])


# --------------------------------------------------------------------------- includes


def count_statements(conn: Connection) -> list[str]:
    seen: list[str] = []

    def record(c, cursor, statement, parameters, context, executemany):  # noqa: ARG001
        seen.append(statement)

    event.listen(conn, "before_cursor_execute", record)
    return seen


def test_include_and_revinclude(clinic: Connection) -> None:
    statements = count_statements(clinic)
    bundle = run(clinic, "Observation", [("status", "final,amended"),
                                         ("_include", "Observation:subject"),
                                         ("_include", "Observation:encounter")])
    assert len(statements) == 2  # the page with its total, then every include at once
    assert matches(bundle) == ["o1", "o2", "o3", "o4"]
    assert included(bundle) == {"Patient/p1", "Patient/p2", "Patient/p4", "Encounter/e1"}
    assert bundle["total"] == 4  # includes do not count
    entry = next(e for e in bundle["entry"] if e["search"]["mode"] == "include"
                 and e["resource"]["resourceType"] == "Patient")
    assert entry["fullUrl"] == f"{BASE}/Patient/{entry['resource']['id']}"
    assert entry["resource"]["meta"]["versionId"] == "1"

    targeted = run(clinic, "Observation", [("_include", "Observation:subject:Encounter")])
    assert included(targeted) == set()
    star = run(clinic, "Observation", [("_id", "o4"), ("_include", "Observation:*")])
    assert included(star) == {"Patient/p4", "Encounter/e1"}

    rev = run(clinic, "Patient", [("_id", "p1,p4"), ("_revinclude", "Observation:subject"),
                                  ("_revinclude", "Encounter:subject")])
    assert matches(rev) == ["p1", "p4"]
    assert included(rev) == {"Observation/o1", "Observation/o2", "Observation/o4",
                             "Encounter/e1"}
    every = run(clinic, "Patient", [("_id", "p4"), ("_revinclude", "Observation:*"),
                                    ("_revinclude", "Encounter:*")])
    assert included(every) == {"Observation/o4", "Encounter/e1"}
    org = run(clinic, "Organization", [("_revinclude", "Patient:*")])
    assert len(included(org)) == 6


def test_include_iterate_goes_one_level(clinic: Connection) -> None:
    params = [("_id", "o1,o3"), ("_include", "Observation:subject"),
              ("_include:iterate", "Patient:organization")]
    assert included(run(clinic, "Observation", params)) == {
        "Patient/p1", "Patient/p2", "Organization/org1"}
    # Without :iterate the second include starts from the matches (Observations): refused,
    # since it could never apply.
    with pytest.raises(BadRequest) as info:
        run(clinic, "Observation", [("_include", "Patient:organization")])
    assert info.value.expression == ["_include"]
    # _revinclude:iterate from included resources: the Patients' Encounters.
    both = run(clinic, "Observation", [("_id", "o4"), ("_include", "Observation:subject"),
                                       ("_revinclude:iterate", "Encounter:subject")])
    assert included(both) == {"Patient/p4", "Encounter/e1"}


@pytest.mark.parametrize("bad", ["Observation", "Observation:code", "Observation:subject:x",
                                 "observation:subject", "Observation:nope"])
def test_bad_includes_are_400(clinic: Connection, bad: str) -> None:
    with pytest.raises(BadRequest) as info:
        run(clinic, "Observation", [("_include", bad)])
    assert info.value.expression == ["_include"]


def test_includes_never_bring_back_what_the_caller_may_not_read(clinic: Connection) -> None:
    own = Permissions.of(["system/Observation.rs", "system/Encounter.r"])
    bundle = run(clinic, "Observation", [("_include", "Observation:subject"),
                                         ("_include", "Observation:encounter")],
                 permissions=own)
    assert matches(bundle) == ["o1", "o2", "o3", "o4"]
    assert included(bundle) == {"Encounter/e1"}
    (info,) = outcome_issues(bundle)
    assert info["code"] == "suppressed" and "Encounter" in info["diagnostics"]
    none = run(clinic, "Patient", [("_revinclude", "Observation:subject")],
               permissions=Permissions.of(["system/Patient.rs"]))
    assert included(none) == set()
    # What the caller may not read does not lead an :iterate either: e1 is reached only
    # through o4, an Observation this caller cannot see.
    hidden = run(clinic, "Patient", [("_id", "p4"), ("_revinclude", "Observation:subject"),
                                     ("_include:iterate", "Observation:encounter")],
                 permissions=Permissions.of(["system/Patient.rs", "system/Encounter.r"]))
    assert included(hidden) == set()
    seen = run(clinic, "Patient", [("_id", "p4"), ("_revinclude", "Observation:subject"),
                                   ("_include:iterate", "Observation:encounter")])
    assert included(seen) == {"Observation/o4", "Encounter/e1"}


# --------------------------------------------------------------------------- chains and _has


CHAINS = [
    ("Observation", [("subject:Patient.family", "smith")], ["o1", "o2", "o3"]),
    ("Observation", [("subject:Patient.family:exact", "Smith")], ["o1", "o2"]),
    ("Observation", [("subject.family", "jones")], ["o4"]),  # only Patient has `family`
    ("Observation", [("patient.name", "ann")], ["o3"]),
    ("Observation", [("patient.gender", "male"), ("code", "8302-2")], ["o2", "o4"]),
    ("Observation", [("subject:Patient.birthdate", "lt1975")], ["o1", "o2", "o3"]),
    ("Observation", [("encounter:Encounter.status", "finished")], ["o4"]),
    ("Patient", [("organization.name", "clinic"), ("gender", "female")], ["p2", "p3"]),
    ("Patient", [("_has:Observation:patient:code", "29463-7")], ["p1", "p2"]),
    ("Patient", [("_has:Observation:subject:status", "amended")], ["p2"]),
    ("Patient", [("_has:Observation:patient:code", "8302-2"),
                 ("_has:Observation:patient:code", "29463-7")], ["p1"]),
    ("Patient", [("_has:Encounter:subject:status", "finished")], ["p4"]),
    ("Organization", [("_has:Patient:organization:gender", "other")], ["org1"]),
    ("Patient", [("_has:Observation:patient:code", "nothing")], []),
]


@pytest.mark.parametrize(("rtype", "params", "expected"), CHAINS, ids=lambda v: str(v))
def test_chains_and_has(clinic: Connection, rtype: str, params, expected: list[str]) -> None:
    bundle = run(clinic, rtype, params)
    assert matches(bundle) == expected
    assert bundle["total"] == len(expected)


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ([("subject.name", "x")], "ambiguous"),  # Patient and Location both have `name`
        ([("subject:Patient.organization.name", "x")], "one level"),
        ([("subject:Medication.code", "x")], "does not point at"),
        ([("subject:Patient.nonsense", "x")], "not supported"),
        ([("_has:Observation:patient", "x")], "expected"),
        ([("_has:Observation:code:status", "x")], "not a reference"),
        ([("_has:Observation:patient:_has:Encounter:subject:status", "x")], "one level"),
        ([("subject:Patient._count", "1")], "not a search criterion"),
        ([("_has:Observation:patient:_sort", "code")], "not supported"),
    ],
)
def test_bad_chains_are_400(clinic: Connection, params, why: str) -> None:
    rtype = "Patient" if params[0][0].startswith("_has") else "Observation"
    with pytest.raises(BadRequest) as info:
        run(clinic, rtype, params)
    assert info.value.expression == [params[0][0]]
    assert why in info.value.diagnostics


def test_a_chain_needs_search_on_the_other_type(clinic: Connection) -> None:
    with pytest.raises(Forbidden) as info:
        run(clinic, "Observation", [("subject:Patient.family", "smith")],
            permissions=Permissions.of(["system/Observation.rs"]))
    assert info.value.expression == ["subject:Patient.family"]
    assert "system/Patient.s" in info.value.diagnostics
    with pytest.raises(Forbidden):
        run(clinic, "Patient", [("_has:Observation:patient:code", "1")],
            permissions=Permissions.of(["system/Patient.rs"]))
    ok = run(clinic, "Observation", [("subject:Patient.family", "smith")],
             permissions=Permissions.of(["system/Observation.rs", "system/Patient.s"]))
    assert matches(ok) == ["o1", "o2", "o3"]


# --------------------------------------------------------------------------- Synthea


@pytest.fixture
def synthea(conn: Connection) -> Connection:
    """The organisations and practitioners, then two patients, through the engine."""
    from tests.test_synthea import BATCHES, DATA, PATIENTS, _entries

    if not DATA.is_dir():
        pytest.skip("Synthea sample data not present")
    from core.fhir.engine import execute_batch, execute_transaction
    from core.fhir.model import Context

    for name in BATCHES:
        entries = _entries(name)
        for start in range(0, len(entries), 500):
            assert all(r.ok for r in execute_batch(conn, entries[start : start + 500], Context()))
    for name in PATIENTS:
        assert all(r.ok for r in execute_transaction(conn, _entries(name), Context()))
    return conn


def resources(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def test_synthea_includes_sorts_chains_and_paging(synthea: Connection) -> None:
    (bob,) = resources(run(synthea, "Patient", [("family", "Keeling")]))
    pid = bob["id"]
    every_obs = run(synthea, "Observation", [("patient", pid), ("_count", "1000")])
    n_obs = every_obs["total"]
    assert n_obs == len(matches(every_obs)) > 10

    # _revinclude: the patient with all their encounters; _include back from encounters.
    rev = run(synthea, "Patient", [("_id", pid), ("_revinclude", "Encounter:patient")])
    encounters = resources(rev, "include")
    assert encounters and {e["resourceType"] for e in encounters} == {"Encounter"}
    assert all(e["subject"]["reference"] == f"Patient/{pid}" for e in encounters)
    inc = run(synthea, "Encounter", [("patient", pid), ("_include", "Encounter:service-provider"),
                                     ("_include", "Encounter:participant")])
    kinds = {r["resourceType"] for r in resources(inc, "include")}
    assert kinds == {"Organization", "Practitioner"}
    providers = {e["serviceProvider"]["reference"] for e in resources(inc)}
    assert providers <= {f"Organization/{r['id']}" for r in resources(inc, "include")}

    # :iterate: Observations → their Encounters → the Encounters' providers.
    it = run(synthea, "Observation", [("patient", pid), ("_count", "5"),
                                      ("_include", "Observation:encounter"),
                                      ("_include:iterate", "Encounter:service-provider")])
    assert {r["resourceType"] for r in resources(it, "include")} == {"Encounter", "Organization"}

    # _sort=-date agrees with the stored effective times; cursor pages cover them once.
    ordered = resources(run(synthea, "Observation", [("patient", pid), ("_sort", "-date"),
                                                     ("_count", "1000")]))
    times = [r["effectiveDateTime"] for r in ordered]
    assert times == sorted(times, reverse=True)
    pages = all_pages(synthea, "Observation", [("patient", pid), ("_sort", "-date,code"),
                                               ("_count", "7")])
    flat = [rid for page in pages for rid in page]
    assert len(flat) == len(set(flat)) == n_obs and len(pages) == -(-n_obs // 7)

    # Chains and _has agree with the plain reference search.
    chained = run(synthea, "Observation", [("subject:Patient.family", "keeling"),
                                           ("_count", "1000")])
    assert set(matches(chained)) == set(matches(every_obs))
    for code, bobs in (("5085" + "A" * 32, True), ("1250" + "A" * 32, False)):  # both; Jani's
        has = run(synthea, "Patient", [("_has:Observation:patient:code", code)])
        having = {r["subject"]["reference"].removeprefix("Patient/") for r in resources(
            run(synthea, "Observation", [("code", code), ("_count", "1000")]))}
        assert set(matches(has)) == having and len(having) == (2 if bobs else 1)
        assert (pid in having) is bobs

    # _elements on a real patient: what was asked, marked as a subset.
    (cut,) = resources(run(synthea, "Patient", [("_id", pid), ("_elements", "name,gender")]))
    assert set(cut) == {"resourceType", "id", "meta", "name", "gender"}
    assert cut["meta"]["tag"][-1]["code"] == "SUBSETTED"
    assert run(synthea, "Observation", [("patient", pid), ("_summary", "count")]) == {
        "resourceType": "Bundle", "type": "searchset", "total": n_obs,
        "link": run(synthea, "Observation", [("patient", pid), ("_summary", "count")])["link"]}


# --------------------------------------------------------------------------- deep pages


N_DEEP = 100_000


def test_a_deep_cursor_page_costs_what_the_first_page_costs(conn: Connection) -> None:
    """Without criteria, a `_sort=_lastUpdated` page after a cursor is an index range scan
    from the cursor's position; `_offset` walks (and throws away) every row before it. Prints
    both times for the report; asserts the plan and a generous ratio only."""
    import time

    from sqlalchemy import text

    conn.execute(text(f"""
        WITH h AS (
            INSERT INTO resource_history (res_type, res_id, version, last_updated, deleted,
                                          method, content)
            SELECT 'Observation', 'o' || i, 1, timestamptz '2021-01-01' + i * interval '1 s',
                   false, 'POST', jsonb_build_object('resourceType', 'Observation',
                                                     'id', 'o' || i, 'status', 'final')
            FROM generate_series(1, {N_DEEP}) AS i
            RETURNING res_type, res_id, version, last_updated, content)
        INSERT INTO resource (res_type, res_id, version, last_updated, content_hash, tokens)
        SELECT res_type, res_id, version, last_updated, md5(content::text)::uuid, '{{}}'
        FROM h"""))
    conn.execute(text(f"""
        INSERT INTO resource_date (res_type, res_id, param, lo, hi)
        SELECT 'Observation', 'o' || i, 'date', d, d FROM generate_series(1, {N_DEEP}) i,
        LATERAL (SELECT timestamptz '2000-01-01' + (i::bigint * 104729 % 700000)
                        * interval '7 minutes' AS d) x"""))
    conn.execute(text("ANALYZE resource"))
    conn.execute(text("ANALYZE resource_date"))
    base = [("_sort", "_lastUpdated"), ("_total", "none"), ("_count", "50")]
    bundle = run(conn, "Observation", [*base, ("_offset", str(N_DEEP - 100))])
    deep_ids = matches(bundle)
    cursor = dict(link(bundle, "next") or [])["_cursor"]

    def timed(params: list[tuple[str, str]]) -> tuple[float, list[str]]:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            got = matches(run(conn, "Observation", params))
            best = min(best, time.perf_counter() - started)
        return best * 1000, got

    by_offset_ms, by_offset = timed([*base, ("_offset", str(N_DEEP - 50))])
    by_cursor_ms, by_cursor = timed([*base, ("_cursor", cursor)])
    first_ms, _ = timed(base)
    assert by_cursor == by_offset == [f"o{i}" for i in range(N_DEEP - 49, N_DEEP + 1)]
    assert deep_ids[-1] == f"o{N_DEEP - 50}"
    latest_ms, latest = timed([("_sort", "-date"), ("_total", "none"), ("_count", "10")])
    expected = conn.execute(text(
        "SELECT res_id FROM resource_date ORDER BY hi DESC, res_id LIMIT 10")).scalars().all()
    assert latest == expected
    print(f"page at row {N_DEEP - 50} of {N_DEEP}: _offset {by_offset_ms:.1f} ms, "
          f"_cursor {by_cursor_ms:.1f} ms, first page {first_ms:.1f} ms; "
          f"_sort=-date&_count=10 over {N_DEEP}: {latest_ms:.1f} ms")
    assert by_cursor_ms * 3 < by_offset_ms

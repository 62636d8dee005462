"""The transaction rules of FHIR R4 http.html (§3.1.0.11.2) and the request rules around them,
one table row per rule, checked on the planner alone: no HTTP, no database."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from core.errors import FhirError
from core.fhir.planning import (
    PlannedEntry,
    TransactionPlan,
    check_overlap,
    condition_key,
    plan_batch,
    plan_transaction,
)
from core.fhir.urls import parse_etag
from tests.builders import delete, get, ident, json_patch, patient, post, put

SYS = "http://example.org/mrn"
COND = f"identifier={SYS}|v"


def ids() -> Callable[[], str]:
    """Deterministic new ids: id-1, id-2, …"""
    counter = itertools.count(1)
    return lambda: f"id-{next(counter)}"


def plan(*entries: dict[str, Any]) -> TransactionPlan:
    return plan_transaction(list(enumerate(entries)), make_id=ids())


def fails(*entries: dict[str, Any]) -> FhirError:
    with pytest.raises(FhirError) as info:
        plan(*entries)
    return info.value


def head(method: str, url: str) -> dict[str, Any]:
    return {"request": {"method": method, "url": url}}


# --------------------------------------------------------------------------- processing order


@pytest.mark.parametrize(
    ("entries", "order"),
    [
        # R4: deletes, then creates, then updates/patches, then reads; request order within each
        ([get("Patient/a"), put(patient(id="a")), post(patient()), delete("Patient/b")],
         (3, 2, 1, 0)),
        ([head("HEAD", "Patient/x"), delete("Patient/d1"), delete("Patient/d2"),
          json_patch("Patient/p", []), post(patient())],
         (1, 2, 4, 3, 0)),
        ([put(patient(id="u1")), put(patient(id="u2")), get("Patient?name=x")], (0, 1, 2)),
    ],
)
def test_processing_order(entries: list[dict[str, Any]], order: tuple[int, ...]) -> None:
    assert plan(*entries).order == order


# --------------------------------------------------------------------------- ids, placeholders


def test_creates_get_new_ids_and_fullurls_name_their_entry() -> None:
    p = plan(
        post(patient(), full_url="urn:uuid:aaaaaaaa-0000-4000-8000-000000000001"),
        put(patient(id="fixed"), full_url="http://example.org/fhir/Patient/fixed"),
        post(patient(), full_url="urn:oid:1.2.3"),
        get("Patient/fixed"),
    )
    assert [e.id for e in p.entries] == ["id-1", "fixed", "id-2", "fixed"]
    assert p.placeholders == {
        "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001": 0,
        "http://example.org/fhir/Patient/fixed": 1,
        "urn:oid:1.2.3": 2,
    }


def test_a_conditional_update_that_matches_nothing_keeps_the_body_id_or_gets_a_new_one() -> None:
    p = plan(
        put(patient(id="mine", identifier=ident(SYS, "a")), f"Patient?identifier={SYS}|a"),
        put(patient(identifier=ident(SYS, "b")), f"Patient?identifier={SYS}|b"),
    )
    assert [e.id for e in p.entries] == ["mine", "id-1"]
    assert [e.body_id for e in p.entries] == ["mine", None]


def test_duplicate_fullurls_name_both_entries() -> None:
    u = "urn:uuid:aaaaaaaa-0000-4000-8000-000000000002"
    err = fails(post(patient(), full_url=u), get("Patient/x"), post(patient(), full_url=u))
    assert (err.status, err.index) == (400, 2)
    assert err.expression == ["Bundle.entry[0].fullUrl", "Bundle.entry[2].fullUrl"]


# --------------------------------------------------------------------------- conditions


@pytest.mark.parametrize(
    ("entry", "kind", "key", "where", "locks"),
    [
        (post(patient(), if_none_exist=COND), "create", f"Patient?{COND}",
         "Bundle.entry[0].request.ifNoneExist", True),
        (post(patient(), if_none_exist=f"Patient?{COND}"), "create", f"Patient?{COND}",
         "Bundle.entry[0].request.ifNoneExist", True),
        # `POST Patient?params` (fhirpy's get_or_create) is a conditional create
        (head("POST", f"Patient?{COND}") | {"resource": patient()}, "create", f"Patient?{COND}",
         "Bundle.entry[0].request.url", True),
        (put(patient(), f"Patient?{COND}"), "update", f"Patient?{COND}",
         "Bundle.entry[0].request.url", True),
        (json_patch(f"Patient?{COND}", []), "patch", f"Patient?{COND}",
         "Bundle.entry[0].request.url", False),
        (delete(f"Patient?{COND}"), "delete", f"Patient?{COND}",
         "Bundle.entry[0].request.url", False),
    ],
)
def test_conditions_to_resolve(
    entry: dict[str, Any], kind: str, key: str, where: str, locks: bool
) -> None:
    p = plan(entry)
    (e,) = p.entries
    assert e.kind == kind
    assert e.condition is not None and e.condition.key == key
    assert e.condition_at == where
    assert [c.key for c in p.conditions] == [key]
    assert p.locks == ((key,) if locks else ())


def test_the_same_condition_is_looked_up_once_whatever_its_parameter_order() -> None:
    a = f"Patient?identifier={SYS}|v&family=x"
    b = f"Patient?family=x&identifier={SYS}|v"
    p = plan_batch([(0, delete(a)), (1, delete(b))])
    assert len(p.conditions) == 1
    assert condition_key("Patient", [("b", "2"), ("a", "1")]) == "Patient?a=1&b=2"


def test_a_query_and_the_same_if_none_exist_are_one_condition() -> None:
    entry = head("POST", f"Patient?{COND}") | {"resource": patient()}
    entry["request"]["ifNoneExist"] = COND
    (e,) = plan(entry).entries
    assert e.condition is not None and e.condition.key == f"Patient?{COND}"


# --------------------------------------------------------------------------- identity overlap


def cond_put(query: str = COND) -> dict[str, Any]:
    return put(patient(identifier=ident(SYS, "v")), f"Patient?{query}")


@pytest.mark.parametrize(
    ("name", "entries", "expression"),
    [
        ("PUT and DELETE by id", [put(patient(id="1")), delete("Patient/1")],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.url"]),
        ("PUT twice", [put(patient("A", id="1")), put(patient("B", id="1"))],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.url"]),
        ("PATCH and PUT", [json_patch("Patient/1", []), put(patient(id="1"))],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.url"]),
        ("DELETE twice", [delete("Patient/1"), delete("Patient/1")],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.url"]),
        ("conditional update and ifNoneExist on one condition",
         [cond_put(), post(patient(), if_none_exist=COND)],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.ifNoneExist"]),
        ("the same condition written in another order",
         [delete(f"Patient?family=x&{COND}"), cond_put(f"{COND}&family=x")],
         ["Bundle.entry[0].request.url", "Bundle.entry[1].request.url"]),
        ("ifNoneExist twice", [post(patient(), if_none_exist=COND),
                               post(patient(), if_none_exist=COND)],
         ["Bundle.entry[0].request.ifNoneExist", "Bundle.entry[1].request.ifNoneExist"]),
        ("conditional update with a body id and a PUT of that id",
         [put(patient(id="7"), f"Patient?{COND}"), put(patient(id="7"))],
         ["Bundle.entry[0].resource.id", "Bundle.entry[1].request.url"]),
    ],
)
def test_two_writes_touching_one_resource_fail_naming_both(
    name: str, entries: list[dict[str, Any]], expression: list[str]
) -> None:
    err = fails(*entries)
    assert (err.status, err.index) == (400, 1), name
    assert err.expression == expression, name
    # Never dependent on entry order: reversed, the same two entries are named.
    err = fails(*reversed(entries))
    assert err.status == 400 and len(err.expression) == 2, name


@pytest.mark.parametrize(
    ("name", "entries"),
    [
        ("a read of a written resource (step 4)", [put(patient(id="1")), get("Patient/1")]),
        ("different ids", [put(patient(id="1")), delete("Patient/2")]),
        ("one id on two types", [put(patient(id="1")),
                                 delete("Observation/1")]),
        ("different conditions", [cond_put(), post(patient(), if_none_exist=f"{COND}2")]),
    ],
)
def test_writes_that_do_not_overlap_are_planned(
    name: str, entries: list[dict[str, Any]]
) -> None:
    assert len(plan(*entries).entries) == len(entries), name


def test_a_batch_may_touch_one_resource_several_times() -> None:
    p = plan_batch([(0, put(patient(id="1"))), (1, delete("Patient/1"))])
    assert not p.failures and len(p.entries) == 2


def test_resolved_identities_are_checked_with_the_same_rule() -> None:
    # What execution feeds in once conditions are resolved: a conditional update that matched
    # Patient/9, next to a DELETE of Patient/9.
    touches = [(3, "Bundle.entry[3].request.url", "Patient/9"),
               (1, "Bundle.entry[1].request.url", "Patient/9")]
    with pytest.raises(FhirError) as info:
        check_overlap(touches)
    assert info.value.expression == ["Bundle.entry[1].request.url", "Bundle.entry[3].request.url"]
    check_overlap([(1, "a", "Patient/9"), (1, "b", "Patient/9")])  # one entry: no overlap


# --------------------------------------------------------------------------- failing entries


@pytest.mark.parametrize(
    ("name", "entry", "status", "expression"),
    [
        ("unknown type", head("GET", "Nonsense/1"), 400, "Bundle.entry[1].request.url"),
        ("operation", head("POST", "ValueSet/$lookup"), 501, "Bundle.entry[1].request.url"),
        ("no method", {"request": {"url": "Patient"}}, 400, "Bundle.entry[1].request.method"),
        ("no request", {"resource": patient()}, 400, "Bundle.entry[1].request"),
        ("invalid resource", post(patient(birthDate="1970-13-45")), 400,
         "Bundle.entry[1].resource.birthDate"),
        ("body id differs from URL", put(patient(id="a"), "Patient/b"), 400,
         "Bundle.entry[1].resource.id"),
        ("unsupported condition", put(patient(), "Patient?shoe-size=42"), 400,
         "Bundle.entry[1].request.url"),
        ("empty condition", delete("Patient?"), 400, "Bundle.entry[1].request.url"),
        ("condition of result parameters only", delete("Patient?_count=1"), 400,
         "Bundle.entry[1].request.url"),
        ("unsupported ifNoneExist", post(patient(), if_none_exist="shoe-size=42"), 400,
         "Bundle.entry[1].request.ifNoneExist"),
        ("PATCH without a patch", head("PATCH", "Patient/1") | {"resource": patient()}, 400,
         "Bundle.entry[1].resource"),
        ("create query differs from ifNoneExist",
         head("POST", f"Patient?{COND}") | {"resource": patient()}
         | {"request": {"method": "POST", "url": f"Patient?{COND}",
                        "ifNoneExist": f"{COND}-other"}},
         400, "Bundle.entry[1].request.ifNoneExist"),
        # A query is never silently ignored
        ("query on PUT by id", put(patient(id="1"), "Patient/1?active=true"), 400,
         "Bundle.entry[1].request.url"),
        ("query on DELETE by id", delete("Patient/1?_cascade=delete"), 400,
         "Bundle.entry[1].request.url"),
        ("query on PATCH by id", json_patch("Patient/1?x=1", []), 400,
         "Bundle.entry[1].request.url"),
        ("query on read", get("Patient/1?_elements=name"), 400, "Bundle.entry[1].request.url"),
        ("query on vread", get("Patient/1/_history/1?x=y"), 400, "Bundle.entry[1].request.url"),
        ("_since on history (not supported)", get("Patient/1/_history?_since=2020-01-01"), 400,
         "Bundle.entry[1].request.url"),
        ("_format=xml on read", get("Patient/1?_format=xml"), 501, "Bundle.entry[1].request.url"),
        # ETags
        ("ifMatch a number", put(patient(id="1")) | {"request": {
            "method": "PUT", "url": "Patient/1", "ifMatch": 3}}, 400,
         "Bundle.entry[1].request.ifMatch"),
        ("ifMatch not an id", put(patient(id="1"), if_match='W/"²"'), 400,
         "Bundle.entry[1].request.ifMatch"),
        ("ifMatch with stray quotes", put(patient(id="1"), if_match='W/"1'), 400,
         "Bundle.entry[1].request.ifMatch"),
    ],
)
def test_one_bad_entry_fails_the_transaction_and_only_itself_in_a_batch(
    name: str, entry: dict[str, Any], status: int, expression: str
) -> None:
    entries = [(0, post(patient())), (1, entry)]
    with pytest.raises(FhirError) as info:
        plan_transaction(entries)
    err = info.value
    assert (err.status, err.index) == (status, 1), (name, err.diagnostics)
    assert expression in err.expression, (name, err.expression)
    b = plan_batch(entries)
    assert [e.index for e in b.entries] == [0] and set(b.failures) == {1}, name
    assert b.failures[1].status == status, name
    assert b.indexes == (0, 1)


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("Patient/1?_format=json", "read"),
        ("Patient/1/_history/2?_pretty=true", "vread"),
        ("Patient/1/_history?_count=5&_offset=5", "history"),
        ("Patient/_history?_count=5", "history"),
        ("Patient?name=peter&_count=1", "search"),
    ],
)
def test_queries_that_mean_something_are_kept(url: str, kind: str) -> None:
    (e,) = plan(get(url)).entries
    assert e.kind == kind


# --------------------------------------------------------------------------- ETags


@pytest.mark.parametrize(
    ("value", "version"),
    [('W/"3"', "3"), ('"3"', "3"), ("3", "3"), ('W/"3a"', "3a"), (None, None), ("", None)],
)
def test_etags_name_a_version_id(value: str | None, version: str | None) -> None:
    # `W/"3a"` is well formed: it matches no version this server wrote, a 412 at execution.
    assert parse_etag(value) == version


@pytest.mark.parametrize("value", [3, 'W/"²"', 'W/"1', "W/", 'W/"a b"', ["W/\"1\""]])
def test_malformed_etags_are_400(value: object) -> None:
    with pytest.raises(FhirError) as info:
        parse_etag(value, expression="Bundle.entry[0].request.ifMatch")
    assert info.value.status == 400
    assert info.value.expression == ["Bundle.entry[0].request.ifMatch"]


def test_plans_are_immutable() -> None:
    p = plan(post(patient()))
    e: PlannedEntry = p.entries[0]
    with pytest.raises(AttributeError):
        e.id = "other"  # type: ignore[misc]


def test_a_transaction_over_its_size_cap_is_413() -> None:
    entries = [(i, post(patient())) for i in range(3)]
    assert len(plan_transaction(entries, max_entries=3).entries) == 3
    with pytest.raises(FhirError) as info:
        plan_transaction(entries, max_entries=2)
    assert info.value.status == 413 and info.value.expression == ["Bundle.entry"]


def test_reads_come_after_every_write_so_a_failing_read_rolls_them_back() -> None:
    # Execution fails the transaction on a failing GET/HEAD (tests/test_transactions.py); the
    # plan's part is that reads run last, after every write they could observe.
    p = plan(get("Patient/1"), head("HEAD", "Patient/2"), post(patient()), delete("Patient/3"))
    phases = [p.entries[i].phase for i in p.order]
    assert phases == sorted(phases) and phases[-2:] == [3, 3]

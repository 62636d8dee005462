"""The CapabilityStatement served at `[base]/metadata`: what this server really supports."""

from __future__ import annotations

from functools import cache
from typing import Any

from core.config import Settings
from core.fhir.search_params import param_types
from core.fhir.search_registry import params_for, resource_types
from core.fhir.validation import known_resource_type

_INTERACTIONS = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
]

def search_capabilities(rtype: str) -> dict[str, Any]:
    """`searchParam`, `searchInclude` and `searchRevInclude` of one type, from the R4 registry:
    every parameter the registry compiles that the query parser answers to."""
    answered = param_types(rtype)
    params = {n: p for n, p in params_for(rtype).items() if p.supported and n in answered}
    refs = [n for n, p in params.items() if p.type == "reference"]
    return {
        "searchParam": [
            {"name": n, "type": p.type, "documentation": p.expression}
            if p.expression else {"name": n, "type": p.type}
            for n, p in params.items()
        ],
        "searchInclude": [f"{rtype}:{n}" for n in refs] + ([f"{rtype}:*"] if refs else []),
        "searchRevInclude": _rev_includes().get(rtype, []),
    }


@cache
def _rev_includes() -> dict[str, list[str]]:
    """Target type → every `Source:param` whose reference parameter may point at it."""
    out: dict[str, list[str]] = {}
    for source in resource_types():
        answered = param_types(source)
        for n, p in params_for(source).items():
            if p.type == "reference" and p.supported and n in answered:
                for target in p.targets:
                    out.setdefault(target, []).append(f"{source}:{n}")
    return {t: sorted(v) for t, v in out.items()}


def capability_statement(base_url: str, settings: Settings) -> dict[str, Any]:
    resources = []
    for rtype in resource_types():
        if not known_resource_type(rtype):
            continue
        resources.append(
            {
                "type": rtype,
                "interaction": [{"code": code} for code in _INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "not-supported",
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                "referencePolicy": _reference_policy(settings),
                **search_capabilities(rtype),
            }
        )
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "fhirq", "version": "0.1.0"},
        "implementation": {
            "description": "fhirq: asynchronous FHIR R4 batch & transaction processor",
            "url": base_url,
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json", "application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    f"Bundles of type batch and transaction are answered synchronously up to "
                    f"{settings.sync_max_entries} entries; send 'Prefer: respond-async' to run any "
                    "size as a job (FHIR asynchronous request pattern). PUT [base] with a JSON "
                    "array or NDJSON performs a batch upsert. " + _reference_rules(settings)
                    + " " + _SEARCH_RULES
                ),
                "security": _security(settings),
            "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


_SEARCH_RULES = (
    "Searches page by a keyset cursor (the next link's _cursor; _offset is kept for "
    "compatibility) and take _count, _sort (one or more parameters, '-' descending), "
    "_total=accurate|estimate|none, _summary=count|text|data, _elements, _include and "
    "_revinclude (:iterate one level), chained parameters one level (ref:Type.param, or "
    "ref.param when one target type has the parameter) and _has one level."
)


def _reference_policy(settings: Settings) -> list[str]:
    """R4 ReferenceHandlingPolicy codes that hold: literal references are understood, only
    those to this server (`local`), and with referential integrity on they must resolve
    (`enforced`). Reference.identifier is stored but never resolved, so not `logical`."""
    policy = ["literal", "local"]
    if settings.referential_integrity:
        policy.append("enforced")
    return policy


def _reference_rules(settings: Settings) -> str:
    if not settings.referential_integrity:
        return ("References are not checked (FHIRQ_REFERENTIAL_INTEGRITY is off): a written "
                "resource may point at a resource that does not exist yet.")
    return ("A literal reference (Type/id) in a written resource must name an existing "
            "resource or one the same transaction writes, else the write is refused (400); "
            "deleting a resource does not check what points at it.")


def _security(settings: Settings) -> dict[str, Any]:
    if settings.auth == "off":
        return {"cors": False, "description": "Authentication is off (loopback only)."}
    return {
        "cors": False,
        "service": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
            "code": "SMART-on-FHIR",
        }]}],
        "description": (
            "Bearer tokens on every route but health and metadata: fhirq API keys or JWTs "
            "(RS256/ES256) with SMART system scopes, e.g. system/*.read, system/*.write."
        ),
    }

"""The CapabilityStatement served at `[base]/metadata`: what this server really supports."""

from __future__ import annotations

from typing import Any

from core.config import Settings
from core.fhir.search_params import supported_params
from core.fhir.validation import known_resource_type

# Types with search parameters beyond the common ones; every R4 type is stored and readable.
_TYPES = [
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Location",
    "Encounter",
    "Observation",
    "Condition",
    "Procedure",
    "MedicationRequest",
    "Immunization",
    "DiagnosticReport",
    "CarePlan",
    "CareTeam",
    "Claim",
    "ExplanationOfBenefit",
    "Schedule",
    "Slot",
    "Appointment",
    "AllergyIntolerance",
    "Device",
    "DocumentReference",
    "Goal",
    "ImagingStudy",
    "Medication",
    "MedicationAdministration",
    "Provenance",
    "SupplyDelivery",
]

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

_PARAM_TYPES = {
    "_id": "token",
    "_lastUpdated": "date",
    "identifier": "token",
    "name": "string",
    "family": "string",
    "given": "string",
    "birthdate": "date",
    "gender": "token",
    "status": "token",
    "code": "token",
    "subject": "reference",
    "patient": "reference",
    "date": "date",
    "schedule": "reference",
    "start": "date",
    "actor": "reference",
}


def capability_statement(base_url: str, settings: Settings) -> dict[str, Any]:
    resources = []
    for rtype in _TYPES:
        if not known_resource_type(rtype):
            continue
        params = [
            {"name": p, "type": _PARAM_TYPES.get(p, "token")}
            for p in supported_params(rtype)
            if not p.startswith("_count")
        ]
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
                "searchParam": params,
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
                ),
                "security": _security(settings),
            "resource": resources,
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
            }
        ],
    }


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

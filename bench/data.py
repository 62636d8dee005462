"""Benchmark data: deterministic generators for every workload's resources and request bodies,
and the loader of the real Synthea bundles (read in place, never copied).

Everything is plain FHIR JSON (dicts with camelCase keys) built from a seeded `random.Random`,
so two runs send byte-identical bodies and only the server's ids differ.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "SYNTHEA_DIR",
    "Resource",
    "SyntheaSet",
    "batch_body",
    "bundle_resources",
    "count_entries",
    "load_synthea",
    "patient",
    "synthea_like_bundle",
    "transaction_body",
    "upsert_set",
]

Resource = dict[str, Any]

# The real Synthea output shipped beside the repository (see its README); FHIRQ_SYNTHEA_DIR
# points elsewhere.
SYNTHEA_DIR = Path(os.environ.get("FHIRQ_SYNTHEA_DIR", "../shared/data/synthea"))

_FAMILIES = ["Smith", "Johnson", "Williams", "Brown", "Jones", "García", "Miller", "Davis",
             "Rodríguez", "Martínez", "Hernández", "López", "Gonzalez", "Wilson", "Anderson",
             "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee", "Pérez", "Thompson"]
_GIVEN = ["James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda",
          "David", "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica",
          "Thomas", "Sarah", "Charles", "Karen", "Zoë", "Renée", "José", "Chloé"]
_CITIES = [("Boston", "MA", "021"), ("Springfield", "MA", "011"), ("Worcester", "MA", "016"),
           ("Hartford", "CT", "061"), ("Providence", "RI", "029"), ("Portland", "ME", "041")]
_STREETS = ["Main St", "Oak Ave", "Maple Dr", "Cedar Ln", "Elm St", "Pine Rd", "Lake View Blvd"]
_LANGUAGES = [("en", "English"), ("es", "Spanish"), ("pt", "Portuguese"), ("fr", "French")]
_MARITAL = [("M", "Married"), ("S", "Never Married"), ("D", "Divorced"), ("W", "Widowed")]

_LOINC = "http://loinc.org"
_SNOMED = "http://snomed.info/sct"
_OBSERVATIONS = [("8302-2", "Body Height", "cm", 140, 200),
                 ("29463-7", "Body Weight", "kg", 40, 130),
                 ("39156-5", "Body mass index", "kg/m2", 17, 40),
                 ("8867-4", "Heart rate", "/min", 50, 110),
                 ("9279-1", "Respiratory rate", "/min", 10, 24),
                 ("2339-0", "Glucose", "mg/dL", 65, 180),
                 ("2093-3", "Total Cholesterol", "mg/dL", 140, 280),
                 ("4548-4", "Hemoglobin A1c", "%", 4, 10)]
_CONDITIONS = [("44054006", "Diabetes"), ("38341003", "Hypertension"),
               ("195662009", "Acute viral pharyngitis"), ("10509002", "Acute bronchitis"),
               ("40055000", "Chronic sinusitis"), ("15777000", "Prediabetes")]
_PROCEDURES = [("430193006", "Medication Reconciliation"), ("710824005", "Assessment of health"),
               ("171207006", "Depression screening"), ("428191000124101", "Documentation")]
_MEDICATIONS = [("314076", "lisinopril 10 MG Oral Tablet"), ("860975", "metformin 500 MG"),
                ("197361", "amlodipine 5 MG Oral Tablet"), ("310965", "ibuprofen 200 MG")]
_VACCINES = [("140", "Influenza, seasonal"), ("113", "Td (adult)"), ("133", "PCV13"),
             ("62", "HPV, quadrivalent")]


def _date(rng: random.Random, lo_year: int, hi_year: int) -> str:
    return f"{rng.randint(lo_year, hi_year)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _instant(rng: random.Random, lo_year: int = 2015, hi_year: int = 2024) -> str:
    return (f"{_date(rng, lo_year, hi_year)}T{rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def patient(i: int, rng: random.Random, *, res_id: str | None = None) -> Resource:
    """A realistic ~1 KB Patient: identifiers, an official and a usual name, telecom, an address,
    marital status and a language."""
    family, given = rng.choice(_FAMILIES), rng.choice(_GIVEN)
    city, state, zip3 = rng.choice(_CITIES)
    lang, lang_name = rng.choice(_LANGUAGES)
    marital, marital_name = rng.choice(_MARITAL)
    out: Resource = {"resourceType": "Patient"}
    if res_id is not None:
        out["id"] = res_id
    out.update({
        "identifier": [
            {"use": "usual",
             "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                  "code": "MR", "display": "Medical Record Number"}]},
             "system": "http://hospital.example.org/mrn", "value": f"MRN-{i:08d}"},
            {"use": "official", "system": "http://hl7.org/fhir/sid/us-ssn",
             "value": f"{rng.randint(100, 899)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"},
        ],
        "active": True,
        "name": [
            {"use": "official", "family": family, "given": [given, rng.choice(_GIVEN)],
             "prefix": [rng.choice(["Mr.", "Ms.", "Mrs.", "Dr."])]},
            {"use": "usual", "given": [given[:4]]},
        ],
        "telecom": [
            {"system": "phone", "value": f"555-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
             "use": "home"},
            {"system": "email", "value": f"{given.lower()}.{family.lower()}{i}@example.org"},
        ],
        "gender": rng.choice(["male", "female"]),
        "birthDate": _date(rng, 1930, 2020),
        "address": [{"use": "home",
                     "line": [f"{rng.randint(1, 999)} {rng.choice(_STREETS)}"],
                     "city": city, "state": state,
                     "postalCode": f"{zip3}{rng.randint(10, 99)}", "country": "US"}],
        "maritalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
            "code": marital, "display": marital_name}]},
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang,
                                                    "display": lang_name}]}}],
    })
    return out


def _entry(resource: Resource, method: str, url: str, full_url: str | None = None) -> Resource:
    out: Resource = {}
    if full_url is not None:
        out["fullUrl"] = full_url
    out["resource"] = resource
    out["request"] = {"method": method, "url": url}
    return out


def batch_body(resources: list[Resource]) -> bytes:
    """A `batch` Bundle creating every resource (POST to its type)."""
    entries = [_entry(r, "POST", r["resourceType"]) for r in resources]
    return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})


def transaction_body(entries: list[Resource]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})


def patients(n: int, seed: int = 1) -> list[Resource]:
    rng = random.Random(seed)
    return [patient(i, rng) for i in range(n)]


def upsert_set(n: int, seed: int = 2) -> tuple[list[Resource], list[Resource]]:
    """(setup, upserts): `n` upserts with client ids, every other one naming a resource that
    `setup` created first (changed, so it gets a new version), the others new."""
    rng = random.Random(seed)
    setup: list[Resource] = []
    upserts: list[Resource] = []
    for i in range(n):
        res_id = f"bench-up-{i}"
        if i % 2 == 0:
            setup.append(patient(i, rng, res_id=res_id))
            changed = patient(i, rng, res_id=res_id)
            changed["telecom"][0]["value"] = f"555-000-{i % 10000:04d}"
            upserts.append(changed)
        else:
            upserts.append(patient(i, rng, res_id=res_id))
    return setup, upserts


# --------------------------------------------------------------------------- Synthea-like


def _ref(full_url: str) -> Resource:
    return {"reference": full_url}


def _concept(system: str, code: str, display: str) -> Resource:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


_EXTRAS = ("Condition", "Procedure", "MedicationRequest", "Immunization")


def _clinical(kind: str, rng: random.Random, pat: str, enc: str, when: str) -> Resource:
    """One resource of an encounter besides its observations."""
    if kind == "Condition":
        return {"resourceType": "Condition",
                "clinicalStatus": _concept(
                    "http://terminology.hl7.org/CodeSystem/condition-clinical", "active",
                    "Active"),
                "code": _concept(_SNOMED, *rng.choice(_CONDITIONS)),
                "subject": _ref(pat), "encounter": _ref(enc), "onsetDateTime": when,
                "recordedDate": when}
    if kind == "Procedure":
        return {"resourceType": "Procedure", "status": "completed",
                "code": _concept(_SNOMED, *rng.choice(_PROCEDURES)),
                "subject": _ref(pat), "encounter": _ref(enc),
                "performedPeriod": {"start": when, "end": when}}
    if kind == "MedicationRequest":
        return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "medicationCodeableConcept": _concept(
                    "http://www.nlm.nih.gov/research/umls/rxnorm", *rng.choice(_MEDICATIONS)),
                "subject": _ref(pat), "encounter": _ref(enc), "authoredOn": when}
    return {"resourceType": "Immunization", "status": "completed",
            "vaccineCode": _concept("http://hl7.org/fhir/sid/cvx", *rng.choice(_VACCINES)),
            "patient": _ref(pat), "encounter": _ref(enc), "occurrenceDateTime": when,
            "primarySource": True}


def synthea_like_bundle(n_resources: int, rng: random.Random, serial: int = 0) -> list[Resource]:
    """Transaction entries shaped like Synthea's output: a Patient, then encounters, each with
    observations, conditions, procedures, prescriptions, immunizations and a report that points
    at its observations. Every reference is a `urn:uuid` placeholder of another entry.
    `n_resources` counts the resources besides the Patient."""
    entries: list[Resource] = []

    def add(resource: Resource) -> str:
        full_url = f"urn:uuid:{_uuid(rng)}"
        entries.append(_entry(resource, "POST", resource["resourceType"], full_url))
        return full_url

    pat = add(patient(serial, rng))
    left = n_resources
    while left > 0:
        when = _instant(rng)
        enc = add({
            "resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "AMB"},
            "type": [_concept(_SNOMED, "185349003", "Encounter for check up")],
            "subject": _ref(pat), "period": {"start": when, "end": when},
        })
        left -= 1
        observations: list[str] = []
        for _ in range(min(left, rng.randint(4, 10))):
            code, display, unit, lo, hi = rng.choice(_OBSERVATIONS)
            observations.append(add({
                "resourceType": "Observation", "status": "final",
                "category": [_concept(
                    "http://terminology.hl7.org/CodeSystem/observation-category",
                    "vital-signs", "Vital signs")],
                "code": _concept(_LOINC, code, display),
                "subject": _ref(pat), "encounter": _ref(enc), "effectiveDateTime": when,
                "issued": when,
                "valueQuantity": {"value": round(rng.uniform(lo, hi), 1), "unit": unit,
                                  "system": "http://unitsofmeasure.org", "code": unit},
            }))
            left -= 1
        for kind in rng.sample(_EXTRAS, k=rng.randint(1, len(_EXTRAS))):
            if left <= 0:
                break
            add(_clinical(kind, rng, pat, enc, when))
            left -= 1
        if left > 0 and observations:
            add({"resourceType": "DiagnosticReport", "status": "final",
                 "code": _concept(_LOINC, "51990-0", "Basic metabolic panel"),
                 "subject": _ref(pat), "encounter": _ref(enc), "effectiveDateTime": when,
                 "issued": when, "result": [_ref(o) for o in observations]})
            left -= 1
    return entries


def synthea_like_bundles(count: int, lo: int = 100, hi: int = 300, seed: int = 3
                         ) -> list[list[Resource]]:
    rng = random.Random(seed)
    return [synthea_like_bundle(rng.randint(lo, hi), rng, serial=i) for i in range(count)]


def bundle_resources(entries: list[Resource]) -> Iterator[Resource]:
    for entry in entries:
        if isinstance(entry.get("resource"), dict):
            yield entry["resource"]


# --------------------------------------------------------------------------- real Synthea


@dataclass(frozen=True)
class SyntheaSet:
    """The real bundles: the two `batch` bundles (hospital, practitioners) that the 20 patient
    `transaction` bundles reference conditionally, as raw bodies."""

    batches: list[tuple[str, bytes]]
    transactions: list[tuple[str, bytes]]

    @property
    def entries(self) -> int:
        return sum(count_entries(b) for _, b in self.batches + self.transactions)


def count_entries(body: bytes) -> int:
    return len(orjson.loads(body).get("entry") or [])


def load_synthea(directory: Path | None = None) -> SyntheaSet:
    root = (directory or SYNTHEA_DIR).expanduser()
    files = sorted(root.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no Synthea bundles in {root} (set FHIRQ_SYNTHEA_DIR)")
    batches: list[tuple[str, bytes]] = []
    transactions: list[tuple[str, bytes]] = []
    for path in files:
        body = path.read_bytes()
        kind = orjson.loads(body).get("type")
        (batches if kind == "batch" else transactions).append((path.name, body))
    return SyntheaSet(batches, transactions)

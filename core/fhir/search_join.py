"""Chained parameters and `_has` as SQL conditions on `resource`, composed from the other
type's own search conditions (whatever builds them for a plain search of that type).

- chain `subject:Patient.family=x` on Observation: the Observation's tokens overlap the
  reference tokens `"subject:Patient/{id}"` of the Patients matching `family=x` (an array
  computed once, then one GIN probe);
- `_has:Observation:patient:code=c` on Patient: the Patient's id is among the ids that the
  `"patient:Patient/{id}"` tokens of the Observations matching `code=c` name (primary key).

The inner statement scans its own `resource` (no correlation with the outer row), so the
inner conditions mean exactly what they mean in a search of that type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select, true

from core.fhir.search_controls import Join
from core.fhir.search_params import Query
from core.store.schema import resource as R

__all__ = ["join_condition"]

Conditions = Callable[[Query], list[ColumnElement[bool]]]


def join_condition(resource_type: str, join: Join, conditions: Conditions) -> ColumnElement[bool]:
    inner = conditions(join.query)
    if not join.reverse:
        refs = (
            select(literal(f"{join.param}:{join.target}/") + R.c.res_id)
            .where(*inner)
            .correlate(None)
            .scalar_subquery()
        )
        return R.c.tokens.overlap(func.array(refs))
    prefix = f"{join.param}:{resource_type}/"
    tok = func.unnest(R.c.tokens).table_valued("tok").render_derived(name="t")
    ids: Any = (
        select(func.substr(tok.c.tok, len(prefix) + 1))
        .select_from(R)
        .join(tok, true())
        .where(*inner, func.starts_with(tok.c.tok, prefix))
        .correlate(None)
    )
    return R.c.res_id.in_(ids)

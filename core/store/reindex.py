"""`fhirq db reindex`: recompute the search index of every stored resource.

Needed after a change of the extracted index (a migration that adds index tables, a new
search parameter): resources written before it keep their old index values until then.
Walks the current resources in (res_type, res_id) order, `batch` at a time, each batch in
its own transaction and one COPY plus one statement (`repository.reindex_resources`). A
resource updated between the read and the write is skipped: its writer stored fresh values.
Interrupting and rerunning is safe; `after` resumes after a given key.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from sqlalchemy import Engine

from core.fhir.search_index import extract_index
from core.store.repository import Key, WriteRow, reindex_resources

__all__ = ["reindex"]

_BATCH = """
SELECT r.res_type, r.res_id, h.content::text FROM resource r
JOIN resource_history h USING (res_type, res_id, version)
WHERE (r.res_type, r.res_id) > (%(t)s, %(i)s) AND NOT r.deleted
ORDER BY r.res_type, r.res_id LIMIT %(n)s
"""


def reindex(
    engine: Engine,
    *,
    batch: int = 500,
    after: Key = ("", ""),
    progress: Callable[[int, Key], None] | None = None,
) -> int:
    """Re-index every current resource after `after`; returns how many were re-indexed."""
    done = 0
    last = after
    while True:
        with engine.begin() as conn:
            rows = conn.exec_driver_sql(
                _BATCH, {"t": last[0], "i": last[1], "n": batch}
            ).all()
            if not rows:
                return done
            contents = [((t, i), orjson.loads(c)) for t, i, c in rows]
            done += reindex_resources(conn, [
                WriteRow(key, content, "PUT", extract_index(content)) for key, content in contents
            ])
        last = (rows[-1][0], rows[-1][1])
        if progress is not None:
            progress(done, last)

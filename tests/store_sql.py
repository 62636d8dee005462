"""Relations tests read the store through, as the product's queries see it: the current
resources with their content (kept once, in resource_history) and the entries with their
results (job_result; no result row = pending)."""

CURRENT = (
    "(SELECT r.res_type, r.res_id, r.version, r.last_updated, r.deleted, r.tokens,"
    " h.content FROM resource r LEFT JOIN resource_history h"
    " ON h.res_type = r.res_type AND h.res_id = r.res_id AND h.version = r.version)"
)

ENTRIES = (
    "(SELECT e.job_id, e.idx, e.request, r.status, r.outcome, r.finished_at FROM job_entry e"
    " LEFT JOIN job_result r ON r.job_id = e.job_id AND r.idx = e.idx)"
)

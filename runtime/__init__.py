"""The processes the product runs: the embedded PostgreSQL and Redis (`embedded`), the command
lines of the API, worker and beat (`processes`), process-tree helpers (`procutil`) and the
supervisor that keeps them running under `fhirq up` (`supervisor`).

`cli/`, `bench/` and `tests/` all start servers through this package; it imports none of
them.
"""

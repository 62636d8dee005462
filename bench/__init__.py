"""Benchmarks of fhirq, run by `fhirq bench` (and `make bench`): workloads W1–W6 against the
real API (gunicorn) and worker (Celery) processes, each with its raw PostgreSQL baseline (COPY of
the same rows into tables with the same indexes) measured in the same run.

    data       deterministic request bodies; the real Synthea bundles, read in place
    services   the benchmark database and broker (configured, local, or embedded)
    stack      the product's processes
    client     async submission, job polling, sync transactions over HTTP (httpx)
    monitor    peak RSS and CPU seconds of API, workers, PostgreSQL backends and the client
    baseline   the COPY baseline
    profile    py-spy profiles of the product's processes
    inprocess  a worker's chunks run in one process, every second accounted for
    workloads  W1–W6
    report     results: statistics, tables, JSON, Markdown
    runner     all of it, for `fhirq bench`
"""

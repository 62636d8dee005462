"""The `fhirq` command line: running the product (`up`, `api`, `worker`, `beat`, `db`) and the
embedded PostgreSQL and Redis of its default setup."""

# The few verbs a newcomer needs. Run them inside the project's virtualenv (README, Quickstart).
.PHONY: install run test test-faults lint bench smoke ci

install:  ## the project, editable, with the test tools
	pip install -e ".[test]"

run:  ## everything on the embedded default: http://127.0.0.1:8080/fhir
	fhirq up

test:  ## the test suite (FHIRQ_TEST_DATABASE_URL / FHIRQ_TEST_REDIS_URL, else embedded)
	pytest

test-faults:  ## the fault suite, slow cases included, and its table (README, Faults)
	python -m pytest -m faults -p no:cacheprovider tests/test_faults.py tests/test_faults_network.py

lint:
	ruff check .

bench:  ## benchmarks (bench/), with their raw PostgreSQL baselines
	fhirq bench

smoke:  ## start fhirq up on a temporary data dir, post a transaction, stop, check nothing is left
	bash .ci/smoke_up.sh

ci:  ## what CI runs, from a new virtualenv
	bash .ci/run

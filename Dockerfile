# One image for the API, the worker and beat; the command picks the role (docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FHIRQ_DATA_DIR=/var/lib/fhirq

WORKDIR /app
# Only what the package needs, so editing tests or docs does not rebuild the install layer.
COPY pyproject.toml README.md ./
COPY api ./api
COPY cli ./cli
COPY runtime ./runtime
COPY core ./core
COPY worker ./worker
RUN pip install . \
    && useradd --system --create-home --home-dir /home/fhirq fhirq \
    && mkdir -p "$FHIRQ_DATA_DIR" && chown fhirq "$FHIRQ_DATA_DIR"

USER fhirq
EXPOSE 8080
# `fhirq api` execs gunicorn, so `docker stop` reaches it directly.
CMD ["fhirq", "api", "--host", "0.0.0.0", "--port", "8080"]

"""WSGI entry point for gunicorn: `gunicorn api.wsgi:app`. The API process starts here, so its
logging is configured here (FHIRQ_LOG_FORMAT lines on stderr), before the app logs anything."""

from api import create_app
from api.guard import render_server_errors
from core.logging import configure_logging

configure_logging()
render_server_errors()
app = create_app()

"""URLs of the servers fhirq talks to: a PostgreSQL server's database, and the Redis broker in
the spelling redis-py reads."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["database_url", "redis_client_url"]


def database_url(server_url: str, database: str) -> str:
    """`server_url` naming `database` instead; query options (the embedded server's socket
    directory) kept verbatim: re-encoding them would put "%" in the URL, which Alembic's config
    parser reads as interpolation."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


def redis_client_url(broker_url: str) -> str:
    """Celery (kombu) spells a unix socket `redis+socket://PATH`; redis-py spells it
    `unix://PATH`."""
    for prefix in ("redis+socket://", "socket://"):
        if broker_url.startswith(prefix):
            return "unix://" + broker_url[len(prefix) :]
    return broker_url

"""`fhirq token create / list / revoke`: static API keys, straight in the database.

    fhirq token create --owner etl --scope 'system/*.*' --name nightly   # prints the token once
    fhirq token list [--owner etl]
    fhirq token revoke 3f9c0a1b2c3d4e5f

The database is FHIRQ_DATABASE_URL, or else the embedded PostgreSQL of a running `fhirq up`
found through FHIRQ_DATA_DIR (default `.fhirq`). A new key works at once; a revoked one stops
working within FHIRQ_API_KEY_CACHE_SECONDS (5 s), how long an API process trusts a key it has
verified.
"""

from __future__ import annotations

import click
from sqlalchemy import Engine

from core.auth.api_keys import ApiKey, create_key, list_keys, revoke_key

__all__ = ["register", "token"]


def register(group: click.Group) -> None:
    group.add_command(token)


def _engine() -> Engine:
    from core.store.db import get_engine
    from runtime import running

    url = running.database_url()
    if url is None:
        raise click.ClickException(
            "FHIRQ_DATABASE_URL is not set and no embedded PostgreSQL is running under "
            f"{running.data_dir()} (start `fhirq up`, or set FHIRQ_DATA_DIR to its data "
            "directory)"
        )
    return get_engine(url)


@click.group()
def token() -> None:
    """Static API keys (bearer tokens with SMART scopes)."""


@token.command("create")
@click.option("--owner", required=True, help="Owner of the jobs submitted with this key.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="SMART system scope, e.g. 'system/*.*', 'system/*.read', 'system/Patient.write', "
    "'system/*.cruds'; 'system/metrics.read' for a Prometheus scraper. Repeat, or separate "
    "with spaces.",
)
@click.option("--name", default=None, help="A note saying what the key is for.")
def create(owner: str, scopes: tuple[str, ...], name: str | None) -> None:
    """Create a key and print its token (on stdout, once: only its hash is stored)."""
    try:
        with _engine().begin() as conn:
            new = create_key(conn, owner, scopes, name)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    key = new.key
    click.echo(
        f"API key {key.id} for owner '{key.owner}' with scopes {' '.join(key.scopes)}. "
        "The token is shown once; store it now.",
        err=True,
    )
    click.echo(new.token)


def _row(key: ApiKey) -> list[str]:
    revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else ""
    return [key.id, key.owner, " ".join(key.scopes), key.created_at.isoformat(timespec="seconds"),
            revoked, key.name or ""]


@token.command("list")
@click.option("--owner", default=None, help="Only this owner's keys.")
@click.option("--json", "as_json", is_flag=True, help="The keys as JSON, for scripts.")
def list_(owner: str | None, as_json: bool) -> None:
    """List keys (never their tokens), revoked ones included."""
    with _engine().connect() as conn:
        keys = list_keys(conn, owner)
    if as_json:
        import orjson

        click.echo(orjson.dumps([
            {"id": k.id, "owner": k.owner, "scopes": list(k.scopes), "name": k.name,
             "createdAt": k.created_at.isoformat(),
             "revokedAt": k.revoked_at.isoformat() if k.revoked_at else None}
            for k in keys
        ], option=orjson.OPT_INDENT_2))
        return
    rows = [["id", "owner", "scopes", "created", "revoked", "name"]] + [_row(k) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())


@token.command("revoke")
@click.argument("key_id")
def revoke(key_id: str) -> None:
    """Revoke key KEY_ID: requests with its token get 401 (within FHIRQ_API_KEY_CACHE_SECONDS)."""
    with _engine().begin() as conn:
        key = revoke_key(conn, key_id)
    if key is None:
        raise click.ClickException(f"no API key '{key_id}' (see `fhirq token list`)")
    click.echo(f"API key {key.id} of '{key.owner}' revoked")

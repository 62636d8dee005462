"""The CLI's side of the HTTP API: which server, which token, and errors a person can act on.

Expected failures (server down, 401/403/404, a refused request) end the command with one line
saying what happened and what to do, never a traceback, and an exit status by kind:

    0  success
    1  a job ended failed or cancelled, or the server refused the request
    2  usage: a wrong option or argument, a file that does not exist (click's own)
    3  the server could not be reached
    4  authentication or permission refused (401 / 403)
    5  no such job (404)
    130  interrupted (Ctrl-C) while waiting; the jobs keep running
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import httpx

from runtime import running

__all__ = [
    "EXIT_AUTH",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_FAILED",
    "EXIT_NOT_FOUND",
    "EXIT_UNREACHABLE",
    "Api",
    "CliError",
    "server_options",
]

EXIT_JOB_FAILED = 1
EXIT_UNREACHABLE = 3
EXIT_AUTH = 4
EXIT_NOT_FOUND = 5
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """An expected failure: printed as one `Error: …` line, exit status by kind."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def server_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--token", envvar="FHIRQ_TOKEN", default=None,
                     help="Bearer token (env FHIRQ_TOKEN).")(f)
    f = click.option("--server", envvar="FHIRQ_SERVER", default=None,
                     help="fhirq API root, e.g. http://127.0.0.1:8080 (env FHIRQ_SERVER; "
                     "default: the running `fhirq up` of FHIRQ_DATA_DIR, else "
                     f"{running.DEFAULT_SERVER}).")(f)
    return f


def _diagnostics(response: httpx.Response) -> str:
    try:
        body = response.json()
        issues = (body.get("issue") or []) if isinstance(body, dict) else []
        return "; ".join(i.get("diagnostics", "") for i in issues if i.get("diagnostics")) or (
            response.text.strip()[:300])
    except ValueError:
        return response.text.strip()[:300]


class Api:
    """An httpx client on the chosen server whose failures are CliErrors."""

    def __init__(self, server: str | None, token: str | None) -> None:
        self.server, self.stack = running.server_url(server)
        self.token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=60)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(self, method: str, url: str, *, ok: tuple[int, ...] = (200,),
                **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from None
        if response.status_code not in ok:
            self.fail(response)
        return response

    def get(self, url: str, **kwargs: Any) -> Any:
        """GET a JSON document."""
        return self.request("GET", url, **kwargs).json()

    def unreachable(self, exc: Exception) -> CliError:
        where = ("--server / FHIRQ_SERVER" if self.stack is None
                 else f"the `fhirq up` recorded in {running.data_dir()}")
        reason = type(exc).__name__ if not str(exc) else str(exc)
        return CliError(
            f"cannot reach fhirq at {self.server} ({reason}; from {where}). Start it with "
            "`fhirq up`, or point --server / FHIRQ_SERVER at a running server.",
            EXIT_UNREACHABLE,
        )

    def fail(self, response: httpx.Response) -> None:
        status, text = response.status_code, _diagnostics(response)
        if status == 401:
            hint = ("pass --token or set FHIRQ_TOKEN" if not self.token
                    else "the token was refused (expired, revoked or mistyped?)")
            raise CliError(f"401 {text}: {hint}; create a key with `fhirq token create`",
                           EXIT_AUTH)
        if status == 403:
            raise CliError(f"403 {text}: the token lacks a scope for this", EXIT_AUTH)
        if status == 404:
            raise CliError(f"404 {text} (`fhirq jobs` lists yours)", EXIT_NOT_FOUND)
        raise CliError(f"{status}: {text}")

"""`GET /ui`: the jobs page, one static HTML file (`api/templates/ui.html`) whose script polls
`GET /jobs` every 2 s and draws each job's progress, state, counts, rate and failures.

The page holds no data, so it is an open route; its requests carry the bearer token the user
pastes into it (kept in the tab's sessionStorage), so it lists only the caller's jobs, like any
other client of `/jobs`. A strict Content-Security-Policy allows only the page's own inline
script and style (by hash) and requests to this origin: a job's content can never run as code
next to the token.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from flask import Blueprint, Response

__all__ = ["bp", "PAGE", "CSP"]

bp = Blueprint("ui", __name__)

PAGE = resources.files("api").joinpath("templates/ui.html").read_bytes()


def _hashes(tag: str) -> str:
    bodies = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), PAGE, re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'" for body in bodies
    )


CSP = (
    "default-src 'none'; "
    f"script-src {_hashes('script')}; style-src {_hashes('style')}; "
    "connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@bp.get("/ui")
def page() -> Response:
    return Response(PAGE, mimetype="text/html", headers=_HEADERS)

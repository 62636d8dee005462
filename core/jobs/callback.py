"""The completion callback: one HTTP POST of the job's JSON status to the URL given at submit."""

from __future__ import annotations

import logging
from typing import Any

import httpx

__all__ = ["deliver", "valid_callback_url"]

log = logging.getLogger(__name__)


def valid_callback_url(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.host)


def deliver(url: str, payload: dict[str, Any], timeout: float) -> bool:
    """POST the payload; True on a 2xx answer. Redirects are not followed."""
    try:
        response = httpx.post(url, json=payload, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        log.warning("callback to %s failed: %s", url, exc)
        return False
    if response.is_success:
        return True
    log.warning("callback to %s answered %s", url, response.status_code)
    return False

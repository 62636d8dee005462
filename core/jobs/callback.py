"""The completion callback: an HTTP POST of the job's JSON status to the URL given at submit,
to public addresses only, unless the operator allowed a host.

Rules (checked at submit, and again at each delivery, when the name is resolved anew):
- `https` only; `http` only to a host on the allow list (`FHIRQ_CALLBACK_ALLOW`: host names,
  IP addresses or networks such as `10.1.0.0/16`, for trusted internal hooks).
- No userinfo (`https://user:pw@host/`): credentials do not belong in a URL that is stored and
  shown in the job's status.
- Every address the host resolves to must be public (`ipaddress`' `is_global`, not multicast;
  IPv4 addresses embedded in IPv6 ones — mapped, compatible, 6to4, NAT64 — are checked as
  IPv4). Loopback, private, link-local, shared, reserved, unspecified and multicast addresses
  are refused unless the host name is allowed or the address is in an allowed network. Numeric
  spellings (`127.1`, `2130706433`, `0x7f.1`) resolve like any name, so they meet the same
  check.
- The connection goes to the address that was checked (the URL is rewritten to it, with the
  name in `Host` and as the TLS server name, whose certificate is verified): a DNS answer that
  changes between the check and the connection (rebinding) is never used. No proxy from the
  environment, no redirects.

A delivery's outcome is only sent or not sent: its state never tells which internal address or
port answered. Each POST carries `X-Fhirq-Delivery-Id`, the same on every attempt to deliver
one ending of a job, so a receiver can drop duplicates (delivery is at least once).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from core.errors import BadRequest

__all__ = [
    "CallbackRefused",
    "DELIVERY_ID_HEADER",
    "MAX_RETRY_DELAY",
    "check_callback_url",
    "deliver",
    "delivery_time_limit",
    "resolve",
    "retry_delay",
]

log = logging.getLogger(__name__)

DELIVERY_ID_HEADER = "X-Fhirq-Delivery-Id"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port → every address the host resolves to
Resolver = Callable[[str, int], list[str]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class CallbackRefused(BadRequest):
    """The callback URL breaks a rule above (400 at submit, naming the header)."""

    def __init__(self, diagnostics: str) -> None:
        super().__init__(diagnostics, code="value", expression="X-Callback-Url")


def resolve(host: str, port: int) -> list[str]:
    """Every address of `host` (the system resolver, so numeric forms are read as it reads
    them)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise CallbackRefused(f"The callback host {host!r} does not resolve: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


# Seconds between attempts: 2, 4, 8, … up to this.
MAX_RETRY_DELAY = 60


def retry_delay(attempt: int) -> int:
    return min(MAX_RETRY_DELAY, 2**attempt)


def delivery_time_limit(timeout: float) -> int:
    """Seconds one delivery attempt may take in all (the task's hard time limit): connecting,
    sending, reading the answer (each bounded by `timeout`), resolving the name, and 5 s for
    the task to end on its soft limit."""
    return int(4 * timeout) + 10


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL  # with the checked address as its host
    host: str  # the name, for Host and TLS
    address: str


def _allowed(host: str, allow: Sequence[str]) -> tuple[bool, list[ipaddress._BaseNetwork]]:
    """Is `host` listed by name, and the networks (single addresses included) listed."""
    names, networks = set(), []
    for entry in allow:
        entry = entry.strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            names.add(entry)
    return host in names, networks


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or int(ip) >> 32 == 0:  # NAT64, or the deprecated ::a.b.c.d
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _public(ip: IPAddress) -> bool:
    for candidate in (ip, _embedded_ipv4(ip)):
        if candidate is None:
            continue
        if not candidate.is_global or candidate.is_multicast or candidate.is_reserved:
            return False
        if isinstance(candidate, ipaddress.IPv6Address) and candidate.is_site_local:
            return False
    return True


def _in(ip: IPAddress, networks: list[ipaddress._BaseNetwork]) -> bool:
    addresses = [ip] + ([v4] if (v4 := _embedded_ipv4(ip)) is not None else [])
    return any(a.version == n.version and a in n for a in addresses for n in networks)


def _check(url: str, allow: Sequence[str], resolver: Resolver) -> _Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise CallbackRefused("X-Callback-Url is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise CallbackRefused("X-Callback-Url must be an absolute https URL")
    if parsed.userinfo:
        raise CallbackRefused(
            "X-Callback-Url must not carry a user name or password; the receiver has to "
            "authenticate the call some other way (a secret path, the delivery id)"
        )
    if parsed.fragment:
        raise CallbackRefused("X-Callback-Url must not have a #fragment")
    host = parsed.raw_host.decode("ascii").lower().rstrip(".")
    by_name, networks = _allowed(host, allow)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    listed = by_name or (literal is not None and _in(literal, networks))
    if parsed.scheme != "https" and not listed:
        raise CallbackRefused(
            "X-Callback-Url must be https (http only to hosts in FHIRQ_CALLBACK_ALLOW)"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    addresses = resolver(host, port)
    if not addresses:
        raise CallbackRefused(f"The callback host {host!r} has no address")
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if not (by_name or _public(ip) or _in(ip, networks)):
            # The same words for every refused address: the answer must not map the network.
            raise CallbackRefused(
                f"The callback host {host!r} resolves to an address that is not public; "
                "internal hosts must be listed in FHIRQ_CALLBACK_ALLOW"
            )
    address = addresses[0]
    return _Target(url=parsed.copy_with(host=address), host=host, address=address)


def check_callback_url(url: str, allow: Sequence[str], resolver: Resolver = resolve) -> None:
    """Refuse (400, `CallbackRefused`) a callback URL that breaks the rules above."""
    _check(url, allow, resolver)


def deliver(url: str, payload: dict[str, Any], *, timeout: float, allow: Sequence[str],
            delivery_id: str, resolver: Resolver = resolve,
            verify: ssl.SSLContext | bool = True) -> bool:
    """POST the payload to the checked address; True on a 2xx answer. Redirects are not
    followed (a 3xx is a failure). `verify`: how the server's certificate is checked against
    the host name (by default, against the public CAs httpx trusts)."""
    try:
        target = _check(url, allow, resolver)
    except CallbackRefused as exc:
        log.warning("callback not sent: %s", exc.diagnostics)
        return False
    port = target.url.port
    host_header = target.host if port is None else f"{target.host}:{port}"
    headers = {"Host": host_header, "Content-Type": "application/json",
               DELIVERY_ID_HEADER: delivery_id}
    extensions = {"sni_hostname": target.host} if target.url.scheme == "https" else {}
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False,
                          verify=verify) as client:
            response = client.post(target.url, content=orjson.dumps(payload), headers=headers,
                                   extensions=extensions)
    except httpx.HTTPError as exc:
        log.warning("callback to %s (%s) failed: %s", target.host, target.address,
                    type(exc).__name__)
        return False
    if response.is_success:
        return True
    log.warning("callback to %s answered %s", target.host, response.status_code)
    return False

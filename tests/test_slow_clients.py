"""Slow clients cannot starve the API: the real API processes (gunicorn with fhirq's worker
class, the command line `fhirq up` and `fhirq api` run) keep answering /healthz quickly while 64
connections trickle request heads and bodies one byte every 2 s (some after `Expect:
100-continue`); a trickler is dropped after the header timeout; ordinary, chunked, pipelined and
100-continue requests still work."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.api_process import api_process
from tests.jobs_helpers import jobs_env  # noqa: F401 - fixture

TRICKLERS = 64
TRICKLE_EVERY = 2.0
HEADER_TIMEOUT = 6


@pytest.fixture(scope="module")
def api_url(jobs_env: dict[str, str]) -> Iterator[str]:  # noqa: F811
    # The defaults of `fhirq up`: 2 processes × 4 threads.
    with api_process({**jobs_env, "FHIRQ_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}, 2, 4) as api:
        yield api.url


class Tricklers:
    """Connections that send a request's first part, then one more byte every 2 s."""

    def __init__(self, port: int, openings: list[bytes]) -> None:
        self.socks = []
        for opening in openings:
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(opening)
            self.socks.append(s)
        self.stop = threading.Event()
        self.closed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(TRICKLE_EVERY):
            for s in self.socks:
                try:
                    s.send(b"a")
                except OSError:
                    self.closed += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()


def _head_trickle() -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "


def _body_trickle(expect: bool = False) -> bytes:
    return (b"POST /fhir HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
            + (b"Expect: 100-continue\r\n" if expect else b"")
            + b"Content-Length: 100000\r\n\r\n{")


def _latencies(url: str, seconds: float) -> list[float]:
    out: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        try:
            ok = httpx.get(f"{url}/healthz", timeout=5, trust_env=False).status_code == 200
        except httpx.HTTPError:
            ok = False
        out.append(time.monotonic() - start if ok else 5.0)
        time.sleep(0.05)
    return out


def test_healthz_stays_fast_with_64_trickling_connections(api_url: str) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    # Heads, bodies, and bodies sent after `Expect: 100-continue` was answered.
    openings = [[_head_trickle(), _body_trickle(), _body_trickle(expect=True)][i % 3]
                for i in range(TRICKLERS)]
    slow = Tricklers(port, openings)
    try:
        time.sleep(1)
        samples = sorted(_latencies(api_url, 10))
    finally:
        slow.close()
    p99 = samples[int(len(samples) * 0.99) - 1]
    assert len(samples) >= 50
    assert p99 < 1.0, f"/healthz p99 {p99:.3f} s with {TRICKLERS} trickling connections"


def test_a_trickling_head_is_dropped_after_the_header_timeout(api_url: str) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(_head_trickle())
        s.settimeout(1)
        start = time.monotonic()
        closed_after = None
        while time.monotonic() - start < HEADER_TIMEOUT + 10:
            try:
                s.send(b"a")
                if s.recv(1024) == b"":
                    closed_after = time.monotonic() - start
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - start
                break
    assert closed_after is not None, "the server kept a trickling head open"
    assert closed_after < HEADER_TIMEOUT + 3


def _exchange(port: int, raw: bytes, responses: int) -> bytes:
    """Send `raw` in pieces and read until `responses` responses (each ends with its body)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        for i in range(0, len(raw), 7):
            s.sendall(raw[i : i + 7])
        data = b""
        while data.count(b"HTTP/1.1 ") < responses or not data.endswith(b"}"):
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
        return data


def test_chunked_and_pipelined_requests_are_served(api_url: str) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    body = b'{"resourceType": "Bundle", "type": "batch", "entry": []}'
    chunked = (
        b"POST /fhir HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 10]), body[i : i + 10])
                   for i in range(0, len(body), 10))
        + b"0\r\n\r\n"
    )
    answer = _exchange(port, chunked, 1)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"batch-response"' in answer

    health = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _exchange(port, health * 3, 3)
    assert answer.count(b"HTTP/1.1 200") == 3, answer[:600]


def test_expect_100_continue_is_answered_once_then_the_request_runs(api_url: str) -> None:
    port = int(api_url.rsplit(":", 1)[1])
    body = b'{"resourceType": "Bundle", "type": "batch", "entry": []}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        s.sendall(b"POST /fhir HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"
                  b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        interim = s.recv(1024)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        answer = b""
        while not answer.endswith(b"}"):
            piece = s.recv(65536)
            if not piece:
                break
            answer += piece
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b"100 Continue" not in answer and b'"batch-response"' in answer

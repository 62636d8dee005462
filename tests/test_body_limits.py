"""The synchronous byte limit (FHIRQ_SYNC_MAX_BYTES) holds on every synchronous route before the
body is read past it: bundles, batch upsert (JSON and streamed NDJSON), REST create and update,
both kinds of PATCH and form searches answer 413 with an OperationOutcome, whether the size is
declared (Content-Length, nothing read) or only found while reading (chunked, read at most up to
the limit). A real API process answers a 200 MB chunked NDJSON upsert with 413 and its memory
does not grow by the body's size."""

from __future__ import annotations

import io
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psutil
import pytest

from tests.api_process import ApiProcess, api_process
from tests.jobs_helpers import jobs_env  # noqa: F401 - fixture

LIMIT = 20_000
SENT = 5_000_000

# (method, path, content type)
ROUTES = [
    ("POST", "/fhir", "application/fhir+json"),
    ("PUT", "/fhir", "application/fhir+json"),
    ("PUT", "/fhir", "application/fhir+ndjson"),
    ("POST", "/fhir/Patient", "application/fhir+json"),
    ("PUT", "/fhir/Patient/p1", "application/fhir+json"),
    ("PUT", "/fhir/Patient?identifier=s|1", "application/fhir+json"),
    ("PATCH", "/fhir/Patient/p1", "application/json-patch+json"),
    ("PATCH", "/fhir/Patient/p1", "application/fhir+json"),
    ("PATCH", "/fhir/Patient?identifier=s|1", "application/json-patch+json"),
    ("POST", "/fhir/Patient/_search", "application/x-www-form-urlencoded"),
]


class CountingStream(io.RawIOBase):
    """A body of `size` bytes of JSON-ish filler that counts how much the server read."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = b" " * n
        self.read_bytes += n
        return n


@pytest.fixture
def limited(client: Any) -> Any:
    app = client.application
    app.config["FHIRQ"] = replace(app.config["FHIRQ"], sync_max_bytes=LIMIT)
    return client


def _is_413(r: Any) -> None:
    assert r.status_code == 413, (r.status_code, r.data[:300])
    body = r.json
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "too-costly"


@pytest.mark.parametrize(("method", "path", "mime"), ROUTES)
def test_a_declared_oversized_body_is_413_unread(limited: Any, method: str, path: str,
                                                   mime: str) -> None:
    stream = CountingStream(SENT)
    r = limited.open(path, method=method, content_type=mime,
                     environ_overrides={"wsgi.input": stream, "CONTENT_LENGTH": str(SENT)})
    _is_413(r)
    assert stream.read_bytes == 0


@pytest.mark.parametrize(("method", "path", "mime"), ROUTES)
def test_an_undeclared_oversized_body_is_413_read_only_to_the_limit(
    limited: Any, method: str, path: str, mime: str
) -> None:
    stream = CountingStream(SENT)
    # No Content-Length: a chunked body, whose size the server learns only by reading it.
    r = limited.open(path, method=method, content_type=mime, environ_overrides={
        "wsgi.input": stream, "CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    _is_413(r)
    assert stream.read_bytes <= LIMIT + 64 * 1024, stream.read_bytes


def test_a_body_at_the_limit_is_read(limited: Any) -> None:
    body = b'{"resourceType": "Patient"}'.ljust(LIMIT, b" ")
    r = limited.post("/fhir/Patient", data=body, content_type="application/fhir+json")
    assert r.status_code == 201, r.json


# --------------------------------------------------------------------------- a real API process


@pytest.fixture(scope="module")
def api_server(jobs_env: dict[str, str]) -> Iterator[ApiProcess]:  # noqa: F811
    with api_process(jobs_env, 1, 2) as api:
        yield api


def _rss(proc: subprocess.Popen[bytes]) -> int:
    root = psutil.Process(proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def test_a_huge_chunked_ndjson_upsert_is_413_without_memory_growth(
    api_server: ApiProcess,
) -> None:
    proc, port = api_server.proc, api_server.port
    total = 200 * 1024 * 1024
    line = b'{"resourceType": "Patient", "id": "x"}\n' * 1000
    chunk = b"%x\r\n%s\r\n" % (len(line), line)
    before = _rss(proc)
    peak = before
    sent = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"PUT /fhir HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+ndjson\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        answer = b""

        def receive() -> None:
            nonlocal answer
            s.settimeout(60)
            try:
                while b"\r\n\r\n" not in answer:
                    piece = s.recv(65536)
                    if not piece:
                        return
                    answer += piece
            except OSError:
                return

        reader = threading.Thread(target=receive)
        reader.start()
        try:
            while sent < total and reader.is_alive():
                s.sendall(chunk)
                sent += len(line)
                if sent % (8 * len(line)) == 0:
                    peak = max(peak, _rss(proc))
        except OSError:
            pass  # the server answered and closed while the client was still sending
        reader.join(60)
    time.sleep(0.5)
    peak = max(peak, _rss(proc))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent < total, "the server read the whole body before answering"
    assert peak - before < 50 * 1024 * 1024, f"API memory grew by {(peak - before) >> 20} MiB"

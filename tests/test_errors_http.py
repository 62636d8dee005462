"""Refusals of the HTTP layer are OperationOutcomes too, checked against a real gunicorn started
with the same command line as `fhirq api`: URIs and header fields over the product's limits
(414 / 431 from the app), beyond gunicorn's own limits (414 / 431 / 400 from gunicorn), and
control characters in the path, query and headers."""

from __future__ import annotations

import orjson
import pytest

from tests.http_helpers import exchange, get, gunicorn_api  # noqa: F401 - a fixture


@pytest.fixture(scope="module")
def server(gunicorn_api: int) -> int:  # noqa: F811 - the fixture imported above
    return gunicorn_api


def _outcome(answer: tuple[int, dict[str, str], bytes], status: int, code: str) -> dict:
    got, headers, body = answer
    assert got == status, body[:300]
    assert headers["content-type"].startswith("application/fhir+json"), headers
    parsed = orjson.loads(body)
    assert parsed["resourceType"] == "OperationOutcome"
    assert parsed["issue"][0]["code"] == code, parsed
    return parsed


def test_uri_within_the_limit_is_served(server: int) -> None:
    target = "/fhir/Patient?family=" + "a" * 7000
    got, _, body = exchange(server, get(server, target))
    assert got == 200, body[:300]


@pytest.mark.parametrize("size", [8100, 8185, 20_000])
def test_long_uris_are_414_outcomes(server: int, size: int) -> None:
    # 8100: the app's limit (8000); 8185: right at gunicorn's 8190-byte request line;
    # 20,000: gunicorn's own refusal.
    target = "/fhir/Patient?family=" + "a" * (size - 21)
    _outcome(exchange(server, get(server, target)), 414, "too-long")


@pytest.mark.parametrize("size", [9000, 30_000])
def test_large_header_fields_are_431_outcomes(server: int, size: int) -> None:
    # 9,000: the app's limit (8000); 30,000: beyond gunicorn's 16380-byte field limit.
    answer = exchange(server, get(server, "/fhir/metadata", "X-Big: " + "b" * size))
    _outcome(answer, 431, "too-long")


def test_too_many_header_fields_are_a_431_outcome(server: int) -> None:
    fields = [f"X-F{i}: {i}" for i in range(150)]  # gunicorn takes at most 100
    _outcome(exchange(server, get(server, "/fhir/metadata", *fields)), 431, "too-long")


@pytest.mark.parametrize(
    "raw",
    [
        b"GET\x01 / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /fhir HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
        b"POST /fhir HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"PUT /fhir HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/fhir+ndjson\r\n\r\n2\r\n{}xx\r\n0\r\n\r\n",
        b"POST /fhir HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nPrefer: respond-async\r\n"
        b"Content-Type: application/fhir+json\r\n\r\n1\r\n{\r\nqq\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ],
    ids=["request-line", "content-length", "chunk-size", "chunk-terminator", "async-chunk",
         "http-version"],
)
def test_requests_gunicorn_cannot_parse_are_400_outcomes(server: int, raw: bytes) -> None:
    got, headers, body = exchange(server, raw)
    assert 400 <= got < 500 or got == 505, body[:300]
    assert headers["content-type"].startswith("application/fhir+json"), headers
    assert orjson.loads(body)["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("target", "where"),
    [
        ("/fhir/Patient/a%00b", "url"),
        ("/fhir/Patient?family=a%01b", "family"),
        ("/fhir/Patient?fam%00ily=x", "url"),
        ("/jobs/%00", "url"),
        ("/fhir/_async/%1f", "url"),
    ],
)
def test_control_characters_in_the_request_target(server: int, target: str, where: str) -> None:
    body = _outcome(exchange(server, get(server, target)), 400, "value")
    assert body["issue"][0]["expression"] == [where]

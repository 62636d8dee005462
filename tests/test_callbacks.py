"""Callback URLs: https only, public addresses only unless allowed (FHIRQ_CALLBACK_ALLOW), no
userinfo, no redirects, the connection pinned to the checked address — against real HTTP
receivers on loopback."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from core.jobs.callback import CallbackRefused, check_callback_url, deliver
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import job_id_of, patients_batch, submit

REFUSED_WITHOUT_ALLOW = [
    "http://8.8.8.8/hook",  # http to a host not allowed
    "https://user:pw@8.8.8.8/hook",
    "https://8.8.8.8@127.0.0.1/hook",
    "file:///etc/passwd",
    "ftp://8.8.8.8/x",
    "/relative/hook",
    "https://127.0.0.1/hook",
    "https://localhost/hook",
    "https://127.1/hook",
    "https://2130706433/hook",
    "https://0x7f.1/hook",
    "https://017700000001/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::127.0.0.1]/hook",
    "https://[64:ff9b::7f00:1]/hook",  # NAT64 of loopback
    "https://[2002:7f00:1::]/hook",  # 6to4 of loopback
    "https://[::1]/hook",
    "https://0.0.0.0/hook",
    "https://[::]/hook",
    "https://169.254.169.254/latest/meta-data",
    "https://[fe80::1]/hook",
    "https://[fec0::1]/hook",
    "https://10.1.2.3/hook",
    "https://172.16.0.1/hook",
    "https://192.168.1.1/hook",
    "https://100.64.0.1/hook",
    "https://224.0.0.1/hook",
    "https://[ff02::1]/hook",
    "https://240.0.0.1/hook",
    "https://255.255.255.255/hook",
]


@pytest.mark.parametrize("url", REFUSED_WITHOUT_ALLOW)
def test_refused_without_an_allow_list(url: str) -> None:
    with pytest.raises(CallbackRefused) as err:
        check_callback_url(url, ())
    assert err.value.status == 400 and err.value.expression == ["X-Callback-Url"]


def test_public_https_is_accepted() -> None:
    check_callback_url("https://8.8.8.8/hook?job=1", ())
    check_callback_url("https://[2001:4860:4860::8888]:8443/hook", ())


def fake_dns(table: dict[str, list[str]]) -> Any:
    def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


def test_every_address_of_a_name_is_checked() -> None:
    dns = fake_dns({"hooks.example.test": ["93.184.216.34", "10.0.0.7"],
                    "public.example.test": ["93.184.216.34", "2606:2800:220:1::1"]})
    with pytest.raises(CallbackRefused):
        check_callback_url("https://hooks.example.test/cb", (), dns)
    check_callback_url("https://public.example.test/cb", (), dns)
    check_callback_url("https://hooks.example.test/cb", ("hooks.example.test",), dns)
    check_callback_url("https://hooks.example.test/cb", ("10.0.0.0/8",), dns)


@pytest.mark.parametrize(("allow", "url", "ok"), [
    (("127.0.0.1",), "http://127.0.0.1:8080/cb", True),
    (("127.0.0.1",), "https://127.0.0.1/cb", True),
    (("127.0.0.1",), "http://localhost:8080/cb", False),  # http needs the host itself listed
    (("127.0.0.1",), "https://127.0.0.2/cb", False),
    (("127.0.0.1",), "https://[::1]/cb", False),
    (("localhost",), "http://LOCALHOST.:8080/cb", True),
    (("10.0.0.0/8",), "http://10.1.2.3/cb", True),
    (("10.0.0.0/8",), "https://192.168.0.1/cb", False),
    (("::1",), "http://[::1]:9/cb", True),
    (("127.0.0.1",), "http://user@127.0.0.1/cb", False),  # userinfo, even when allowed
])
def test_the_allow_list(allow: tuple[str, ...], url: str, ok: bool) -> None:
    if ok:
        check_callback_url(url, allow)
    else:
        with pytest.raises(CallbackRefused):
            check_callback_url(url, allow)


@dataclass
class Receiver:
    """A real HTTP server on loopback that records each request and answers `status`."""

    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            rec.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
            self.send_response(rec.status)
            for k, v in rec.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield rec
    server.shutdown()
    server.server_close()


def test_the_connection_goes_to_the_checked_address(receiver: Receiver) -> None:
    """The name exists only in the resolver the check used: had the HTTP client resolved it
    again, the request could not have arrived."""
    dns = fake_dns({"hooks.example.test": ["127.0.0.1"]})
    url = f"http://hooks.example.test:{receiver.port}/cb?x=1"
    assert deliver(url, {"id": "j"}, timeout=5, allow=("hooks.example.test",),
                   delivery_id="j.0", resolver=dns)
    (call,) = receiver.calls
    assert call["path"] == "/cb?x=1" and call["body"] == b'{"id":"j"}'
    assert call["headers"]["Host"] == f"hooks.example.test:{receiver.port}"
    assert call["headers"]["X-Fhirq-Delivery-Id"] == "j.0"


def test_a_name_that_now_resolves_inside_is_not_called(receiver: Receiver) -> None:
    """Accepted at submit while public; by delivery time the name points at loopback."""
    dns = fake_dns({"hooks.example.test": ["127.0.0.1"]})
    url = f"https://hooks.example.test:{receiver.port}/cb"
    assert not deliver(url, {}, timeout=5, allow=(), delivery_id="j.0", resolver=dns)
    assert receiver.calls == []


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.status = 307
    receiver.headers["Location"] = f"http://127.0.0.1:{receiver.port}/elsewhere"
    url = f"http://127.0.0.1:{receiver.port}/cb"
    assert not deliver(url, {}, timeout=5, allow=("127.0.0.1",), delivery_id="j.0")
    assert [c["path"] for c in receiver.calls] == ["/cb"]


def allow(api: Any, *hosts: str) -> None:
    config = api.application.config
    config["FHIRQ"] = replace(config["FHIRQ"], callback_allow=hosts)


def test_submit_refuses_internal_callbacks_alike(api: Any, receiver: Receiver) -> None:
    """400 naming the header; an open and a closed internal port get the same answer, so the
    API cannot be used to map the network."""
    allow(api)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    answers = []
    for port in (receiver.port, closed):
        r = submit(api, patients_batch(1), **{"X-Callback-Url": f"https://127.0.0.1:{port}/x"})
        assert r.status_code == 400, r.json
        assert r.json["resourceType"] == "OperationOutcome"
        assert r.json["issue"][0]["expression"] == ["X-Callback-Url"]
        answers.append(r.json["issue"][0]["diagnostics"])
    assert answers[0] == answers[1]
    for url in ("http://8.8.8.8/x", "https://u:p@8.8.8.8/x", "https://[::ffff:127.0.0.1]/x"):
        assert submit(api, patients_batch(1), **{"X-Callback-Url": url}).status_code == 400
    allow(api, "127.0.0.1")
    job_id_of(submit(api, patients_batch(1),
                     **{"X-Callback-Url": f"http://127.0.0.1:{receiver.port}/x"}))
    assert receiver.calls == []  # nothing is called at submit

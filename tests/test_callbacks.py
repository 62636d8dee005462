"""Callback URLs: https only, public addresses only unless allowed (FHIRQ_CALLBACK_ALLOW), no
userinfo, no redirects, the connection pinned to the checked address — against real HTTP
receivers on loopback. And delivery at least once: a delivery whose worker died is sent again
by the reaper, with the same `X-Fhirq-Delivery-Id`."""

from __future__ import annotations

import datetime
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, text

from core.jobs import reap_callbacks
from core.jobs.callback import CallbackRefused, check_callback_url, deliver
from tests.jobs_helpers import *  # noqa: F403 - fixtures
from tests.jobs_helpers import (
    WorkerProcess,
    job_id_of,
    patients_batch,
    scalar,
    submit,
    wait_for,
)

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
    server: Any = None

    def wrap(self, context: ssl.SSLContext) -> None:
        """Serve TLS from now on."""
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)


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
    rec.port, rec.server = server.server_address[1], server
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


def certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (its own CA) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.mark.parametrize("served_name", ["hooks.example.test", "other.example.test"])
def test_https_goes_to_the_checked_address_with_the_name_as_server_name(
    receiver: Receiver, tmp_path: Path, served_name: str
) -> None:
    """TLS to the pinned address: the name travels as SNI and the certificate must be the
    name's (a certificate for another name is refused, although the address is right)."""
    cert, key = certificate(tmp_path, served_name)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    seen: list[str | None] = []
    server_side.sni_callback = lambda sock, name, ctx: seen.append(name)
    receiver.wrap(server_side)
    trust = ssl.create_default_context(cafile=str(cert))
    dns = fake_dns({"hooks.example.test": ["127.0.0.1"]})
    sent = deliver(f"https://hooks.example.test:{receiver.port}/cb", {"id": "j"}, timeout=5,
                   allow=("127.0.0.1",), delivery_id="j.0", resolver=dns, verify=trust)
    assert seen == ["hooks.example.test"]
    if served_name == "hooks.example.test":
        assert sent
        assert receiver.calls[0]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"
    else:
        assert not sent and receiver.calls == []


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


def test_a_lost_delivery_is_sent_again_with_the_same_id(
    api: Any, session_worker: WorkerProcess, jobs_env: dict[str, str], clean_db: Engine
) -> None:
    """The worker dies while the receiver holds the first POST; the callback stays `sending`
    until the reaper of another worker sends it again, carrying the same delivery id."""
    if not session_worker.alive:
        session_worker.start()
    held, release = threading.Event(), threading.Event()
    calls: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            self.rfile.read(int(self.headers["Content-Length"]))
            calls.append(dict(self.headers))
            if len(calls) == 1:
                held.set()
                release.wait(60)  # the sender is killed meanwhile
                return
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    second = None
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/done"
        job_id = job_id_of(submit(api, patients_batch(3), **{"X-Callback-Url": url}))
        assert held.wait(30), session_worker.tail()
        session_worker.kill()
        state = f"SELECT callback_state FROM job WHERE id = '{job_id}'"
        assert scalar(clean_db, state) == "sending"
        # A short callback timeout: this worker's reaper presumes the delivery lost after
        # 4 × 1 + 5 + 5 s (one attempt's hard time limit) + FHIRQ_JOB_STALL_SECONDS (3 s).
        second = WorkerProcess({**jobs_env, "FHIRQ_CALLBACK_TIMEOUT": "1"}).start()
        wait_for(lambda: len(calls) >= 2, 60, "the callback to be sent again",
                 on_timeout=second.tail)
        wait_for(lambda: scalar(clean_db, state) == "sent", 10, "the callback to be sent")
        assert calls[0]["X-Fhirq-Delivery-Id"] == calls[1]["X-Fhirq-Delivery-Id"] == f"{job_id}.0"
        assert scalar(clean_db, f"SELECT callback_attempts FROM job WHERE id = '{job_id}'") == 2
        time.sleep(2)  # the reaper runs every second: nothing more is sent
        assert len(calls) == 2
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        if second is not None:
            second.stop()


def test_the_reaper_gives_up_after_the_last_attempt(api: Any, conn: Connection) -> None:
    job_ids = [job_id_of(submit(api, patients_batch(1), **{
        "X-Callback-Url": "http://127.0.0.1:9/x"})) for _ in range(3)]
    # (attempts made, claimed how long ago) of a callback stuck in `sending`
    for job_id, (attempts, ago) in zip(job_ids, [(3, "1h"), (1, "1h"), (1, "0s")], strict=True):
        conn.execute(text(
            "UPDATE job SET state = 'completed', finished_at = now() - interval '1h', "
            "callback_state = 'sending', callback_attempts = :attempts, "
            "callback_claimed_at = now() - CAST(:ago AS interval) WHERE id = :id"),
            {"id": job_id, "attempts": attempts, "ago": ago})
    sent = reap_callbacks(conn, stall_seconds=3, lost_after=60, attempts=3)
    assert [d.job_id for d in sent] == [job_ids[1]]
    states = dict(conn.execute(text("SELECT id, callback_state FROM job")).all())
    assert [states[j] for j in job_ids] == ["failed", "pending", "sending"]

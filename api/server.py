"""The API's gunicorn worker class: gthread, except that the main loop reads each HTTP/1 request
(head and body) before a thread takes it.

Plain gthread hands a connection to one of its few threads as soon as it is accepted, and the
thread blocks reading the request: a handful of clients sending one byte every few seconds tie
up every thread, and `/healthz` stops answering. Here the worker's selector, which already
watches idle keep-alive connections, buffers requests as they arrive, so a trickling client costs
a buffer, not a thread; a thread gets the request when it is whole. A request head must arrive
within `FHIRQ_HTTP_HEADER_TIMEOUT` seconds and a body may pause at most `FHIRQ_HTTP_BODY_TIMEOUT`
seconds, or the connection is dropped.

Bodies are buffered up to the synchronous byte limit (in memory up to 1 MiB, then in a temporary
file): every request the API answers synchronously is read whole before it runs. A larger body
(an async upload) is handed over after its head and streamed by the thread, which still gives
up after the body timeout without data. `Expect: 100-continue` is answered by the selector, so
those bodies are buffered too.
TLS and HTTP/2 (not used by fhirq's deployments) fall back to plain gthread.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import IO, Any

from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import TConn, ThreadWorker

__all__ = ["BufferingWorker", "RequestBuffer"]

READ_SIZE = 64 * 1024
IN_MEMORY = 1 << 20  # a buffered request beyond this many bytes goes to a temporary file
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
BODY_SLACK = 64 * 1024  # bodies a little over the sync limit are still buffered: the 413 reads them


@dataclass(frozen=True)
class Limits:
    head_bytes: int  # a head this long without its end goes to gunicorn's parser (431/400)
    body_bytes: int  # larger bodies are streamed by the thread instead of buffered
    header_timeout: float
    body_timeout: float


class _Chunks:
    """Finds the end of a chunked body as its bytes arrive (sizes, data, trailers)."""

    MAX_LINE = 4096

    def __init__(self) -> None:
        self.line = bytearray()
        self.skip = 0  # bytes of chunk data (and its CRLF) still to pass
        self.trailers = False
        self.done = False
        self.size = 0

    def feed(self, data: bytes) -> None:
        """Raises ValueError for framing gunicorn's parser should judge."""
        i = 0
        while i < len(data) and not self.done:
            if self.skip:
                n = min(self.skip, len(data) - i)
                self.skip -= n
                i += n
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > self.MAX_LINE:
                    raise ValueError("chunk line too long")
                return
            self.line += data[i:j]
            i = j + 1
            line = bytes(self.line).strip()
            self.line.clear()
            if self.trailers:
                self.done = not line
                continue
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                self.trailers = True
            else:
                self.skip = size + 2
                self.size += size


class RequestBuffer:
    """One HTTP/1 request arriving on a connection, kept until it is whole (or until it is
    clear that a thread should read the rest). `feed` says when to hand it over."""

    def __init__(self, limits: Limits, now: float) -> None:
        self.limits = limits
        self.spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=IN_MEMORY)  # noqa: SIM115 - outlives this call
        self.head = bytearray()
        self.head_done = False
        self.remaining = 0  # body bytes still expected, for a Content-Length body
        self.chunks: _Chunks | None = None
        self.deadline = now + limits.header_timeout
        # The head asked for `100 Continue` before the body, and the worker is to send it: the
        # expectation is taken out of the buffered head, so gunicorn does not answer it again.
        self.send_continue = False

    def feed(self, data: bytes, now: float) -> bool:
        self.spool.write(data)
        if not self.head_done:
            start = max(0, len(self.head) - 3)
            self.head += data
            end = self.head.find(b"\r\n\r\n", start)
            if end < 0:
                return len(self.head) > self.limits.head_bytes
            self.head_done = True
            head, data = bytes(self.head[:end]), bytes(self.head[end + 4 :])
            if self._framing(head):
                self.send_continue = False  # handed over as it is: gunicorn answers it
                return True
            if self.send_continue:
                self.spool.seek(0)
                self.spool.truncate()
                self.spool.write(_without_expect(head) + b"\r\n\r\n" + data)
            del self.head[:]
        self.deadline = now + self.limits.body_timeout
        if self.chunks is not None:
            try:
                self.chunks.feed(data)
            except ValueError:
                return True
            return self.chunks.done or self.chunks.size > self.limits.body_bytes
        self.remaining -= len(data)
        return self.remaining <= 0

    def _framing(self, head: bytes) -> bool:
        """Learn how the body is framed from the head; True: hand over now (no body, a body
        not worth buffering, or framing only gunicorn's parser should judge)."""
        lengths: list[bytes] = []
        codings: list[bytes] = []
        expects: list[bytes] = []
        request_line, *fields = head.split(b"\r\n")
        for line in fields:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                lengths.append(value.strip())
            elif name == b"transfer-encoding":
                codings.extend(c.strip().lower() for c in value.split(b","))
            elif name == b"expect":
                expects.append(value.strip().lower())
        if expects:
            # One `100-continue` on HTTP/1.1 is answered here, so that the body can be buffered
            # too; anything else is gunicorn's to judge (417, or ignored on HTTP/1.0).
            if expects != [b"100-continue"] or not request_line.endswith(b" HTTP/1.1"):
                return True
            self.send_continue = True
        if codings:
            if lengths or codings[-1] != b"chunked":
                return True
            self.chunks = _Chunks()
            return False
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            return True  # no body, or framing gunicorn refuses
        self.remaining = int(lengths[0])
        return self.remaining == 0 or self.remaining > self.limits.body_bytes

    def close(self) -> None:
        self.spool.close()


def _without_expect(head: bytes) -> bytes:
    return b"\r\n".join(
        line for line in head.split(b"\r\n")
        if line.partition(b":")[0].strip().lower() != b"expect"
    )


class _BufferedUnreader(SocketUnreader):
    """What a thread's request parser reads: the buffered bytes, then (for a body too large to
    buffer) the socket, waiting at most `idle` seconds for each piece."""

    def __init__(self, sock: Any, idle: float) -> None:
        super().__init__(sock)
        self.idle = idle
        self.spool: IO[bytes] | None = None

    def load(self, spool: IO[bytes]) -> None:
        self.release()
        spool.seek(0)
        self.spool = spool

    def chunk(self, size_hint: int | None = None) -> bytes:
        if self.spool is not None:
            data = self.spool.read(max(size_hint or 0, READ_SIZE))
            if data:
                return data
            self.release()
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ)
            if not sel.select(self.idle):
                raise TimeoutError(f"the client sent nothing for {self.idle:.0f} s")
        return super().chunk(size_hint)

    def leftover(self) -> bytes:
        """Bytes read past the request (a pipelined next one), taken out of this reader."""
        rest = self.take_buffered()
        if self.spool is not None:
            rest += self.spool.read()
            self.release()
        return rest

    def release(self) -> None:
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class BufferingWorker(ThreadWorker):
    """gthread whose selector reads requests; threads only run them."""

    def init_process(self) -> None:
        from core.config import get_settings

        cfg, settings = self.cfg, get_settings()
        head = (cfg.limit_request_line or 8190) + (cfg.limit_request_fields or 100) * (
            (cfg.limit_request_field_size or 8190) + 2
        )
        self.limits = Limits(
            head_bytes=head + 4,
            body_bytes=settings.sync_max_bytes + BODY_SLACK,
            header_timeout=settings.http_header_timeout,
            body_timeout=settings.http_body_timeout,
        )
        self.buffering = not cfg.is_ssl and getattr(cfg, "http2_cleartext", "off") == "off"
        self.incoming: dict[TConn, RequestBuffer] = {}
        super().init_process()

    # ---- liveness: gunicorn's loop calls notify() on every event it handles

    def notify(self) -> None:
        """Touch the heartbeat file at most once a second instead of once per event (a
        utime() system call each, a few per cent of a busy worker's time). The arbiter only
        acts when the file is older than the worker timeout (30 s by default)."""
        now = time.monotonic()
        if now - getattr(self, "_notified", -1.0) >= 1.0:
            self._notified = now
            super().notify()

    # ---- connections arriving or waking up: buffer them in the selector

    def accept(self, listener: Any) -> None:
        if not self.buffering:
            return super().accept(listener)
        try:
            sock, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        self._receive(TConn(self.cfg, sock, addr, listener.getsockname()), b"")
        return None

    def on_client_socket_readable(self, conn: TConn, client: Any) -> None:
        if not self.buffering:
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._receive(conn, b"")
        return None

    def _receive(self, conn: TConn, already: bytes) -> None:
        buffer = RequestBuffer(self.limits, time.monotonic())
        self.incoming[conn] = buffer
        if already and buffer.feed(already, time.monotonic()):
            self._hand_over(conn)
            return
        conn.sock.setblocking(False)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_data, conn))

    def _on_data(self, conn: TConn, _sock: Any) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        buffer = self.incoming[conn]
        whole = buffer.feed(data, time.monotonic())
        if buffer.send_continue and not whole:
            buffer.send_continue = False
            with contextlib.suppress(OSError):  # a client that cannot take it sends anyway
                conn.sock.send(CONTINUE)
        if whole:
            self.poller.unregister(conn.sock)
            self._hand_over(conn)

    def _hand_over(self, conn: TConn) -> None:
        buffer = self.incoming.pop(conn)
        conn.data_ready = True
        conn.init()  # plain HTTP/1: makes the parser, no I/O
        conn.sock.setblocking(True)
        if not isinstance(conn.parser.unreader, _BufferedUnreader):
            conn.parser.unreader = _BufferedUnreader(conn.sock, self.limits.body_timeout)
        conn.parser.unreader.load(buffer.spool)
        self.enqueue_req(conn)

    def _drop(self, conn: TConn) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.poller.unregister(conn.sock)
        self.incoming.pop(conn).close()
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        for conn, buffer in list(self.incoming.items()):
            # A stopping worker waits for requests being sent, not for heads that never come.
            if buffer.deadline <= now or (not self.alive and not buffer.head_done):
                self._drop(conn)

    # ---- a request done: a pipelined next one goes back to the selector too

    def finish_request(self, conn: TConn, fs: Future[Any]) -> None:
        unreader = getattr(conn.parser, "unreader", None)
        if isinstance(unreader, _BufferedUnreader):
            rest = unreader.leftover()
            keep = not fs.cancelled() and fs.exception() is None and fs.result() is True
            if rest and keep and self.alive:
                self._receive(conn, rest)
                return
        super().finish_request(conn, fs)

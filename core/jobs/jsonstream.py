"""A JSON text read as it arrives, one value at a time, in bounded memory: the top level of a
Bundle or an upsert array is walked here, and every entry comes out as its exact bytes.

orjson finds where each value ends: parsing a slice that starts at a value, it either returns it
(the slice holds the value and nothing else) or fails with "unexpected content after document"
at the position right after it. So each entry is parsed once, by orjson, and only the current
read buffer plus one entry are ever held. orjson counts positions in characters, not bytes; they
are turned into byte offsets by counting UTF-8 continuation bytes (nothing to do for ASCII).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson

from core.errors import BadRequest

__all__ = ["JsonStream"]

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_CONTINUATION = bytes(range(0x80, 0xC0))
_AFTER_VALUE = "unexpected content after document"
# Parse slices start at this size and grow with the values seen: a slice much larger than its
# value costs orjson's scan of the slice for each value.
_MIN_SLICE = 16 * 1024
# An error this close to the end of a cut slice may be the cut itself ("tr" of "true").
_CUT_MARGIN = 16
# orjson's answers to a cut slice that do not point at its end (a deeply nested one).
_CUT_ERRORS = ("unexpected end of data", "failed to allocate memory")


def _char_boundary(buf: bytes, start: int, end: int) -> int:
    """`end`, or the start of the UTF-8 sequence it would cut: orjson refuses half a
    character, even after the value it is asked for."""
    lead = end
    while lead > start and end - lead < 4 and buf[lead - 1] & 0xC0 == 0x80:
        lead -= 1
    if lead > start and buf[lead - 1] >= 0xC0:
        first = buf[lead - 1]
        length = 2 if first < 0xE0 else 3 if first < 0xF0 else 4
        if end - (lead - 1) < length:
            return lead - 1
    return end


class JsonStream:
    """Tokens and values of a JSON text arriving as `chunks` of bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._slice = _MIN_SLICE
        self.offset = 0  # bytes of the text before `_buf`, for error messages

    # ---- reading

    def _more(self) -> bool:
        if self._eof:
            return False
        chunk = next(self._chunks, b"")
        if not chunk:
            self._eof = True
            return False
        self.offset += self._pos
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    def peek(self) -> int | None:
        """The next byte that is not whitespace (left unread); None at the end of the text."""
        while True:
            self._pos = _WHITESPACE.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._more():
                return None

    def take(self, byte: bytes) -> bool:
        """Consume `byte` if it comes next (after whitespace)."""
        if self.peek() == byte[0]:
            self._pos += 1
            return True
        return False

    def expect(self, byte: bytes) -> None:
        if not self.take(byte):
            found = self.peek()
            what = "the end of the text" if found is None else repr(chr(found))
            raise self._invalid(f"expected '{byte.decode()}', found {what}", self._pos)

    def value(self) -> bytes:
        """The exact text of the next JSON value, which orjson has checked."""
        if self.peek() is None:
            raise self._invalid("unexpected end of data", self._pos)
        size = self._slice
        while True:
            start, end = self._pos, min(len(self._buf), self._pos + size)
            if end < len(self._buf) or not self._eof:
                end = _char_boundary(self._buf, start, end)
            cut = end < len(self._buf) or not self._eof
            try:
                orjson.loads(memoryview(self._buf)[start:end])
            except orjson.JSONDecodeError as exc:
                if exc.msg.startswith(_AFTER_VALUE):
                    return self._consume(self._bytes(exc.pos))
                if cut and (exc.msg.startswith(_CUT_ERRORS)
                            or self._bytes(exc.pos) >= end - start - _CUT_MARGIN):
                    size = self._grow(size, end - start)
                    continue
                raise self._invalid(exc.msg, start + self._bytes(exc.pos)) from None
            if cut:
                # The whole slice parsed: the value may go on past it (a number) or not; look.
                size = self._grow(size, end - start)
                continue
            return self._consume(end - start)

    def _grow(self, size: int, used: int) -> int:
        """A larger slice for the value being read, with the bytes to fill it read."""
        size = max(size, used) * 4
        while len(self._buf) - self._pos < size and self._more():
            pass
        return size

    def _consume(self, n: int) -> bytes:
        raw = self._buf[self._pos : self._pos + n]
        self._pos += n
        self._slice = max(_MIN_SLICE, 2 * n)
        return raw

    def _bytes(self, chars: int) -> int:
        """Bytes from the current position that hold `chars` characters."""
        n = chars
        while True:
            piece = self._buf[self._pos : self._pos + n]
            if piece.isascii():
                return n
            counted = len(piece.translate(None, _CONTINUATION))  # characters begun in it
            if counted >= chars or self._pos + n >= len(self._buf):
                break
            n += chars - counted
        while self._pos + n < len(self._buf) and self._buf[self._pos + n] & 0xC0 == 0x80:
            n += 1
        return n

    def _invalid(self, message: str, at: int) -> BadRequest:
        if "depth limit" in message or "recursion" in message:
            return BadRequest("The body is nested too deeply", code="structure")
        return BadRequest(
            f"The body is not valid JSON ({message} at byte {self.offset + at})",
            code="structure",
        )

    def end(self) -> None:
        """Nothing but whitespace may follow the top-level value."""
        if self.peek() is not None:
            raise self._invalid("unexpected content after the top-level value", self._pos)

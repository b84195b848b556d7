"""Newline framing of droid's stdout, each line bounded so that one huge line cannot exhaust memory."""

from __future__ import annotations

import anyio
import anyio.abc

from .protocol import ProtocolError


class LineTooLong(ProtocolError):
    pass


class LineReader:
    """Newline framing over a byte stream, each line at most ``max_bytes`` long."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, max_bytes: int) -> None:
        self._stream = stream
        self._max = max_bytes
        self._buffer = bytearray()
        self._skipping = False

    async def readline(self) -> bytes | None:
        """The next line without its newline; None at EOF. Raises LineTooLong once per long line."""
        while True:
            index = self._buffer.find(b"\n")
            if index >= 0:
                line = bytes(self._buffer[:index])
                del self._buffer[: index + 1]
                if self._skipping:
                    self._skipping = False
                    continue
                return line
            if len(self._buffer) > self._max:
                self._buffer.clear()
                if not self._skipping:
                    self._skipping = True
                    raise LineTooLong(f"a line longer than {self._max} bytes")
            try:
                chunk = await self._stream.receive(65536)
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                return None
            self._buffer.extend(chunk)

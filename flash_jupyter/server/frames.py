"""The binary wire, asyncio side (the control plane): parse frames as bytes arrive.

See ``flash_jupyter.protocol`` for the frame layout.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ..protocol import HEAD, LEN, MAX_META, decode_meta, encode


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio side of the framing, for the control plane.

    ``on_frame(meta, bufs)`` is called for each complete frame; ``on_close()`` once.
    Large buffers are received directly into their own preallocated bytearray.
    """

    SMALL = 1 << 18

    def __init__(
        self,
        on_frame: Callable[[dict[str, Any], list[bytearray]], None],
        on_close: Callable[[], None],
        on_open: Callable[[FrameProtocol], None] | None = None,
    ):
        self.on_frame = on_frame
        self.on_close = on_close
        self.on_open = on_open
        self.transport: asyncio.Transport | None = None
        self.hello_done = False
        # asyncio keeps a view of the buffer while calling buffer_updated, so the
        # bytearray is never resized: it is compacted in place or replaced.
        self._buf = bytearray(self.SMALL)
        self._start = 0  # first unparsed byte
        self._n = 0  # end of valid bytes
        self._big: bytearray | None = None  # current large buffer being filled
        self._big_n = 0
        self._pending: dict[str, Any] | None = None  # frame under construction
        self.closed = False

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.on_open:
            self.on_open(self)

    def _reserve(self, need: int) -> None:
        """Make room for `need` more bytes after the valid region."""
        used = self._n - self._start
        if len(self._buf) - self._n >= need:
            return
        if self._start and len(self._buf) - used >= need:
            self._buf[:used] = self._buf[self._start : self._n]
        else:
            nb = bytearray(max(self.SMALL, 2 * (used + need)))
            nb[:used] = self._buf[self._start : self._n]
            self._buf = nb
        self._start, self._n = 0, used

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_n :]
        self._reserve(4096)
        return memoryview(self._buf)[self._n :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._big is not None:
            self._big_n += nbytes
            if self._big_n < len(self._big):
                return
            self._finish_big()
        else:
            self._n += nbytes
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.on_close()

    def eof_received(self) -> bool:
        return False

    # -- parsing
    def _finish_big(self) -> None:
        assert self._pending is not None and self._big is not None
        self._pending["bufs"].append(self._big)
        self._big = None
        self._big_n = 0
        self._maybe_emit()

    def _maybe_emit(self) -> None:
        p = self._pending
        if p is not None and len(p["bufs"]) == len(p["lens"]):
            self._pending = None
            self.on_frame(p["meta"], p["bufs"])

    def _parse(self) -> None:
        pos = self._start
        try:
            while not self.closed:
                buf = self._buf
                p = self._pending
                avail = self._n - pos
                if p is not None:
                    # Collecting the buffers of a frame whose header is parsed.
                    need = p["lens"][len(p["bufs"])]
                    if avail >= need:
                        p["bufs"].append(bytearray(buf[pos : pos + need]))
                        pos += need
                        self._maybe_emit()
                        continue
                    if need > self.SMALL:
                        big = bytearray(need)
                        big[:avail] = buf[pos : self._n]
                        pos = self._n
                        self._big, self._big_n = big, avail
                    return
                if avail < HEAD.size:
                    return
                mlen, nb = HEAD.unpack_from(buf, pos)
                if mlen > MAX_META:
                    raise ValueError("frame metadata too large")
                hlen = HEAD.size + 8 * nb
                if avail < hlen + mlen:
                    self._start = pos
                    self._reserve(hlen + mlen - avail)
                    pos = self._start
                    return
                lens = [LEN.unpack_from(buf, pos + HEAD.size + 8 * i)[0] for i in range(nb)]
                meta = decode_meta(
                    bytes(buf[pos + hlen : pos + hlen + mlen]), hello=not self.hello_done
                )
                self.hello_done = True
                pos += hlen + mlen
                self._pending = {"meta": meta, "lens": lens, "bufs": []}
                self._maybe_emit()
        except Exception:
            self.closed = True
            self.abort()
            self.on_close()
        finally:
            self._start = pos
            if self._start == self._n:
                self._start = self._n = 0

    # -- sending
    def send(self, meta: dict[str, Any], bufs: list[Any] = ()) -> None:
        if self.closed or self.transport is None:
            return
        parts = encode(meta, bufs)
        if len(parts) == 2:
            self.transport.write(parts[0] + parts[1])
        else:
            self.transport.writelines(parts)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

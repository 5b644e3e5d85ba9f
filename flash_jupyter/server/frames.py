"""The binary wire, asyncio side (the control plane): parse frames as bytes arrive.

See ``flash_jupyter.protocol`` for the frame layout. Until its hello is accepted, a
connection is read in a small buffer, one frame at most: a header declaring more than
``HELLO_MAX`` bytes or any buffer closes it, so does silence for ``HELLO_TIMEOUT`` seconds,
and after a refused hello every byte is discarded unparsed. After the hello, a frame is
bounded by ``MAX_FRAME`` bytes, and what a connection buffered is dropped when it closes.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from .. import envvars
from ..protocol import HEAD, HELLO_MAX, LEN, MAX_BUFS, MAX_META, decode_meta, encode

HELLO_TIMEOUT: float = envvars.get("FLASH_JUPYTER_HELLO_TIMEOUT")  # read once, at start
MAX_FRAME: int = envvars.get("FLASH_JUPYTER_MAX_FRAME_BYTES")


class FrameTooLarge(ValueError):
    pass


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio side of the framing, for the control plane.

    ``on_frame(meta, bufs)`` is called for each complete frame; ``on_close()`` once.
    The first frame goes to ``on_frame`` too, and the connection stays open only if the
    callback calls ``accept()``. Large buffers are received directly into their own
    preallocated bytearray.
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
        self.hello_done = False  # the first frame was parsed
        self.accepted = False  # ... and its token verified
        self._hello_timer: asyncio.TimerHandle | None = None
        # asyncio keeps a view of the buffer while calling buffer_updated, so the
        # bytearray is never resized: it is compacted in place or replaced. It holds no
        # more than a hello until the hello is accepted.
        self._buf = bytearray(HELLO_MAX)
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
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(HELLO_TIMEOUT, self._hello_late)
        if self.on_open:
            self.on_open(self)

    def _hello_late(self) -> None:
        if not self.accepted:
            self._fail()

    def accept(self) -> None:
        """The hello is good: read what follows."""
        self.accepted = True
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None

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
        if self.closed:  # bytes after a refusal: read and dropped
            self._start = self._n = 0
            return memoryview(self._buf)
        if not self.accepted:
            # Never grow before the hello (it fits: its header said so, or it is refused).
            return memoryview(self._buf)[self._n :]
        self._reserve(4096)
        return memoryview(self._buf)[self._n :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return
        if self._big is not None:
            self._big_n += nbytes
            if self._big_n < len(self._big):
                return
            self._finish_big()
        else:
            self._n += nbytes
        self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        if not self.closed:
            self.closed = True
            self.on_close()

    def _release(self) -> None:
        """Let go of everything this connection buffered (it may have been large)."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._buf = bytearray(64)
        self._start = self._n = 0
        self._big = None
        self._pending = None

    def _fail(self, message: str | None = None) -> None:
        """Stop reading this connection for good (optionally telling the peer why)."""
        if self.closed:
            return
        if message and self.transport is not None:
            self.transport.write(b"".join(encode({"op": "error", "message": message})))
        self.closed = True
        if self.transport is not None:
            if message:
                self.transport.close()  # flushes the error frame first
            else:
                self.transport.abort()
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
                if self.hello_done and not self.accepted:
                    # A hello was refused (or is being decided): nothing after it is read.
                    pos = self._n
                    return
                if avail < HEAD.size:
                    return
                mlen, nb = HEAD.unpack_from(buf, pos)
                hlen = HEAD.size + 8 * nb
                if not self.hello_done:
                    if nb or hlen + mlen > HELLO_MAX:
                        raise FrameTooLarge("the first frame must be a hello of a few KiB")
                elif mlen > MAX_META or nb > MAX_BUFS:
                    raise FrameTooLarge(
                        f"frame too large: {mlen} bytes of metadata, {nb} buffers "
                        f"(at most {MAX_META} and {MAX_BUFS})"
                    )
                if avail < hlen:
                    self._start = pos
                    self._reserve(hlen - avail)
                    pos = self._start
                    return
                lens = [LEN.unpack_from(buf, pos + HEAD.size + 8 * i)[0] for i in range(nb)]
                if mlen + sum(lens) > MAX_FRAME:
                    raise FrameTooLarge(
                        f"frame too large: {mlen + sum(lens)} bytes (at most {MAX_FRAME}, "
                        f"FLASH_JUPYTER_MAX_FRAME_BYTES)"
                    )
                if avail < hlen + mlen:
                    self._start = pos
                    self._reserve(hlen + mlen - avail)
                    pos = self._start
                    return
                meta = decode_meta(
                    bytes(buf[pos + hlen : pos + hlen + mlen]), hello=not self.hello_done
                )
                self.hello_done = True
                pos += hlen + mlen
                self._pending = {"meta": meta, "lens": lens, "bufs": []}
                self._maybe_emit()
        except FrameTooLarge as e:
            self._fail(str(e) if self.accepted else None)
        except Exception:
            self._fail()
        finally:
            if self.closed:
                self._release()
            else:
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

    def refuse(self) -> None:
        """The hello was refused: send nothing more, read nothing more, close."""
        self.closed = True
        self._release()
        if self.transport is not None:
            self.transport.close()

"""Framing of the binary wire between clients, the control plane and workers.

One frame = a fixed header, a small metadata dict and zero or more raw buffers::

    <u32 meta_len> <u32 nbufs> <u64 len> * nbufs   meta   buf0 buf1 ...

The first frame on a connection (hello) has JSON metadata, so nothing is unpickled before
the token is checked; later frames use pickle for metadata (plain dicts, lists, str, bytes,
numbers; never user objects: user payloads travel as raw buffers, opaque to the server).
Buffers go out with ``sendmsg`` (scatter/gather) and come in with ``recv_into``
preallocated storage, so a 100 MB array is copied once by the kernel and never by Python.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

HEAD = struct.Struct("<II")
LEN = struct.Struct("<Q")
MAX_META = 64 << 20
IOV_MAX = 512


def encode(meta: dict[str, Any], bufs: list[Any] = (), *, hello: bool = False) -> list[Any]:
    """The parts of one frame, ready for ``sendmsg``."""
    m = json.dumps(meta).encode() if hello else pickle.dumps(meta, protocol=5)
    head = HEAD.pack(len(m), len(bufs))
    if bufs:
        head += b"".join(LEN.pack(memoryview(b).nbytes) for b in bufs)
    return [head, m, *bufs]


def decode_meta(m: bytes | memoryview, hello: bool = False) -> dict[str, Any]:
    return json.loads(bytes(m)) if hello else pickle.loads(m)


def sendmsg_all(sock: socket.socket, parts: list[Any]) -> None:
    """Send every part, coping with partial writes."""
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        n = sock.sendmsg(views[:IOV_MAX])
        while n:
            v = views[0]
            if n >= v.nbytes:
                n -= v.nbytes
                views.pop(0)
            else:
                views[0] = v[n:]
                n = 0


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("connection closed")
        got += k
    return buf


class SyncConnection:
    """A blocking frame connection (used by the client and by workers)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send_lock = threading.Lock()
        self._rbuf = bytearray()

    @classmethod
    def open(cls, host: str, port: int, timeout: float = 10.0) -> SyncConnection:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def send(self, meta: dict[str, Any], bufs: list[Any] = (), *, hello: bool = False) -> None:
        parts = encode(meta, bufs, hello=hello)
        with self._send_lock:
            sendmsg_all(self.sock, parts)

    def _fill(self, n: int) -> None:
        while len(self._rbuf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("connection closed")
            self._rbuf += chunk

    def _take(self, n: int) -> bytearray:
        if len(self._rbuf) >= n:
            out = self._rbuf[:n]
            del self._rbuf[:n]
            return out
        # Large: move what is buffered, then read the rest straight into place.
        out = bytearray(n)
        have = len(self._rbuf)
        out[:have] = self._rbuf
        self._rbuf.clear()
        view = memoryview(out)
        while have < n:
            k = self.sock.recv_into(view[have:])
            if not k:
                raise ConnectionError("connection closed")
            have += k
        return out

    def recv(self, *, hello: bool = False) -> tuple[dict[str, Any], list[bytearray]]:
        self._fill(HEAD.size)
        mlen, nb = HEAD.unpack_from(self._rbuf)
        if mlen > MAX_META:
            raise ConnectionError("frame too large")
        del self._rbuf[: HEAD.size]
        lens = []
        if nb:
            raw = self._take(8 * nb)
            lens = [LEN.unpack_from(raw, 8 * i)[0] for i in range(nb)]
        meta = decode_meta(self._take(mlen), hello)
        bufs = [self._take(n) for n in lens]
        return meta, bufs

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True

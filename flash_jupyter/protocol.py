"""Framing of the binary wire between clients, the control plane and workers.

One frame = a fixed header, a small metadata dict and zero or more raw buffers::

    <u32 meta_len> <u32 nbufs> <u64 len> * nbufs   meta   buf0 buf1 ...

The first frame on a connection (hello) is small (``HELLO_MAX``), has no buffers and JSON
metadata, and nothing after it is read before the token is checked. Later frames use pickle
for metadata, loaded by an unpickler that refuses every global: plain dicts, lists, tuples,
str, bytes and numbers only, so no metadata can make the reader call anything. User payloads
travel as raw buffers, opaque to the control plane.
Buffers go out with ``sendmsg`` (scatter/gather) and come in with ``recv_into``
preallocated storage, so a 100 MB array is copied once by the kernel and never by Python.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import threading
from typing import Any

HEAD = struct.Struct("<II")
LEN = struct.Struct("<Q")
MAX_META = 64 << 20
MAX_BUFS = 1 << 16  # buffers in one frame
HELLO_MAX = 8 << 10  # the whole hello frame, header included
IOV_MAX = 512
DEEP_CHECK = 512  # metadata shorter than this cannot nest deep enough to matter
MAX_DEPTH = 100


def encode(meta: dict[str, Any], bufs: list[Any] = (), *, hello: bool = False) -> list[Any]:
    """The parts of one frame, ready for ``sendmsg``."""
    m = json.dumps(meta).encode() if hello else pickle.dumps(meta, protocol=5)
    head = HEAD.pack(len(m), len(bufs))
    if bufs:
        head += b"".join(LEN.pack(memoryview(b).nbytes) for b in bufs)
    return [head, m, *bufs]


class _PlainUnpickler(pickle.Unpickler):
    """Loads plain data only: every opcode that could name a callable goes through
    ``find_class`` (or ``persistent_load``), and both refuse."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"frame metadata must be plain data, not {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("frame metadata must be plain data")


_NESTED = (dict, list, tuple, set, frozenset)  # all the containers the plain unpickler makes


def decode_meta(m: bytes | memoryview, hello: bool = False) -> dict[str, Any]:
    """A frame's metadata: JSON for the hello, plain-data pickle after it.

    Raises ValueError (or UnpicklingError) for anything else, and for data nested deeper
    than ``MAX_DEPTH`` (it would break whoever later walks it recursively, e.g. JSON).
    """
    if hello:
        meta = json.loads(bytes(m))
    else:
        meta = _PlainUnpickler(io.BytesIO(m)).load()
        if len(m) > DEEP_CHECK:
            check_depth(meta, MAX_DEPTH)
    if not isinstance(meta, dict):
        raise ValueError("frame metadata must be a dict")
    return meta


def check_depth(obj: Any, limit: int) -> None:
    """Raise ValueError if containers nest deeper than ``limit`` (level by level: no
    recursion, and no per-item bookkeeping beyond a list of the next level's containers)."""
    level = [obj]
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise ValueError(f"frame metadata nests deeper than {limit} levels")
        deeper: list[Any] = []
        for o in level:
            deeper += [x for x in (o.values() if type(o) is dict else o) if type(x) in _NESTED]
        level = deeper


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


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True

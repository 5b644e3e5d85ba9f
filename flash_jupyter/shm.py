"""Large buffers through shared-memory files instead of the socket.

When the caller, the control plane and the worker share a machine (same boot id, the
spool folder is reachable), an out-of-band buffer of ``SHM_MIN`` bytes or more is written
once into a file under the spool (tmpfs: /dev/shm) and the reader maps it copy-on-write:
one memcpy end to end, where a socket costs three. The control plane only passes the path.
"""

from __future__ import annotations

import mmap
import os
import uuid
from typing import Any

SHM_MIN = 1 << 20


def blobs_for(data: bytes, buffers: list[memoryview], spool: str | None) -> list[Any]:
    """The pickle stream and its buffers as wire blobs: inline, or ("shm", path, n)."""
    out: list[Any] = [data]
    for b in buffers:
        n = b.nbytes
        if spool and n >= SHM_MIN:
            path = os.path.join(spool, uuid.uuid4().hex)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = b.cast("B") if b.format != "B" or b.ndim != 1 else b
                done = 0
                while done < n:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            out.append(("shm", path, n))
        else:
            out.append(b)
    return out


def open_blob(ref: Any, frame_bufs: list[Any], unlink: bool = False) -> Any:
    """A readable buffer for one blob reference (an index into the frame, or a shm file)."""
    if isinstance(ref, int):
        return frame_bufs[ref]
    _, path, n = ref
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, n, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if unlink:
        try:
            os.unlink(path)
        except OSError:
            pass
    return mm


def discard(blobs: list[Any]) -> None:
    """Remove shm files of blobs that will never be read."""
    for b in blobs:
        if isinstance(b, tuple) and b and b[0] == "shm":
            try:
                os.unlink(b[1])
            except OSError:
                pass

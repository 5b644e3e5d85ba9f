"""Large buffers through shared-memory files instead of the socket.

When the caller, the control plane and the worker share a machine (same boot id, the
spool folder is reachable), an out-of-band buffer of ``SHM_MIN`` bytes or more is written
once into a file under the spool (tmpfs: /dev/shm) and the reader maps it copy-on-write:
one memcpy end to end, where a socket costs three. The control plane only passes paths.

Most of the cost of writing a fresh tmpfs file is the kernel allocating and clearing its
pages, not the copy. So each writer (a client, a worker) keeps its files in its own folder
of the spool and rewrites a file once its reader has let go of it: the reader maps files
with a finalizer that sends "release" back through the control plane when the last view
of the data is gone. A file whose release never comes (a reader that crashed, a result
kept forever) is only ever unlinked, never rewritten: unlinking leaves existing mappings
intact, so no reader ever sees its data change.
"""

from __future__ import annotations

import mmap
import os
import shutil
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

SHM_MIN = 1 << 20
KEEP_FREE_BYTES = 1 << 30  # recycled files kept ready per writer
MAX_LENT = 256  # files out on loan before the oldest is given up (unlinked)
SHM = "shm"  # the kind of every SpoolRef


class SpoolRef(NamedTuple):
    """A buffer written to a spool file: ``size`` bytes at the start of ``path``.

    Frame metadata may only hold plain data (the wire's unpickler refuses every class), so
    a reference travels as the plain list ``["shm", path, size]`` (``to_refs``) and is
    rebuilt with ``from_wire`` on arrival.
    """

    kind: str
    path: str
    size: int

    @classmethod
    def from_wire(cls, ref: Any) -> SpoolRef:
        """The reference a frame carried as a plain sequence; ValueError if it is not one."""
        if not (isinstance(ref, (list, tuple)) and len(ref) == 3 and ref[0] == SHM):
            raise ValueError("a blob reference is neither a buffer index nor a spool file")
        _, path, size = ref
        if not isinstance(path, str) or type(size) is not int or size < 0:
            raise ValueError("a spool file reference needs a path and a size")
        return cls(SHM, path, size)


class Spool:
    """One writer's folder in the spool, with files recycled after their release."""

    def __init__(self, root: str, writer: str):
        self.root = root
        self.writer = writer
        self.dir = os.path.join(root, writer)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._free: list[tuple[int, str]] = []  # (size, path), ready to rewrite
        self._lent: OrderedDict[str, int] = OrderedDict()  # path -> size, oldest first
        self._seq = 0

    def _take(self, n: int) -> tuple[str, int]:
        with self._lock:
            best = None
            for i, (size, _) in enumerate(self._free):
                if n <= size <= 2 * n and (best is None or size < self._free[best][0]):
                    best = i
            if best is not None:
                size, path = self._free.pop(best)
                return path, size
            self._seq += 1
            return os.path.join(self.dir, f"{os.getpid()}-{self._seq}"), 0

    def write(self, buf: memoryview) -> SpoolRef:
        n = buf.nbytes
        path, size = self._take(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = buf.cast("B") if (buf.format != "B" or buf.ndim != 1) else buf
            done = 0
            while done < n:
                done += os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)
        with self._lock:
            self._lent[path] = max(size, n)
            while len(self._lent) > MAX_LENT:
                old, _ = self._lent.popitem(last=False)
                _unlink(old)
        return SpoolRef(SHM, path, n)

    def release(self, paths: list[str]) -> None:
        """Readers are done with these files: keep them for rewriting (up to a budget)."""
        with self._lock:
            for p in paths:
                size = self._lent.pop(p, None)
                if size is None:
                    continue
                self._free.append((size, p))
            total = sum(s for s, _ in self._free)
            self._free.sort()
            while total > KEEP_FREE_BYTES and self._free:
                size, p = self._free.pop()  # drop the largest first
                total -= size
                _unlink(p)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Releaser:
    """Sends "release" for mapped files once their last view is gone.

    Finalizers may run anywhere (inside a garbage collection, in the middle of a send), so
    they only enqueue; a small thread does the sending.
    """

    def __init__(self, send: Callable[[list[str]], None]):
        import queue

        self._send = send
        self._q: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="flash-release", daemon=True).start()

    def watch(self, mm: mmap.mmap, path: str) -> None:
        weakref.finalize(mm, self._q.put, path)

    def close(self) -> None:
        self._q.put(None)

    def _run(self) -> None:
        import queue

        while True:
            first = self._q.get()
            if first is None:
                return
            paths = [first]
            try:
                while len(paths) < 256:
                    p = self._q.get_nowait()
                    if p is None:
                        self._q.put(None)
                        break
                    paths.append(p)
            except queue.Empty:
                pass
            try:
                self._send(paths)
            except Exception:  # a lost release only costs a page allocation
                pass


def blobs_for(data: bytes, buffers: list[memoryview], spool: Spool | None) -> list[Any]:
    """The pickle stream and its buffers as wire blobs: inline, or a SpoolRef."""
    out: list[Any] = [data]
    for b in buffers:
        if spool is not None and b.nbytes >= SHM_MIN:
            out.append(spool.write(b))
        else:
            out.append(b)
    return out


def open_blob(ref: Any, frame_bufs: list[Any], releaser: Releaser | None = None) -> Any:
    """A readable buffer for one blob reference from a frame (an index into the frame, or a
    spool file as a plain ``["shm", path, size]``)."""
    if isinstance(ref, int):
        return frame_bufs[ref]
    f = SpoolRef.from_wire(ref)
    fd = os.open(f.path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, f.size, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    if releaser is not None:
        releaser.watch(mm, f.path)
    return mm


def to_refs(blobs: list[Any], bufs: list[Any]) -> list[Any]:
    """Describe blobs for a frame: an index into the frame's buffers (appending the blob to
    ``bufs``), or a spool file as the plain list ["shm", path, size] (frame metadata holds
    no classes)."""
    refs: list[Any] = []
    for b in blobs:
        if isinstance(b, SpoolRef):
            refs.append(list(b))
        else:
            refs.append(len(bufs))
            bufs.append(b)
    return refs


def from_refs(refs: list[Any], bufs: list[Any]) -> list[Any]:
    """The inverse of to_refs, without mapping anything (the control plane's view): frame
    buffers, and SpoolRefs rebuilt from their plain form."""
    return [bufs[r] if isinstance(r, int) else SpoolRef.from_wire(r) for r in refs]


def spool_refs(blobs: Iterable[Any]) -> list[SpoolRef]:
    """The spool files among blobs."""
    return [b for b in blobs if isinstance(b, SpoolRef)]


def stored_blobs(blobs: list[Any]) -> list[Any]:
    """Blobs as a store kept them: SpoolRefs, or plain tuples from before there was a
    SpoolRef, rebuilt (inline buffers are bytes, never tuples)."""
    return [SpoolRef.from_wire(b) if isinstance(b, tuple) else b for b in blobs]


def writer_of(path: str) -> str:
    """The writer folder a spool file belongs to."""
    return os.path.basename(os.path.dirname(path))


def discard(blobs: Iterable[Any]) -> None:
    """Remove the spool files of blobs that will never be read."""
    for b in blobs:
        if isinstance(b, SpoolRef):
            _unlink(b.path)


def remove(paths: Iterable[str]) -> None:
    """Remove spool files by path."""
    for p in paths:
        _unlink(p)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

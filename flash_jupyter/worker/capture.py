"""Stream a job's stdout and stderr to its caller while it runs.

``sys.stdout``/``sys.stderr`` are replaced by writers that know which job the current
thread (or asyncio task) runs. Complete lines (and carriage-return progress updates) leave at
once; a partial line leaves on ``flush()``, when the job ends, or after ``LINGER`` seconds.
"""

from __future__ import annotations

import contextvars
import io
import os
import sys
import threading
from collections.abc import Callable

LINGER = 0.05

# The job the running code belongs to: per thread, and inherited by the asyncio tasks a job
# starts on another thread's loop (a Runpod worker's async handlers share one loop).
_JOB: contextvars.ContextVar[str | None] = contextvars.ContextVar("flash_jupyter_job", default=None)


class _JobStream(io.TextIOBase):
    def __init__(self, owner: OutputCapture, name: str, fallback: io.TextIOBase):
        self.owner = owner
        self.name = name
        self.fallback = fallback
        self.buffers: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        # Writes to the descriptor itself are captured too (see capture_fds).
        return self.fallback.fileno()

    def write(self, s: str) -> int:
        jid = self.owner.job_id()
        if jid is None:
            return self.fallback.write(s)
        with self.lock:
            buf = self.buffers.get(jid, "") + s
            cut = max(buf.rfind("\n"), buf.rfind("\r"))
            if cut >= 0:
                out, buf = buf[: cut + 1], buf[cut + 1 :]
            else:
                out = ""
            self.buffers[jid] = buf
        if out:
            self.owner.send(jid, self.name, out)
        if buf:
            self.owner.schedule_flush()
        return len(s)

    def flush(self, jid: str | None = None) -> None:
        jids = [jid] if jid else list(self.buffers)
        for j in jids:
            with self.lock:
                buf = self.buffers.pop(j, "")
            if buf:
                self.owner.send(j, self.name, buf)


class OutputCapture:
    def __init__(self, send: Callable[[str, str, str], None]):
        self.send = send
        self.stdout: _JobStream | None = None
        self.stderr: _JobStream | None = None
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()

    def install(self) -> None:
        self.stdout = _JobStream(self, "stdout", sys.stdout)
        self.stderr = _JobStream(self, "stderr", sys.stderr)
        sys.stdout, sys.stderr = self.stdout, self.stderr  # type: ignore[assignment]

    def job_id(self) -> str | None:
        return _JOB.get()

    def begin(self, job_id: str) -> None:
        _JOB.set(job_id)

    def end(self) -> None:
        jid = self.job_id()
        if jid is not None:
            for s in (self.stdout, self.stderr):
                if s is not None:
                    s.flush(jid)
        _JOB.set(None)

    def schedule_flush(self) -> None:
        with self._timer_lock:
            if self._timer is None:
                self._timer = threading.Timer(LINGER, self._linger)
                self._timer.daemon = True
                self._timer.start()

    def _linger(self) -> None:
        with self._timer_lock:
            self._timer = None
        self.flush_all()

    def flush_all(self) -> None:
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.flush()


class FdCapture:
    """Also stream what bypasses ``sys.stdout``: C extensions, subprocesses (fd 1 and 2).

    Each descriptor is replaced by a pipe. A thread forwards what arrives to the job
    running now; when a job ends, ``drain`` takes what is still in the pipes for it, so
    nothing written before the end reaches the caller after the result. Output with no
    job running goes where the descriptor pointed before.
    """

    def __init__(self, send: Callable[[str, str, str], None], job_id: Callable[[], str | None]):
        self.send = send
        self.job_id = job_id
        self.lock = threading.Lock()
        self.pipes: list[tuple[int, int, str]] = []  # (read end, original fd, stream)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            try:
                original = os.dup(fd)
                r, w = os.pipe()
                os.set_blocking(r, False)
                os.dup2(w, fd)
                os.close(w)
            except OSError:
                continue
            self.pipes.append((r, original, name))
        if self.pipes:
            threading.Thread(target=self._run, daemon=True, name="capture-fds").start()

    def _forward(self, jid: str | None, original: int, name: str, data: bytes) -> None:
        if jid is None:
            try:
                os.write(original, data)
            except OSError:
                pass
        else:
            self.send(jid, name, data.decode("utf-8", "replace"))

    def _read_all(self, jid: str | None) -> bool:
        alive = False
        for r, original, name in self.pipes:
            while True:
                try:
                    data = os.read(r, 65536)
                except BlockingIOError:
                    alive = True
                    break
                except OSError:
                    break
                if not data:
                    break
                self._forward(jid, original, name, data)
        return alive

    def _run(self) -> None:
        import select

        fds = [r for r, _, _ in self.pipes]
        while True:
            try:
                select.select(fds, [], [])
            except OSError:
                return
            with self.lock:
                if not self._read_all(self.job_id()):
                    return

    def drain(self, jid: str) -> None:
        with self.lock:
            self._read_all(jid)

"""Stream a job's stdout and stderr to its caller while it runs.

``sys.stdout``/``sys.stderr`` are replaced by writers that know which job the current
thread runs. Complete lines (and carriage-return progress updates) leave at once; a partial
line leaves on ``flush()``, when the job ends, or after ``LINGER`` seconds.
"""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Callable

LINGER = 0.05


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
        self.local = threading.local()
        self.stdout: _JobStream | None = None
        self.stderr: _JobStream | None = None
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()

    def install(self) -> None:
        self.stdout = _JobStream(self, "stdout", sys.stdout)
        self.stderr = _JobStream(self, "stderr", sys.stderr)
        sys.stdout, sys.stderr = self.stdout, self.stderr  # type: ignore[assignment]

    def job_id(self) -> str | None:
        return getattr(self.local, "job", None)

    def begin(self, job_id: str) -> None:
        self.local.job = job_id

    def end(self) -> None:
        jid = self.job_id()
        if jid is not None:
            for s in (self.stdout, self.stderr):
                if s is not None:
                    s.flush(jid)
        self.local.job = None

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

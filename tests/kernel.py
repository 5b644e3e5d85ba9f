"""A real ipykernel driven by jupyter_client, the way a notebook front end drives it.

A reader thread takes every iopub message off the wire as it comes and stamps it with
``time.monotonic()``, so tests can check when output arrived (streaming, not at the end),
and which execution each message belongs to (its parent ``msg_id``).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from queue import Empty
from typing import Any

from jupyter_client.manager import KernelManager

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
OUTPUT = {"stream", "display_data", "update_display_data", "clear_output", "execute_result",
          "error"}  # fmt: skip


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass
class Msg:
    t: float  # time.monotonic() when it came off the wire
    type: str
    content: dict[str, Any]
    parent: str  # the msg_id of the request it answers

    @property
    def text(self) -> str:
        return self.content.get("text", "")


@dataclass
class Result:
    msg_id: str
    sent: float
    msgs: list[Msg] = field(default_factory=list)  # outputs only (see OUTPUT)
    idle: float = 0.0  # when the kernel said it was done with this request
    reply: dict[str, Any] | None = None

    @property
    def stdout(self) -> str:
        return "".join(
            m.text for m in self.msgs if m.type == "stream" and m.content["name"] == "stdout"
        )

    @property
    def stderr(self) -> str:
        return "".join(
            m.text for m in self.msgs if m.type == "stream" and m.content["name"] == "stderr"
        )

    @property
    def streams(self) -> list[Msg]:
        return [m for m in self.msgs if m.type == "stream"]

    @property
    def error(self) -> dict[str, Any] | None:
        errs = [m.content for m in self.msgs if m.type == "error"]
        return errs[0] if errs else None

    @property
    def traceback(self) -> str:
        e = self.error
        return strip_ansi("\n".join(e["traceback"])) if e else ""

    @property
    def value(self) -> dict[str, Any] | None:
        """The execute_result's mime bundle."""
        rs = [m.content["data"] for m in self.msgs if m.type == "execute_result"]
        return rs[0] if rs else None

    @property
    def pager(self) -> str:
        """What the kernel sent to the pager (``thing?`` help), as text."""
        pages = [p for p in (self.reply or {}).get("payload", []) if p.get("source") == "page"]
        return "".join(strip_ansi(p["data"].get("text/plain", "")) for p in pages)

    @property
    def displays(self) -> list[Msg]:
        return [m for m in self.msgs if m.type == "display_data"]

    def ok(self) -> Result:
        """Assert the cell raised nothing; return self for chaining."""
        assert self.error is None, f"cell failed:\n{self.traceback}\nstdout: {self.stdout}"
        return self

    def __repr__(self) -> str:
        return f"<Result {self.msg_id[:8]} out={self.stdout!r} err={self.error}>"


class Kernel:
    """One ipykernel running ``sys.executable`` with the given environment."""

    def __init__(self, env: dict[str, str], cwd: str | None = None, timeout: float = 60):
        self.km = KernelManager(kernel_name="python3")
        # The spec says "python"; jupyter_client then runs sys.executable, but say so.
        self.km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher",
                                    "-f", "{connection_file}"]  # fmt: skip
        self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self._lock = threading.Condition()
        self.msgs: list[Msg] = []
        self._idle: dict[str, float] = {}
        self._replies: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        try:
            self.kc.wait_for_ready(timeout=timeout)
        except Exception:
            self.shutdown()
            raise
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # A cell that hangs is diagnosed by every thread's stack (SIGUSR1, see wait).
        self.kc.execute("import faulthandler as _f, signal as _s; "
                        "_f.register(_s.SIGUSR1, all_threads=True)",
                        silent=True, store_history=False)  # fmt: skip

    # -- iopub, read all the time
    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except Empty:
                continue
            except Exception:  # channels closing at shutdown
                if self._stop.is_set():
                    return
                continue
            now = time.monotonic()
            parent = (msg.get("parent_header") or {}).get("msg_id", "")
            m = Msg(now, msg["msg_type"], msg["content"], parent)
            with self._lock:
                self.msgs.append(m)
                if m.type == "status" and m.content.get("execution_state") == "idle":
                    self._idle[parent] = now
                self._lock.notify_all()

    # -- executions
    def send(self, code: str) -> tuple[str, float]:
        """Send an execute_request without waiting: (msg_id, time sent)."""
        t = time.monotonic()
        return self.kc.execute(code, store_history=True), t

    def wait(self, msg_id: str, sent: float, timeout: float = 30) -> Result:
        deadline = time.monotonic() + timeout
        with self._lock:
            while msg_id not in self._idle:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._dump_stacks()
                    raise TimeoutError(
                        f"execution {msg_id[:8]} not done after {timeout} s "
                        f"(the kernel's threads are in the captured stderr)"
                    )
                self._lock.wait(left)
            msgs = [m for m in self.msgs if m.parent == msg_id and m.type in OUTPUT]
            idle = self._idle[msg_id]
        return Result(msg_id, sent, msgs, idle, self._reply(msg_id, time.monotonic() + 10))

    def _dump_stacks(self) -> None:
        """Ask the kernel to print every thread's stack to its stderr (pytest shows it)."""
        try:
            pid = self.km.provisioner.process.pid
            os.kill(pid, signal.SIGUSR1)
            time.sleep(1.0)  # the dump is written by the kernel: give it a moment
        except Exception:
            pass

    def _reply(self, msg_id: str, deadline: float) -> dict[str, Any]:
        """The execute_reply (shell channel) of a request: its status and payload."""
        while msg_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to {msg_id[:8]}")
            try:
                msg = self.kc.get_shell_msg(timeout=left)
            except Empty:
                continue
            parent = (msg.get("parent_header") or {}).get("msg_id", "")
            self._replies[parent] = msg["content"]
        return self._replies.pop(msg_id)

    def run(self, code: str, timeout: float = 30) -> Result:
        """Execute a cell and wait until the kernel is idle again."""
        msg_id, sent = self.send(code)
        return self.wait(msg_id, sent, timeout)

    def ok(self, code: str, timeout: float = 30) -> Result:
        return self.run(code, timeout).ok()

    def value(self, code: str, timeout: float = 30) -> str:
        """The text/plain of a cell's result (the cell must not fail)."""
        r = self.ok(code, timeout)
        assert r.value is not None, f"no result for {code!r}: {r}"
        return r.value["text/plain"]

    def inspect(self, code: str, timeout: float = 30) -> dict[str, Any]:
        msg_id = self.kc.inspect(code, len(code), detail_level=0)
        return self._reply(msg_id, time.monotonic() + timeout)

    def interrupt(self) -> None:
        self.km.interrupt_kernel()

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=False)

"""``Job``: a handle on one remote call, and how its outcome becomes a value or an error.

Shared by the decorator's functions and classes (``endpoint.py``) and the notebook's cells
(``jupyter/``): waiting streams the job's output into the caller as it arrives, and the
outcome is decoded here, in one place.
"""

from __future__ import annotations

import queue
import sys
import time
from collections import deque
from typing import Any, Protocol

from . import errors, wire
from .client import Client, JobState

TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
# Outcome keys that carry payloads, not information for a person.
_PAYLOAD_KEYS = ("blobs", "refs", "op", "c")


class Live(Protocol):
    """What ``Job.wait`` drives while it waits, on the waiting thread (a notebook's live
    receipt or progress bar: ``jupyter/receipts.py``)."""

    def tick(self) -> None: ...  # about every 0.1 s, and after each event
    def holds_output(self) -> bool: ...  # keep the job's output back (it is not shown yet)
    def progress(self, meta: dict[str, Any]) -> None: ...  # a progress frame (state, phase)
    def finish(self, outcome: dict[str, Any]) -> None: ...  # the job's last word
    def interrupted(self) -> None: ...  # the wait was interrupted (the job gets cancelled)


class Job:
    """A handle on one remote call: ``.id``, ``.status()``, ``.result(timeout)``,
    ``.cancel()``, ``.info()`` (timings, cold or warm, cost)."""

    def __init__(self, state: JobState, client: Client, where: str):
        self._state = state
        self._client = client
        self.where = where  # "endpoint NAME", for messages
        self.id = state.id
        self.endpoint = state.endpoint
        # The last progress frame (status, phase, worker, hardware), when the submit asked
        # for them; and events taken off the queue early by poll(), in order, for wait().
        self.progress: dict[str, Any] | None = None
        self._held: deque[tuple[str, Any]] = deque()

    def __repr__(self) -> str:
        return f"<Job {self.id[:8]} on {self.endpoint}: {self.status()}>"

    def done(self) -> bool:
        return self._state.done.is_set()

    @property
    def outcome(self) -> dict[str, Any] | None:
        """The control plane's last word on the job (None while it runs)."""
        return self._state.outcome

    def info(self) -> dict[str, Any]:
        """Status and timings (delayTime, executionTime ms; cold; coldStartTime; cost)."""
        if self._state.outcome is not None:
            return {k: v for k, v in self._state.outcome.items() if k not in _PAYLOAD_KEYS}
        try:
            return self._client.job_status(self.id)
        except errors.ControlPlaneError as e:
            return {"id": self.id, "status": "UNKNOWN", "error": str(e)}

    def status(self) -> str:
        return self.info()["status"]

    def cancel(self) -> None:
        if not self.done():
            self._client.cancel(self.id)

    def wait(self, timeout: float | None = None, live: Live | None = None) -> dict[str, Any]:
        """Wait for the outcome, showing the job's output here as it arrives.

        Several waiters may wait on one job (a ``--noblock`` cell's stream and its
        ``result()``): the outcome is left in place for the next one. ``live`` is ticked
        while waiting and told of progress frames and of the end. While it holds the output
        (a receipt that may still appear), output waits, so that the receipt stands above it.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ev, held = self._state.events, self._held
        step = 0.2 if live is None else 0.1
        kept: list[tuple[str, Any]] = []  # output held back for the receipt

        def release() -> None:
            while kept:
                emit(*kept.pop(0))

        try:
            while True:
                if held:
                    kind, data = held.popleft()
                else:
                    left = step if deadline is None else min(step, deadline - time.monotonic())
                    try:
                        # Short slices: a pending interrupt is handled within 0.2 s.
                        kind, data = ev.get(timeout=max(0.0, left))
                    except queue.Empty:
                        if deadline is not None and time.monotonic() >= deadline:
                            raise TimeoutError(
                                f"job {self.id} not done after {timeout:g} s"
                            ) from None
                        if live is not None:
                            live.tick()
                            if kept and not live.holds_output():
                                release()
                        continue
                if kind == "done":
                    ev.put(("done", data))
                    if live is not None:
                        live.finish(data)
                        release()
                    return data
                if kind == "progress":
                    self.progress = data
                    if live is not None:
                        live.progress(data)
                elif live is not None and live.holds_output():
                    kept.append((kind, data))
                else:
                    emit(kind, data)
                if live is not None:
                    live.tick()
                    if kept and not live.holds_output():
                        release()
        except KeyboardInterrupt:
            if live is not None:
                live.interrupted()
                release()
            raise

    def poll(self) -> None:
        """Take what has arrived for the job without waiting, on the thread that waits
        (a map's bar): progress frames are noted, everything else kept in order for
        ``wait``."""
        ev = self._state.events
        while not ev.empty():
            try:
                kind, data = ev.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self.progress = data
            else:
                self._held.append((kind, data))

    def result(self, timeout: float | None = None, live: Live | None = None) -> Any:
        """Wait for the job, streaming its output here, and return its value (or raise).

        Interrupting the wait (Ctrl-C, a notebook's stop button) cancels the remote job.
        """
        __tracebackhide__ = True
        try:
            outcome = self.wait(timeout, live)
        except KeyboardInterrupt:
            raise self.interrupted() from None
        return decode(outcome, self.where)

    def interrupted(self) -> KeyboardInterrupt:
        """After an interrupt of a wait: cancel the job, and the KeyboardInterrupt to raise
        instead, saying what happened (``cancelled job 1a2b3c4d on endpoint E (worker
        W)``; ``.job_id``, ``.endpoint``, ``.worker``), shown without our frames."""
        try:
            cancelled = "interrupted the wait for" if self.done() else "cancelled"
            self.cancel()
        except (errors.ControlPlaneError, OSError):
            cancelled = "could not cancel"
        except KeyboardInterrupt:  # pressed again: the cancel may not have gone out
            cancelled = "may not have cancelled"
        worker = self._worker()
        where = f"{self.where} (worker {worker})" if worker else f"{self.where} (not started yet)"
        exc = KeyboardInterrupt(f"{cancelled} job {self.id[:8]} on {where}")
        exc.job_id, exc.endpoint, exc.worker = self.id, self.endpoint, worker  # type: ignore[attr-defined]
        return errors.user_frames_only(exc)  # type: ignore[return-value]

    def _worker(self) -> str | None:
        """The worker the job ran on, if it had one (asked at most briefly)."""
        outcome = self._state.outcome
        if outcome is None:
            try:
                outcome = self._client.request({"op": "status", "id": self.id}, timeout=1.0)
            except (errors.ControlPlaneError, OSError, KeyboardInterrupt):
                return None
        return (outcome or {}).get("workerId")

    async def result_async(self) -> Any:
        """``result()`` for asyncio: output goes to this process's streams as it arrives;
        cancelling the awaiting task cancels the remote job."""
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        state = self._state

        def sink(stream: str, text: str) -> None:
            out = sys.stderr if stream == "stderr" else sys.stdout
            loop.call_soon_threadsafe(out.write, text)

        def done(_: JobState) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        state.sink = sink
        state.callbacks.append(done)
        # Output that arrived before the sink was set waits in the queue; so may the outcome.
        while not state.events.empty():
            kind, data = state.events.get()
            if kind == "out":
                sink(*data)
            elif kind == "progress":
                self.progress = data
            else:
                state.events.put((kind, data))
                break
        if state.done.is_set() and not fut.done():
            fut.set_result(None)
        try:
            await fut
        except asyncio.CancelledError:
            self.cancel()
            raise
        return decode(state.outcome, self.where)


def emit(kind: str, data: Any) -> None:
    """Show one piece of a job's output here: a stream chunk or a rich display."""
    if kind == "out":
        stream, text = data
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(text)
        out.flush()
    elif kind == "display":
        show(*data)


def show(
    data: dict[str, Any], metadata: dict[str, Any], extra: dict[str, Any] | None = None
) -> None:
    """Rich output from the worker: into this cell when a kernel runs us, else as text.
    ``extra``: transient (display_id), update (replace that output), clear (clear_output)."""
    extra = extra or {}
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None else None
    if shell is not None and hasattr(shell, "display_pub"):
        from IPython.display import clear_output, publish_display_data

        sys.stdout.flush()
        if "clear" in extra:
            clear_output(wait=bool(extra["clear"]))
            return
        publish_display_data(data=data, metadata=metadata, transient=extra.get("transient"),
                             update=bool(extra.get("update")))  # fmt: skip
    elif data:
        sys.stdout.write(str(data.get("text/plain", "")) + "\n")


def decode(outcome: dict[str, Any], where: str) -> Any:
    """The value of a finished job, or its error raised as the caller should see it."""
    __tracebackhide__ = True  # IPython shows the remote frames, not this one
    status = outcome.get("status")
    if status == "COMPLETED":
        blobs = outcome["blobs"]
        return wire.loads(blobs[0], blobs[1:], outcome.get("c", "cloudpickle"))
    err = outcome.get("error") or {}
    jid = outcome.get("id", "?")
    worker = outcome.get("workerId")
    here = f"{where}, worker {worker}" if worker else where
    if outcome.get("hardware"):
        here += f" ({outcome['hardware']})"
    if status == "FAILED" and "traceback" in err:
        raise wire.rebuild_exception(err, here)
    reason = err.get("message", "no reason given") if isinstance(err, dict) else str(err)
    if isinstance(err, dict) and err.get("type") == "BudgetExceeded":
        raise errors.BudgetExceeded(reason, err.get("endpoint"))
    if status == "CANCELLED":
        raise errors.JobCancelled(jid, status, reason)
    if status == "TIMED_OUT":
        raise errors.JobTimedOut(jid, status, reason)
    raise errors.JobFailed(jid, status or "FAILED", reason)

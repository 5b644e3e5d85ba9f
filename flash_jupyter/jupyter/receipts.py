"""Live receipts in a notebook: what a blocking call is doing, then what it cost.

A ``%%flash`` cell or a blocking Endpoint call made in a kernel that takes longer than
``SHOW_AFTER`` seconds shows one line that moves Queued -> Cold start (its phase) -> Running
-> Done / Failed / Cancelled and ends as the call's receipt (endpoint, hardware, cold or
warm, queue wait, cold-start time, run time, cost). ``.map`` and batches of ``--noblock``
cells show one progress bar instead, after ``BAR_AFTER`` seconds.

Both are plain IPython displays (``display(..., display_id=True)`` then updates in place) of
objects whose ``_repr_mimebundle_`` gives text/plain and text/html, so a console, nbconvert
and a front end without a widget manager all show the same thing. They are driven from the
thread that waits (``Job.wait``'s ``live`` hook), never by a poll of the control plane; the
job's state comes from the progress frames the control plane sends when the submit asked for
them (``Client.submit(..., progress=True)``), which happens only when receipts are on and
this process is a kernel. IPython is imported only when something is shown.
"""

from __future__ import annotations

import contextvars
import html
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from .. import envvars
from ..catalog import money

SHOW_AFTER = 0.5  # s: a call faster than this shows nothing
BAR_AFTER = 1.0  # s: a map or batch faster than this shows no bar
CLOCK_EVERY = 1.0  # s: the live line's clock moves at most this often
BAR_EVERY = 0.25  # s: a bar is redrawn at most this often

PHASES = {
    "environment": "building the environment",
    "process": "starting the process",
    "code": "loading the code",
}
_LIVE_STATES = {"IN_QUEUE": "Queued", "COLD_START": "Cold start", "IN_PROGRESS": "Running"}
_FINAL_STATES = {"COMPLETED": "Done", "FAILED": "Failed", "CANCELLED": "Cancelled",
                 "TIMED_OUT": "Timed out"}  # fmt: skip
_MARK = {"Done": "✓", "Failed": "✗", "Cancelled": "■", "Timed out": "✗"}
_COLOUR = {"Queued": "#6e7781", "Cold start": "#9a6700", "Running": "#0969da", "Done": "#1a7f37",
           "Failed": "#cf222e", "Cancelled": "#6e7781", "Timed out": "#cf222e"}  # fmt: skip
_STYLE = "font-family:var(--jp-code-font-family,monospace);font-size:12px;line-height:1.5;"

# ---------------------------------------------------------------- the setting

_override: bool | None = None  # %flash config receipts=on|off; None: the environment's


def enabled() -> bool:
    """Whether receipts and progress bars are on (``%flash config receipts=``, else
    FLASH_JUPYTER_RECEIPTS, default on)."""
    if _override is not None:
        return _override
    return bool(envvars.get("FLASH_JUPYTER_RECEIPTS"))


def set_enabled(on: bool | None) -> None:
    """Turn receipts on or off for this process (None: back to the environment's)."""
    global _override
    _override = on


def in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (an IPython shell with a kernel): the only
    place a display can be updated in place."""
    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    shell = ip.get_ipython()
    return getattr(shell, "kernel", None) is not None


def wanted() -> bool:
    """Receipts on, and somewhere to show them: ask the control plane for progress frames."""
    return enabled() and in_kernel()


def live_for(endpoint: str) -> Receipt | None:
    """A receipt for one blocking call on ``endpoint``, or None when none is wanted."""
    return Receipt(endpoint) if wanted() else None


# ---------------------------------------------------------------- formatting


def seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 0.1:  # a warm queue or a spare worker's cold start: milliseconds say more
        return f"{s * 1000:.0f} ms"
    if s < 10:
        return f"{s:.2f} s" if s < 1 else f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


def _ms(outcome: dict[str, Any], key: str) -> float | None:
    v = outcome.get(key)
    return None if v is None else float(v) / 1000


def receipt_fields(endpoint: str, outcome: dict[str, Any], hardware: str | None) -> dict:
    """What a finished call's receipt says, from its outcome (missing keys: unknown)."""
    cold = bool(outcome.get("cold"))
    delay = _ms(outcome, "delayTime")
    cold_s = _ms(outcome, "coldStartTime") if cold else None
    queue = None if delay is None else max(0.0, delay - (cold_s or 0.0))
    run = _ms(outcome, "executionTime")
    price = outcome.get("pricePerSecond")
    cost_run, cost_cold = outcome.get("costRun"), outcome.get("costColdStart")
    if cost_run is not None:
        cost = float(cost_run) + float(cost_cold or 0.0)
    else:
        cost = outcome.get("cost")
    phases = outcome.get("coldStartPhases") or {}
    return {
        "status": _FINAL_STATES.get(outcome.get("status", ""), outcome.get("status") or "?"),
        "endpoint": endpoint,
        "hardware": outcome.get("hardwareLabel") or hardware or outcome.get("hardware"),
        "worker": outcome.get("workerId"),
        "cold": cold,
        "queue_s": queue,
        "cold_start_s": cold_s,
        # Phases that did not happen (no environment to build) are left out.
        "cold_start_phases_s": {k: v / 1000 for k, v in phases.items() if v},
        "environment": outcome.get("environment"),  # "pre-installed" or "installed at ..."
        "run_s": run,
        "price_per_second": price,
        "cost_run": cost_run,
        "cost_cold_start": cost_cold if cold else 0.0,
        "cost": cost,
    }


def _cost_text(f: dict[str, Any]) -> str:
    if f["cost"] is None:
        return "cost ?"
    price = f["price_per_second"]
    if price is None:  # an older control plane: the total only
        return f"{money(f['cost'])} (run{' + cold start' if f['cold'] else ''})"
    why = f"run {seconds(f['run_s'])}"
    if f["cold"]:
        why += f" + cold start {seconds(f['cold_start_s'])}"
    return f"{money(f['cost'])} ({why} at {money(price)}/s)"


def receipt_parts(f: dict[str, Any]) -> list[str]:
    """The receipt's pieces after its status, in order (one line, joined by " · ")."""
    parts = [f["endpoint"]]
    if f["hardware"]:
        parts.append(f["hardware"])
    if f["run_s"] is None and f["queue_s"] is None:  # it never started
        return parts
    parts.append("cold" if f["cold"] else "warm")
    parts.append(f"queue {seconds(f['queue_s'])}")
    if f["cold"]:
        cs = f"cold start {seconds(f['cold_start_s'])}"
        ph = f["cold_start_phases_s"]
        if ph:
            env = f.get("environment")  # the environment phase says how: "pre-installed"
            named = {k: f"{k} {env}" if k == "environment" and env else k for k in ph}
            cs += " (" + ", ".join(f"{named[k]} {seconds(v)}" for k, v in ph.items()) + ")"
        parts.append(cs)
    parts.append(f"run {seconds(f['run_s'])}")
    parts.append(_cost_text(f))
    return parts


def _bundle(state: str, parts: list[str], meta: dict[str, Any]) -> tuple[dict, dict]:
    mark = _MARK.get(state, "⏳")
    text = " · ".join([f"{mark} {state}", *parts])
    colour = _COLOUR.get(state, "#6e7781")
    rest = "".join(f' <span style="color:#57606a">· {html.escape(p)}</span>' for p in parts)
    page = (f'<div class="flash-jupyter-receipt" style="{_STYLE}"><span style="color:{colour};'
            f'font-weight:600">{mark} {html.escape(state)}</span>{rest}</div>')  # fmt: skip
    return {"text/plain": text, "text/html": page}, {"flash_jupyter": meta}


# ---------------------------------------------------------------- one call


class Receipt:
    """The live status of one blocking call, shown once it passes ``SHOW_AFTER`` seconds,
    and its receipt at the end. Driven by ``Job.wait`` (``tick``, ``progress``, ``finish``,
    ``interrupted``) on the thread that waits."""

    def __init__(self, endpoint: str, show_after: float | None = None):
        self.endpoint = endpoint
        self.t0 = time.monotonic()
        self.show_after = SHOW_AFTER if show_after is None else show_after
        self.state = "Queued"
        self.phase: str | None = None
        self.hardware: str | None = None
        self.fields: dict[str, Any] | None = None  # the receipt's, once finished
        self.handle: Any = None  # the display, once shown
        self._drawn = 0.0  # when it was last drawn
        self._dirty = False

    # -- what the display shows
    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        meta: dict[str, Any] = {"kind": "receipt", "state": self.state, "phase": self.phase,
                                "endpoint": self.endpoint}  # fmt: skip
        if self.fields is not None:
            meta["receipt"] = self.fields
            return _bundle(self.state, receipt_parts(self.fields), meta)
        state = self.state
        if state == "Cold start" and self.phase:
            state = f"Cold start: {PHASES.get(self.phase, self.phase)}"
        parts = [self.endpoint]
        if self.hardware:
            parts.append(self.hardware)
        if self.state not in _MARK:
            parts.append(seconds(time.monotonic() - self.t0))
        return _bundle(state, parts, meta)

    def __repr__(self) -> str:
        return self._repr_mimebundle_()[0]["text/plain"]

    # -- the hooks Job.wait calls
    def progress(self, meta: dict[str, Any]) -> None:
        state = _LIVE_STATES.get(meta.get("status", ""), self.state)
        phase = meta.get("phase") if state == "Cold start" else None
        hardware = meta.get("hardware") or self.hardware
        if (state, phase, hardware) != (self.state, self.phase, self.hardware):
            self.state, self.phase, self.hardware = state, phase, hardware
            self._dirty = True

    def holds_output(self) -> bool:
        """Until it is shown (or the call ends first), the call's output waits: the receipt
        stands above it, and a fast call shows its output and no receipt."""
        return self.handle is None and self.fields is None

    def tick(self) -> None:
        now = time.monotonic()
        if self.handle is None:
            if now - self.t0 >= self.show_after:
                self._show()
        elif self._dirty or now - self._drawn >= CLOCK_EVERY:
            self._draw()

    def finish(self, outcome: dict[str, Any]) -> None:
        self.fields = receipt_fields(self.endpoint, outcome, self.hardware)
        self.state = self.fields["status"]
        if self.handle is not None:
            self._draw()
        elif time.monotonic() - self.t0 >= self.show_after:
            self._show()

    def interrupted(self) -> None:
        if self.fields is None:
            self.state, self.phase = "Cancelled", None
            self.fields = {**receipt_fields(self.endpoint, {}, self.hardware),
                           "status": "Cancelled"}  # fmt: skip
        if self.handle is not None:
            self._draw()

    # -- drawing
    def _show(self) -> None:
        from IPython.display import display

        self._drawn, self._dirty = time.monotonic(), False
        self.handle = display(self, display_id=True)

    def _draw(self) -> None:
        self._drawn, self._dirty = time.monotonic(), False
        self.handle.update(self)


# ---------------------------------------------------------------- many jobs: one bar


def job_counts(jobs: Sequence[Any]) -> dict[str, int]:
    """done / failed / running / queued of ``Job`` handles (``.done()``, ``.outcome``,
    ``.progress``: the last progress frame)."""
    c = {"done": 0, "failed": 0, "running": 0, "queued": 0}
    for j in jobs:
        if j.done():
            ok = (j.outcome or {}).get("status") == "COMPLETED"
            c["done" if ok else "failed"] += 1
        elif (j.progress or {}).get("status") == "IN_PROGRESS":
            c["running"] += 1
        else:
            c["queued"] += 1
    return c


class ProgressBar:
    """One bar for many jobs (a ``.map``, a batch of ``--noblock`` cells): shown after
    ``BAR_AFTER`` seconds if they are not all done by then, redrawn in place at most every
    ``BAR_EVERY`` seconds and only when a count changed."""

    def __init__(self, label: str, counts: Callable[[], dict[str, int]], total: Callable[[], int]):
        self.label = label
        self._counts, self._total = counts, total
        self.t0 = time.monotonic()
        self.handle: Any = None
        self.counts = {"done": 0, "failed": 0, "running": 0, "queued": 0}
        self.note = ""  # said after the counts at the end ("stopped: ...")
        self.finished = False
        self._drawn = 0.0

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        c, n = self.counts, max(1, self._total())
        width = 30
        cells = {k: round(width * c[k] / n) for k in ("done", "failed", "running")}
        text_bar = ("█" * cells["done"] + "✗" * cells["failed"] + "▒" * cells["running"])[:width]
        text_bar = text_bar.ljust(width, "░")
        finished = c["done"] + c["failed"]
        words = (f"done {c['done']} · failed {c['failed']} · running {c['running']} · "
                 f"queued {c['queued']}")  # fmt: skip
        tail = f" · {self.note}" if self.note else ""
        text = f"{self.label} [{text_bar}] {finished}/{self._total()} · {words}{tail}"
        segs = "".join(
            f'<div style="width:{100 * c[k] / n:.2f}%;background:{col}"></div>'
            for k, col in (("done", "#2da44e"), ("failed", "#cf222e"), ("running", "#54aeff"))
        )
        said = html.escape(f"{finished}/{self._total()} · {words}{tail}")
        page = (f'<div class="flash-jupyter-progress" style="{_STYLE}">'
                f"<span>{html.escape(self.label)}</span> "
                f'<div style="display:inline-flex;width:200px;height:10px;background:#eaeef2;'
                f'border-radius:3px;overflow:hidden;vertical-align:middle">{segs}</div> '
                f"<span>{said}</span></div>")  # fmt: skip
        meta = {"kind": "progress", "label": self.label, "counts": dict(c),
                "total": self._total(), "finished": self.finished}  # fmt: skip
        return {"text/plain": text, "text/html": page}, {"flash_jupyter": meta}

    def __repr__(self) -> str:
        return self._repr_mimebundle_()[0]["text/plain"]

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._drawn < BAR_EVERY or now - self.t0 < BAR_AFTER:
            return
        counts = self._counts()
        if self.handle is not None and counts == self.counts:
            return
        self.counts = counts
        self._draw()

    def finish(self, note: str = "") -> None:
        """The last drawing (only if the bar was shown)."""
        self.finished, self.note = True, note
        if self.handle is not None:
            self.counts = self._counts()
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        if self.handle is None:
            from IPython.display import display

            self.handle = display(self, display_id=True)
        else:
            self.handle.update(self)


class MapProgress:
    """The bar of one ``.map``, ticked by the wait of whichever of its jobs the caller is
    waiting on (the ``live`` hook of ``Job.wait``): the other jobs' progress frames are taken
    off their queues (``Job.poll``) on the same thread, their output kept in order."""

    def __init__(self, label: str, jobs: list[Any]):
        self.jobs = jobs
        self._pending = jobs
        self.bar = ProgressBar(label, self._counts, lambda: len(self.jobs))

    def _counts(self) -> dict[str, int]:
        self._pending = [j for j in self._pending if not j.done()]
        for j in self._pending:
            j.poll()
        return job_counts(self.jobs)

    # Job.wait's hooks
    def tick(self) -> None:
        self.bar.tick()

    def holds_output(self) -> bool:
        return False  # items' output shows as it comes; the bar is redrawn in place

    def progress(self, meta: dict[str, Any]) -> None:
        pass  # Job.wait notes it on the job itself

    def finish(self, outcome: dict[str, Any]) -> None:
        self.bar.tick()

    def interrupted(self) -> None:
        pass  # _map says how it ended (end())

    def end(self, note: str = "") -> None:
        self.bar.finish(note)


def map_progress(label: str, jobs: list[Any]) -> MapProgress | None:
    """The bar for a map, or None when receipts are off or this is not a kernel."""
    return MapProgress(label, jobs) if wanted() else None


class _Batch:
    """``--noblock`` cells submitted while others still run: one bar, in the cell that
    started the batch, drawn by a thread running in that cell's context."""

    def __init__(self, first: Any) -> None:
        self.jobs: list[Any] = [first]
        self.lock = threading.Lock()
        self.closed = False
        self.bar = ProgressBar("--noblock cells", lambda: job_counts(list(self.jobs)),
                               lambda: len(self.jobs))  # fmt: skip
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(self._run,), daemon=True,
                         name="flash-noblock-bar").start()  # fmt: skip

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            with self.lock:
                if all(j.done() for j in self.jobs):
                    self.closed = True
                    break
            try:
                self.bar.tick()
            except Exception:  # the kernel is shutting down: nowhere to draw
                return
        try:
            self.bar.finish()
        except Exception:
            pass


_batch: _Batch | None = None
_batch_lock = threading.Lock()


def track_noblock(job: Any) -> None:
    """Count a ``--noblock`` cell's job in the current batch's bar (a new batch, its bar in
    this cell, when none is running)."""
    global _batch
    with _batch_lock:
        batch = _batch
        if batch is not None:
            with batch.lock:
                if not batch.closed:
                    batch.jobs.append(job)
                    return
        _batch = _Batch(job)

"""One ``%%flash`` cell as a job: what it sends (its free names, its options), and how its
outcome lands in the notebook (names back, proxies for what stayed, the last value).

No IPython here: the magics pass in the notebook's namespace and the cell's file name.
"""

from __future__ import annotations

import contextvars
import re
import sys
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from .. import errors, wire
from ..job import Job, Live, decode
from . import cellcode
from .remote import RemoteValue
from .remote_names import Home, RemoteNames

# Names IPython keeps in the user namespace that are never the user's data.
IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i?\d+|_ii+|_oh|_dh|In|Out|get_ipython|exit|quit|_ih)$")


def at_line(exc: BaseException, filename: str, lineno: int) -> BaseException:
    """Point an error found before sending at the cell line that caused it."""
    tb = wire.fake_traceback([{"filename": filename, "lineno": lineno, "name": "<module>"}])
    return exc.with_traceback(tb) if tb is not None else exc


@dataclass
class CellPlan:
    """A cell ready to send: where it goes, the call to pickle, and what it binds."""

    endpoint: str
    names: cellcode.CellNames
    opts: dict[str, Any]
    call: wire.CellCall
    affinity: dict[str, Any] | None


def plan_cell(
    cell: str,
    *,
    session: str,
    endpoint: str,
    ns: MutableMapping[str, Any],
    remote: RemoteNames,
    filename: str,
    keep: list[str] | None = None,
    out: list[str] | None = None,
    limit: int | None = None,
) -> CellPlan:
    """The cell's inputs and options; errors a local run would raise (an undefined name, a
    name that lives on another endpoint) are raised here, at the cell's line."""
    __tracebackhide__ = True
    names = cellcode.analyse(cell)
    mine = remote.prune(endpoint, ns)
    missing = cellcode.undefined(names, ns.keys())
    if missing:
        n = missing[0]
        raise at_line(NameError(f"name {n!r} is not defined", name=n), filename,
                      names.first_use.get(n, 1))  # fmt: skip
    needs_remote = sorted(n for n in names.loaded if n in mine)
    inputs: dict[str, Any] = {}
    drop: list[str] = []
    for n in sorted(names.loaded - names.bound_first):
        if n in mine or n not in ns or IPYTHON_NAMES.match(n):
            continue
        v = ns[n]
        if isinstance(v, RemoteValue):  # lost, or held by another endpoint
            drop.append(n)  # no older copy on this worker may stand in for it
            if n in names.bound_anywhere:
                continue  # the cell may bind it first; if not, NameError there
            why = v.lost or (
                f"{n} lives on endpoint {v.endpoint} (worker {v.worker}), "
                f"not on {endpoint}: bring it here with {n}.fetch() first"
            )
            raise at_line(errors.RemoteStateLost(why, [n]), filename,
                          names.first_use.get(n, 1))  # fmt: skip
        inputs[n] = v
    opts = {"bound": names.bound, "keep": keep, "out": out, "limit": limit,
            "filename": filename, "needs_remote": needs_remote, "drop": drop,
            "ack": remote.notes_for(endpoint)}  # fmt: skip
    call = wire.CellCall(session, cell, inputs, opts)
    return CellPlan(endpoint, names, opts, call, remote.affinity(endpoint, needs_remote))


def pickle_cell(plan: CellPlan, filename: str) -> wire.Payload:
    """The cell's call, pickled; an input that cannot travel is named at its first use."""
    __tracebackhide__ = True
    try:
        return wire.dumps_call(plan.call, what="cell")
    except errors.SerializationError as e:
        for n, v in plan.call.inputs.items():
            try:
                wire.dumps(v, what=f"notebook variable {n!r}")
            except errors.SerializationError as named:
                raise at_line(named, filename, plan.names.first_use.get(n, 1)) from None
        raise at_line(e, filename, 1) from None


def finish_cell(
    job: Job,
    plan: CellPlan,
    remote: RemoteNames,
    ns: MutableMapping[str, Any],
    fetch: Callable[[RemoteValue], Any] | None,
    timeout: float | None = None,
    live: Live | None = None,
) -> Any:
    """Wait for the cell's job, put the names it bound into ``ns`` and return its last
    value (a proxy when the value stayed on the worker). ``live``: its receipt."""
    __tracebackhide__ = True
    endpoint = plan.endpoint
    try:
        outcome = job.wait(timeout, live)
    except KeyboardInterrupt:
        raise job.interrupted() from None  # cancels it; says which job, endpoint, worker
    wid = outcome.get("workerId", "?")
    incarnation = int(outcome.get("workerIncarnation") or 0)
    where = f"endpoint {endpoint}"
    err = outcome.get("error") or {}
    if outcome.get("status") in ("COMPLETED", "FAILED") and "workerId" in outcome:
        # The worker read the notes this cell carried before running it.
        remote.delivered(endpoint, (wid, incarnation), plan.opts.get("ack") or [])
    if outcome.get("status") == "FAILED" and err.get("type") == "RemoteStateLost":
        remote.forget(endpoint, err.get("worker"), err.get("message", ""))
        raise errors.RemoteStateLost(err.get("message", "remote state lost"), err.get("names"))
    try:
        result = decode(outcome, where)
    except errors.RemoteStateLost as e:
        remote.forget(endpoint, wid)
        raise errors.RemoteStateLost(f"{e} (on {where}, worker {wid})", e.names) from None
    home = Home(wid, incarnation, outcome.get("hardware", ""))
    old = remote.home.get(endpoint)
    lost = remote.settle(endpoint, home)
    if lost and old is not None:
        verb = "was" if len(lost) == 1 else "were"
        print(f"note: {', '.join(lost)} {verb} lost with worker {old.worker}", file=sys.stderr)
    # Each name is loaded on its own: one this kernel cannot rebuild (its module is only on
    # the worker) stays there as a remote name, and the others still arrive.
    cell = result.get("cell", "")
    values: dict[str, Any] = {}
    stayed = dict(result["remote"])
    for n, packed in result["values"].items():
        try:
            values[n] = wire.loads(*packed)
        except Exception as e:
            about = result["about"].get(n) or {}
            stayed[n] = dict(about, why=why_not_here(e, about), loadable=False)
            remote.note(endpoint, (wid, incarnation), n, cell, "stays")
        else:
            remote.note(endpoint, (wid, incarnation), n, cell, "back")
    remote.take(endpoint, values, stayed, ns, fetch, cell)
    if "last_remote" in result:
        info = dict(result["last_remote"], mime=result.get("last_mime"))
        return RemoteValue("_", endpoint, home.worker, home.incarnation, home.hardware, info)
    if "last" in result:
        try:
            return wire.loads(*result["last"])
        except Exception as e:
            about = result.get("last_about") or {}
            info = dict(about, why=why_not_here(e, about), loadable=False)
            return RemoteValue("_", endpoint, home.worker, home.incarnation, home.hardware, info)
    return None


def why_not_here(e: BaseException, about: dict[str, Any]) -> str:
    """Why a value sent back by the worker stays there: what loading it here raised."""
    module = getattr(e, "name", None) if isinstance(e, ImportError) else None
    if module:
        if about.get("type") == "module":
            return f"stays on the worker: this kernel cannot import module {module!r}"
        return (
            f"stays on the worker: its type needs module {module!r}, which this kernel "
            f"cannot import"
        )
    return f"stays on the worker: this kernel cannot rebuild it ({type(e).__name__}: {e})"


Finish = Callable[[Job, CellPlan, "float | None"], Any]


class CellJob:
    """A ``%%flash --noblock`` cell in flight. Its output keeps streaming into the cell that
    started it, whatever runs meanwhile; ``result()`` waits, brings the names back into the
    notebook and returns the cell's last value."""

    def __init__(
        self, job: Job, plan: CellPlan, finish: Callable[[Job, CellPlan, float | None], Any]
    ):
        self._job, self._plan, self._finish = job, plan, finish
        self.id = job.id
        self.endpoint = plan.endpoint
        self._streamed = threading.Event()
        # The kernel routes output by a context variable holding the cell it belongs to:
        # a thread running in a copy of this cell's context writes into this cell.
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(self._stream,), daemon=True,
                         name=f"flash-cell-{job.id[:8]}").start()  # fmt: skip

    def _stream(self) -> None:
        self._job.wait(None)  # shows the output; leaves the outcome for result()
        self._streamed.set()

    def __repr__(self) -> str:
        return f"<flash cell {self.id[:8]} on {self.endpoint}: {self.status()}>"

    def status(self) -> str:
        return self._job.status()

    def done(self) -> bool:
        return self._job.done()

    def cancel(self) -> None:
        self._job.cancel()

    def result(self, timeout: float | None = None) -> Any:
        __tracebackhide__ = True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._streamed.wait(0.2):  # short slices: interrupts get through
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"cell {self.id[:8]} not done after {timeout:g} s")
        except KeyboardInterrupt:
            raise self._job.interrupted() from None  # cancels it and says so
        return self._finish(self._job, self._plan, timeout)

"""Billing: a worker's price, what a job cost, the ledger of worker lifetimes, and the billing
views.

A worker is billed from the moment its start is asked for (``start_signal``) until its process
has fully stopped, per second rounded up, at the price of the hardware it got (the GPU type
times ``gpu_count``). Throttled and Unhealthy slots hold no process and cost nothing. The
ledger (SQLite) gets one row per worker lifetime; all-time totals are its sums, session totals
count since this control plane started. A job's cost is its share: its execution time, plus
the cold start it waited for, at its worker's price.

Bills are durable from the start. A worker's ledger row is written when its start is asked for
(``open``: ``closed`` NULL), its ``seen`` is moved on every ``SEEN_EVERY`` seconds while the
control plane runs (one UPDATE for all open bills, whatever the job rate: ``tick``), and it is
closed when the process has stopped (``close``: ``closed`` "exit"). A control plane killed
with SIGKILL leaves its bills open; its workers exit when the wire drops. The next start closes
them at the last time each worker was known alive (``seen``: ``closed`` "last_seen"), before
anything else is billed (``load``), so a worker is never billed past what was known, never
twice, and no bill stays open once its process is gone. A crash can so under-bill a worker by
at most ``SEEN_EVERY`` seconds (and the moment its process took to see the wire drop).

Each bill also has a state history (``worker_states``: its start, its process's hello, its
end, with the reason), from which ``audit`` recomputes every bill's seconds, independently of
the ledger's own arithmetic, and checks them against the ledger.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import catalog
from ..config import EndpointConfig
from ..providers.base import Allocation
from . import model as m

if TYPE_CHECKING:
    from .control import ControlPlane


def price(cfg: EndpointConfig, alloc: Allocation) -> float:
    """Per-second price of one worker: the GPU type it actually got, times gpu_count."""
    if alloc.type_name and cfg.gpu:
        return catalog.lookup(alloc.type_name, "gpu").price_per_second * cfg.gpu_count
    return cfg.price_per_second


SEEN_EVERY = 1.0  # seconds between two writes of "the open bills' workers are alive"
CLOSED_BY = {
    "exit": "the provider reported the worker's process stopped",
    "last_seen": "the control plane died; closed at its next start, at the last time the "
    "worker was known alive",
}


RECOVERED_KEYS = ("worker_id", "endpoint", "started", "stopped", "seconds", "cost", "closed")


def billed_seconds(started: float, stopped: float) -> int:
    """Runpod's rule: per second, rounded up, one second at least."""
    return max(1, math.ceil(stopped - started))


class Ledger:
    """The control plane's bills. ``cp.ledger``; ``cp.billing()`` is its view."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.open_bills: set[str] = set()
        self.recovered: list[dict[str, Any]] = []  # bills closed at this start (last_seen)
        self._seen_at = 0.0

    price = staticmethod(price)

    def load(self) -> None:
        """At start: close the bills a killed control plane left open, then the all-time
        totals per endpoint, from the ledger."""
        store = self.cp.store
        self.recovered = store.close_open_bills(billed_seconds)
        for b in self.recovered:
            print(f"flash-jupyter: closed the bill of worker {b['worker_id']} ({b['endpoint']}) "
                  f"left open by a control plane that died: {b['seconds']} s, at the last "
                  f"time it was known alive", file=sys.stderr, flush=True)  # fmt: skip
        for ep in self.cp.endpoints.values():
            tot = store.ledger_total(ep.name, ep.created)
            ep.billed_seconds, ep.billed_cost = int(tot["seconds"]), tot["cost"]

    # -- the durable bill of one worker lifetime
    def open(self, ep: m.EndpointState, w: m.Worker) -> None:
        """The worker's start was asked for (``w.start_signal``): its bill opens, durably."""
        if w.start_signal is None:
            return
        if w.bill is not None:  # a start that replaces one not closed (cannot happen)
            self.void(w, "replaced")
        w.bill = bill = uuid.uuid4().hex
        store = self.cp.store
        store.open_bill(bill, w.id, ep.name, w.hardware, w.emulated, w.start_signal, w.price)
        store.worker_state(bill, w.id, ep.name, m.INITIALIZING, w.start_signal)
        self.open_bills.add(bill)

    def refine(self, w: m.Worker) -> None:
        if w.bill is not None:
            self.cp.store.refine_bill(w.bill, w.hardware, w.emulated, w.price)

    def void(self, w: m.Worker, why: str = "") -> None:
        """The start went back to waiting for resources: that bill is never charged."""
        if w.bill is None:
            return
        store = self.cp.store
        store.void_bill(w.bill)
        store.worker_state(w.bill, w.id, w.endpoint, m.THROTTLED, self.cp.wall(), why or None)
        self.open_bills.discard(w.bill)
        w.bill = None

    def state(self, w: m.Worker, state: str, t: float | None = None) -> None:
        """A step of the bill's history (the process said hello)."""
        if w.bill is not None:
            self.cp.store.worker_state(w.bill, w.id, w.endpoint, state,
                                       self.cp.wall() if t is None else t)  # fmt: skip

    def tick(self) -> None:
        """From the ticker: every SEEN_EVERY s, the open bills' workers were alive now."""
        if not self.open_bills:
            return
        now = self.cp.wall()
        if now - self._seen_at >= SEEN_EVERY:
            self._seen_at = now
            self.cp.store.ledger_seen(now)

    @staticmethod
    def job_cost(job: m.Job, w: m.Worker | None, ep: m.EndpointState) -> float:
        """A finished job's cost (it started): execution plus the cold start it waited for."""
        _, run, cold = Ledger.job_cost_parts(job, w, ep)
        return run + cold

    @staticmethod
    def job_cost_parts(
        job: m.Job, w: m.Worker | None, ep: m.EndpointState | None
    ) -> tuple[float, float, float]:
        """(price per second, cost of its execution, cost of the cold start it caused):
        at the price of the worker it ran on (``job.price``, set at dispatch)."""
        price = job.price
        if price is None:
            if w is not None and w.live:
                price = w.price
            else:
                price = ep.config.price_per_second if ep is not None else 0.0
        if job.started is None:
            return price, 0.0, 0.0
        end = job.finished if job.finished is not None else job.started
        run = max(0.0, end - job.started) * price
        cold = job.cold_start_ms / 1000 * price if job.cold and job.cold_start_ms else 0.0
        return price, run, cold

    def close(self, ep: m.EndpointState, w: m.Worker, stopped: float, reason: str = "") -> None:
        """A worker's process has fully stopped: its bill is closed in the ledger."""
        if w.start_signal is None:
            return
        if w.bill is None:  # opened without a bill (a start path that skipped ``open``)
            self.open(ep, w)
        bill, w.bill = w.bill, None
        secs = billed_seconds(w.start_signal, stopped)
        cost = secs * w.price
        ep.billed_seconds += secs
        ep.billed_cost += cost
        ep.session_seconds += secs
        ep.session_cost += cost
        store = self.cp.store
        store.close_bill(bill, w.hardware, w.emulated, stopped, secs, cost, w.price)
        store.worker_state(bill, w.id, ep.name, "Exited", stopped, reason or None)
        self.open_bills.discard(bill)
        self.cp.events.publish("billing", worker=w.id, endpoint=ep.name, seconds=secs,
                               cost=cost, estimate=w.emulated)  # fmt: skip
        self.cp.budget.on_bill(cost)

    # -- views
    def worker_bill(self, w: m.Worker, ep: m.EndpointState, now: float) -> dict[str, Any]:
        """What a worker has cost so far in this incarnation (0 without a process)."""
        if not w.live:
            return {"billed_seconds": 0, "cost": 0, "price_per_second": ep.config.price_per_second}
        secs = w.billed_seconds(now)
        return {"billed_seconds": secs, "cost": round(secs * w.price, 8),
                "price_per_second": w.price}  # fmt: skip

    def endpoint_bill(self, ep: m.EndpointState, now: float) -> dict[str, Any]:
        """All time and this session, with running workers counted up to ``now``."""
        live = [w for w in ep.workers.values() if w.live]
        live_seconds = sum(w.billed_seconds(now) for w in live)
        live_cost = sum(w.billed_seconds(now) * w.price for w in live)
        return {
            "cost": round(ep.billed_cost + live_cost, 8),
            "billed_seconds": ep.billed_seconds + live_seconds,
            "session_cost": round(ep.session_cost + live_cost, 8),
            "session_seconds": ep.session_seconds + live_seconds,
        }

    def view(self) -> dict[str, Any]:
        """What has been billed: all time (the ledger) and this session (since the control
        plane started), per endpoint, with running workers counted up to now."""
        cp = self.cp
        by_ep = {}
        total = session = 0.0
        estimate = False
        for ep in cp.endpoints.values():
            v = cp.endpoint_view(ep)
            by_ep[ep.name] = {
                "cost": v["cost"],
                "billed_seconds": v["billed_seconds"],
                "session_cost": v["session_cost"],
                "session_seconds": v["session_seconds"],
                "price_per_second": ep.config.price_per_second,
                "hardware": v["hardware"],
                "estimate": v["emulated"],
                # How its bills were closed (CLOSED_BY), and how many are open (live workers).
                "bills": {
                    **cp.store.ledger_closed(ep.name, ep.created),
                    "open": sum(1 for w in ep.workers.values() if w.live and w.bill),
                },
            }
            total += v["cost"]
            session += v["session_cost"]
            estimate = estimate or v["emulated"]
        return {
            "currency": catalog.CURRENCY,
            "prices_as_of": catalog.PRICES_AS_OF,
            "total": round(total, 8),
            "session": round(session, 8),
            "estimate": estimate,
            "basis": (
                "estimate at list price: hardware emulated on CPU"
                if estimate
                else "per-second list price"
            ),
            "since": cp.started,
            "endpoints": by_ep,
            "closed_by": CLOSED_BY,
            # Bills a control plane that died left open, closed at this start (last_seen).
            "recovered": [{k: b[k] for k in RECOVERED_KEYS} for b in self.recovered],
        }


def audit(db_path: str | Path, now: float | None = None) -> dict[str, Any]:
    """Recompute every bill from its recorded state history (``worker_states``) and check it
    against the ledger: the same start and end, the same seconds (Runpod's rule,
    ``billed_seconds``), cost = seconds x price, no worker (slot id) billed twice for the same
    second, no bill left open (``open``: those still open; fine only for live workers).

    Reads ``flash.db`` read-only; a running control plane may hold it. Returns
    ``{"bills": {bill: {...}}, "endpoints": {name: {"seconds", "cost", "bills"}},
    "mismatches": [text], "overlaps": [text], "open": [bill], "closed": {how: n}}``."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        history: dict[str, list[tuple[str, float, str | None]]] = {}
        owner: dict[str, tuple[str, str]] = {}
        for bill, wid, ep, state, t, note in db.execute(
            "SELECT bill, worker_id, endpoint, state, time, note FROM worker_states ORDER BY rowid"
        ):
            history.setdefault(bill, []).append((state, t, note))
            owner[bill] = (wid, ep)
        ledger = {
            r[0]: r
            for r in db.execute(
                "SELECT bill, worker_id, endpoint, started, stopped, seconds, cost, price, "
                "closed FROM ledger WHERE bill IS NOT NULL"
            )
        }
    finally:
        db.close()
    out: dict[str, Any] = {"bills": {}, "endpoints": {}, "mismatches": [], "overlaps": [],
                           "open": [], "closed": {}}  # fmt: skip
    spans: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    for bill, steps in history.items():
        wid, ep = owner[bill]
        starts = [t for s, t, _ in steps if s == m.INITIALIZING]
        ends = [t for s, t, _ in steps if s == "Exited"]
        voided = any(s == m.THROTTLED for s, _, _ in steps)
        row = ledger.get(bill)
        if voided:
            if row is not None:
                out["mismatches"].append(f"{bill} ({wid}): voided start, yet a ledger row")
            continue
        if len(starts) != 1 or len(ends) > 1:
            out["mismatches"].append(f"{bill} ({wid}): {len(starts)} starts, {len(ends)} ends")
            continue
        if row is None:
            out["mismatches"].append(f"{bill} ({wid}): a history but no ledger row")
            continue
        _, _, _, started, stopped, seconds, cost, price_, closed = row
        if not ends:
            out["open"].append(bill)
            if closed is not None:
                out["mismatches"].append(f"{bill} ({wid}): closed {closed!r}, no end recorded")
            spans.setdefault((ep, wid), []).append((starts[0], math.inf, bill))
            continue
        secs = billed_seconds(starts[0], ends[0])
        rec = {"worker_id": wid, "endpoint": ep, "started": starts[0], "stopped": ends[0],
               "seconds": secs, "cost": secs * (price_ or 0.0), "closed": closed,
               "states": [s for s, _, _ in steps]}  # fmt: skip
        out["bills"][bill] = rec
        out["closed"][closed] = out["closed"].get(closed, 0) + 1
        if closed is None:
            out["mismatches"].append(f"{bill} ({wid}): an end recorded, yet open in the ledger")
        if (started, stopped, seconds) != (starts[0], ends[0], secs):
            out["mismatches"].append(
                f"{bill} ({wid}): history {starts[0]}..{ends[0]} = {secs} s, ledger "
                f"{started}..{stopped} = {seconds} s"
            )
        if not math.isclose(cost, rec["cost"], rel_tol=1e-9, abs_tol=1e-12):
            out["mismatches"].append(f"{bill} ({wid}): cost {cost} != {secs} s x {price_}")
        e = out["endpoints"].setdefault(ep, {"seconds": 0, "cost": 0.0, "bills": 0})
        e["seconds"] += secs
        e["cost"] += rec["cost"]
        e["bills"] += 1
        spans.setdefault((ep, wid), []).append((starts[0], ends[0], bill))
    for bill in set(ledger) - set(history):
        out["mismatches"].append(f"{bill}: a ledger row without a state history")
    for (_, wid), xs in spans.items():
        xs.sort()
        for (_, e1, b1), (s2, _, b2) in itertools.pairwise(xs):
            # Two lifetimes of one slot never overlap: its second bill starts after the
            # first one's end (a slot has one process at a time).
            if e1 > s2:
                out["overlaps"].append(f"{wid}: {b1} ends at {e1}, after {b2} starts at {s2}")
    return out

"""Billing: a worker's price, what a job cost, the ledger of worker lifetimes, and the billing
views.

A worker is billed from the moment its start is asked for (``start_signal``) until its process
has fully stopped, per second rounded up, at the price of the hardware it got (the GPU type
times ``gpu_count``). Throttled and Unhealthy slots hold no process and cost nothing. The
ledger (SQLite) gets one row per worker lifetime; all-time totals are its sums, session totals
count since this control plane started. A job's cost is its share: its execution time, plus
the cold start it waited for, at its worker's price.
"""

from __future__ import annotations

import math
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


class Ledger:
    """The control plane's bills. ``cp.ledger``; ``cp.billing()`` is its view."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp

    price = staticmethod(price)

    def load(self) -> None:
        """All-time totals per endpoint, from the ledger (at start)."""
        store = self.cp.store
        for ep in self.cp.endpoints.values():
            tot = store.ledger_total(ep.name, ep.created)
            ep.billed_seconds, ep.billed_cost = int(tot["seconds"]), tot["cost"]

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

    def close(self, ep: m.EndpointState, w: m.Worker, stopped: float) -> None:
        """A worker's process has fully stopped: its bill goes into the ledger."""
        if w.start_signal is None:
            return
        secs = max(1, math.ceil(stopped - w.start_signal))
        cost = secs * w.price
        ep.billed_seconds += secs
        ep.billed_cost += cost
        ep.session_seconds += secs
        ep.session_cost += cost
        self.cp.store.add_ledger(w.id, ep.name, w.hardware, w.emulated, w.start_signal,
                                 stopped, secs, cost)  # fmt: skip
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
        }

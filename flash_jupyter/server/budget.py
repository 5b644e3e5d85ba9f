"""The spending guard: a limit on what this control plane's session spends, overall or per
endpoint.

"Spent" is the session's billed cost (``billing.py``: every bill closed since the control
plane started, endpoints deleted since included, plus the running workers up to now). The
state is ``ok``, ``near`` (at ``NEAR_FRACTION`` of the limit) or ``reached``. At ``reached``
new jobs are refused before anything is recorded (HTTP 402, a wire submit ends FAILED with
``BudgetExceeded``), jobs still queued fail the same way, running jobs finish, and every
idle worker stops at once (``min`` included), the others as they become idle
(``Scheduler.reconcile`` hands a blocked endpoint to ``enforce``).

The limits are kept in ``flash.db`` (the ``settings`` table), so they hold after a restart of
the control plane; the spend they are compared with is the new session's, as ``/v1/billing``'s
``session`` is. The state is evaluated by the ticker (only while a limit is set), when a
bill closes, at each submit (at most every ``SUBMIT_RECHECK`` seconds) and when a view is
asked for; a ``budget`` event (the view) is published only when a limit or a state changes.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any

from .. import catalog
from ..catalog import money
from ..errors import BudgetExceeded
from . import model as m

if TYPE_CHECKING:
    from .control import ControlPlane

NEAR_FRACTION = 0.8
OK, NEAR, REACHED = "ok", "near", "reached"
SETTING = "budget"  # its key in the store's settings table
SUBMIT_RECHECK = 0.01  # seconds: a burst of submits evaluates the spend once


def parse_limit(value: Any) -> float | None:
    """A limit as given in a request: a number of US dollars, 0 or more, or None / "off" to
    clear it. Anything else is a ValueError saying what is accepted (HTTP 400)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f'a budget limit is a number of US dollars (0 or more), or null or "off" to '
            f"clear it; got {_short(value)}"
        )
    try:
        v = float(value)
    except OverflowError:  # a whole number too big for a float (JSON allows any length)
        v = math.inf
    if not math.isfinite(v) or v < 0:
        raise ValueError(
            f"a budget limit must be a finite number of US dollars, 0 or more; got {_short(value)}"
        )
    return v


def _short(value: Any) -> str:
    """``repr(value)``, cut short: an error message need not echo a 4000-digit number."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return "a number too long to show"
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _warn(message: str) -> None:
    """A note in the control plane's log about the stored limits (read at start)."""
    print(f"flash-jupyter: budget: {message}; set it again with `flash-jupyter budget`",
          file=sys.stderr)  # fmt: skip


def _plain(v: float) -> str:
    """A number to type in a command: 5, 0.25, 0.00004."""
    if v >= 1:
        return str(math.ceil(v))
    if v >= 0.01:
        return f"{math.ceil(v * 100) / 100:.2f}".rstrip("0")
    return f"{v:.8f}".rstrip("0").rstrip(".") or "1"


def _state(spent: float, limit: float | None) -> str:
    if limit is None:
        return OK
    if spent >= limit:
        return REACHED
    return NEAR if spent >= NEAR_FRACTION * limit else OK


class Budget:
    """``cp.budget``: the limits, the states, and what happens at ``reached``."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp
        self.limit: float | None = None
        self.ep_limits: dict[str, float] = {}
        self.closed = 0.0  # bills closed this session, all endpoints (deleted ones too)
        self.state = OK
        self.ep_states: dict[str, str] = {}
        self._blocked_all = False
        self._blocked: set[str] = set()
        self._published: tuple | None = None
        self._checked = -math.inf  # cp.clock() of the last evaluation at a submit

    @property
    def active(self) -> bool:
        """A limit is set (otherwise nothing is evaluated at all)."""
        return self.limit is not None or bool(self.ep_limits)

    # -- persistence
    def load(self) -> None:
        """The limits kept in flash.db (at start). A hand-edited row never stops the control
        plane from starting, and one bad part costs only that part: every limit that still
        reads is kept (a bad endpoint entry must not lift the session's limit), and what
        is dropped is said in the control plane's log."""
        self.limit, self.ep_limits = None, {}
        try:
            stored = self.cp.store.load_setting(SETTING)
        except (ValueError, TypeError):  # not JSON text at all
            _warn("its stored value is not JSON; no limit is set")
            stored = None
        if stored is None:
            stored = {}
        if not isinstance(stored, dict):
            _warn(f"its stored value is not an object ({type(stored).__name__}); no limit is set")
            stored = {}
        try:
            self.limit = parse_limit(stored.get("limit"))
        except ValueError as e:
            _warn(f"the session's stored limit is dropped: {e}")
        endpoints = stored.get("endpoints") or {}
        if not isinstance(endpoints, dict):
            _warn("the stored endpoint limits are not an object; they are dropped")
            endpoints = {}
        for name, value in endpoints.items():
            try:
                limit = parse_limit(value)
            except ValueError as e:
                _warn(f"the stored limit of endpoint {name!r} is dropped: {e}")
                continue
            if limit is not None:
                self.ep_limits[str(name)] = limit
        self.evaluate(publish=False)

    def _save(self) -> None:
        self.cp.store.save_setting(SETTING, {"limit": self.limit, "endpoints": self.ep_limits})

    # -- the limits
    def set(self, limit: Any, endpoint: str | None = None) -> dict[str, Any]:
        """Set (or clear, with None or "off") the session's limit or an endpoint's."""
        value = parse_limit(limit)
        if endpoint is not None:
            if not isinstance(endpoint, str):
                raise ValueError(f"endpoint must be an endpoint's name, not {endpoint!r}")
            self.cp.endpoint(endpoint)  # NotFound: 404
            if value is None:
                self.ep_limits.pop(endpoint, None)
            else:
                self.ep_limits[endpoint] = value
        else:
            self.limit = value
        self._save()
        self._published = None  # the limit changed: the view goes out whatever the state
        return self.view()

    def endpoint_deleted(self, name: str) -> None:
        if self.ep_limits.pop(name, None) is not None:
            self._save()
        self.ep_states.pop(name, None)
        self._blocked.discard(name)

    # -- spend and state
    def spend(self) -> tuple[float, dict[str, float]]:
        """(the session's spend, each endpoint's), running workers counted up to now."""
        cp = self.cp
        now = cp.wall()
        per: dict[str, float] = {}
        live_total = 0.0
        for ep in cp.endpoints.values():
            live = sum(w.billed_seconds(now) * w.price for w in ep.workers.values() if w.live)
            per[ep.name] = ep.session_cost + live
            live_total += live
        return self.closed + live_total, per

    def on_bill(self, cost: float) -> None:
        """A worker's bill closed (``Ledger.close``)."""
        self.closed += cost
        if self.active:
            self.evaluate()

    def evaluate(self, publish: bool = True) -> tuple[float, dict[str, float]]:
        """Compute the states now; act on a change (publish, block or unblock endpoints)."""
        cp = self.cp
        total, per = self.spend()
        self.state = _state(total, self.limit)
        self.ep_states = {n: _state(s, self.ep_limits.get(n)) for n, s in per.items()}
        blocked_all = self.state == REACHED
        blocked = {n for n, st in self.ep_states.items() if st == REACHED}
        changed = {n for n in per if (blocked_all or n in blocked) != self.blocks(n)}
        self._blocked_all, self._blocked = blocked_all, blocked
        for name in changed:
            cp.kick(name)  # reconcile enforces the guard, or brings min workers back
        key = (self.limit, tuple(sorted(self.ep_limits.items())), self.state,
               tuple(sorted(self.ep_states.items())))  # fmt: skip
        if publish and key != self._published:
            self._published = key
            if cp.events.active:
                cp.events.publish("budget", **self._view(total, per))
        elif not publish:
            self._published = key
        return total, per

    def blocks(self, name: str) -> bool:
        """New work on this endpoint is refused, and its idle workers go (cheap)."""
        return self._blocked_all or name in self._blocked

    def refusal(self, name: str, total: float | None = None, per: dict | None = None) -> str:
        """Why a job on ``name`` is refused, and what to do."""
        if total is None or per is None:
            total, per = self.spend()
        if self._blocked_all and self.limit is not None:
            sug = _plain(2 * self.limit if 2 * self.limit > total else 2 * total)
            return (
                f"budget of {money(self.limit)} for this session reached ({money(total)} "
                f"spent); raise it with `flash-jupyter budget {sug}` or `%flash budget {sug}`"
            )
        limit, spent = self.ep_limits.get(name, 0.0), per.get(name, 0.0)
        sug = _plain(2 * limit if 2 * limit > spent else 2 * spent)
        return (
            f"budget of {money(limit)} for endpoint {name!r} reached ({money(spent)} spent); "
            f"raise it with `flash-jupyter budget {sug} --endpoint {name}` or "
            f"`%flash budget {sug} --endpoint {name}`"
        )

    def check_submit(self, name: Any) -> None:
        """Raise BudgetExceeded if a new job on ``name`` must be refused (before anything
        about it is recorded). Cheap without a limit."""
        if not self.active:
            return
        now = self.cp.clock()
        if now - self._checked >= SUBMIT_RECHECK:
            self._checked = now
            self.evaluate()
        if isinstance(name, str) and self.blocks(name):
            raise BudgetExceeded(self.refusal(name), None if self._blocked_all else name)

    # -- at "reached"
    def enforce(self, ep: m.EndpointState) -> None:
        """The endpoint is blocked: queued jobs fail, idle workers stop now; busy ones go
        when their jobs are over (reconcile comes back here as each one ends)."""
        cp = self.cp
        if ep.queue:
            why = self.refusal(ep.name)
            err = {"type": "BudgetExceeded", "message": f"not started: {why}"}
            if not self._blocked_all:
                err["endpoint"] = ep.name
            queued, ep.queue = list(ep.queue), type(ep.queue)()
            for jid in queued:
                job = cp.jobs.get(jid)
                if job is not None and job.status == m.IN_QUEUE:
                    cp._finish(job, m.FAILED, error=dict(err))
        for w in ep.workers.values():
            if w.live and not w.jobs and not w.stopping:
                cp.lifecycle.stop(w, "stopped: the budget was reached")
            elif w.state == m.THROTTLED:
                w.state, w.reason = m.IDLE, ""
                cp._publish_worker(w)

    # -- views
    def view(self) -> dict[str, Any]:
        """``GET /v1/budget`` (and the ``budget`` event)."""
        total, per = self.evaluate()
        return self._view(total, per)

    def _view(self, total: float, per: dict[str, float]) -> dict[str, Any]:
        return {
            "currency": catalog.CURRENCY,
            "limit": self.limit,
            "spent": round(total, 8),
            "state": self.state,
            "near_fraction": NEAR_FRACTION,
            "since": self.cp.started,
            "endpoints": {
                n: {"limit": self.ep_limits.get(n), "spent": round(s, 8), "state": st}
                for n, s in per.items()
                for st in (self.ep_states.get(n, OK),)
            },
        }

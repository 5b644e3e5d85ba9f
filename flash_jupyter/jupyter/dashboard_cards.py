"""The dashboard's content as HTML and text: pure functions of the control plane's views.

A card is ``card_html(view, now, budget)``: nothing but the endpoint view (as ``/v1/endpoints``
and the event feed give it), the clock and the budget view, so it is tested without a kernel
and the same HTML serves the live widget and the static ``text/html`` fallback (nbconvert, a
front end without the widget manager). No ipywidgets here.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

from ..catalog import money
from ..status_text import format_spares, format_status

STATE_COLOURS = {
    "Initializing": "#b7791f",  # amber: starting
    "Idle": "#718096",  # grey: a slot with no process (costs nothing)
    "Running": "#2f855a",  # green: a process up (billed)
    "Throttled": "#6b46c1",  # purple: waiting for capacity
    "Outdated": "#c05621",  # orange: finishing its job, then replaced
    "Unhealthy": "#c53030",  # red: failed to start or crashed
}
BUSY_COLOUR = "#2b6cb0"
PHASES = {
    "environment": "building the environment",
    "process": "starting the process",
    "code": "loading the code",
}
BUDGET_COLOURS = {"ok": "#2f855a", "near": "#c05621", "reached": "#c53030"}

CARD_STYLE = (
    "font-family: var(--jp-ui-font-family, sans-serif); font-size: 12px; "
    "border: 1px solid #d0d7de; border-radius: 6px; padding: 6px 10px; margin: 4px 0"
)


def countdown(w: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds left before this idle warm worker scales down, counted from when its view
    arrived (``_at``, monotonic); None when it stays (busy, needed, not running)."""
    left = w.get("scale_down_in_s")
    if left is None or w.get("busy") or w.get("state") != "Running":
        return None
    at = w.get("_at")
    if at is not None:
        left -= (time.monotonic() if now is None else now) - at
    return max(0.0, left)


def has_countdown(view: dict[str, Any]) -> bool:
    """Whether the card shows a countdown (and so needs the shared one-second tick)."""
    return any(countdown(w) is not None for w in view.get("workers", []))


def seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def _badge(text: str, colour: str, title: str = "") -> str:
    t = f' title="{escape(title)}"' if title else ""
    return (
        f'<span{t} style="background:{colour}; color:white; border-radius:3px; '
        f'padding:0 5px; font-size:11px">{escape(text)}</span>'
    )


def hardware_text(view: dict[str, Any]) -> str:
    cfg = view.get("config", {})
    hw = view.get("hardware", "?")
    count = cfg.get("gpu_count") or 1
    if cfg.get("gpu") and count > 1:
        hw = f"{hw} x{count}"
    return hw + (", emulated on CPU" if view.get("emulated") else "")


def worker_row(w: dict[str, Any], now: float | None = None) -> str:
    state = w.get("state", "?")
    badge = _badge(state, STATE_COLOURS.get(state, "#4a5568"))
    detail = []
    if state == "Initializing" and w.get("phase"):
        detail.append(PHASES.get(w["phase"], w["phase"]))
    if w.get("busy"):
        detail.append(_badge("busy", BUSY_COLOUR, ", ".join(w.get("jobs") or [])))
    left = countdown(w, now)
    if left is not None:
        detail.append(f'<span class="fj-countdown">scales down in {left:.0f} s</span>')
    elif state == "Running" and not w.get("busy"):
        detail.append("warm")
    if w.get("reason"):
        detail.append(f'<span style="color:#718096">{escape(w["reason"])}</span>')
    billed = ""
    if w.get("billed_seconds"):
        billed = (
            _badge("$", "#975a16", "billed: this worker has a process") + " "
            f"{w['billed_seconds']} s, {money(w.get('cost'))}"
        )
    cold = "" if w.get("cold_start_ms") is None else f"cold start {seconds(w['cold_start_ms'])}"
    cells = [
        f"<code>{escape(w.get('id', '?'))}</code>",
        badge,
        " ".join(d if d.startswith("<") else escape(d) for d in detail),
        escape(w.get("hardware_label") or w.get("hardware") or ""),
        cold,
        billed,
    ]
    return "<tr>" + "".join(f'<td style="padding:1px 8px 1px 0">{c}</td>' for c in cells) + "</tr>"


def remote_state_lines(view: dict[str, Any]) -> list[str]:
    out = []
    for w in view.get("workers", []):
        for session, st in sorted((w.get("remote_state") or {}).items()):
            out.append(
                f"{escape(w['id'])} keeps {escape(st.get('notebook') or session)}'s "
                f"{escape(', '.join(st.get('names', [])))} ({st.get('bytes', 0) / 1e6:.1f} MB)"
            )
        for session, st in sorted((w.get("lost_state") or {}).items()):
            out.append(
                f'<span style="color:#c53030">{escape(st.get("notebook") or session)} lost '
                f"{escape(', '.join(st.get('names', [])))} when {escape(w['id'])} went</span>"
            )
    return out


def budget_html(b: dict[str, Any] | None, label: str = "budget") -> str:
    """``$spent of $limit`` coloured by state; empty without a limit."""
    if not b or b.get("limit") is None:
        return ""
    state = b.get("state", "ok")
    text = f"{label} {money(b.get('spent'))} of {money(b['limit'])}"
    if state == "near":
        text += " (near the limit)"
    elif state == "reached":
        text += " (reached: new jobs are refused)"
    colour = BUDGET_COLOURS.get(state, "#2f855a")
    weight = "bold" if state != "ok" else "normal"
    return f'<span style="color:{colour}; font-weight:{weight}">{escape(text)}</span>'


def card_html(
    view: dict[str, Any], now: float | None = None, budget: dict[str, Any] | None = None
) -> str:
    """One endpoint's card (without its buttons)."""
    cfg = view.get("config", {})
    jobs = view.get("health", {}).get("jobs", {})
    deps = cfg.get("dependencies") or []
    head = (
        f"<b>{escape(view['name'])}</b> &middot; {escape(hardware_text(view))} &middot; "
        f"workers {cfg.get('workers_min', '?')}..{cfg.get('workers_max', '?')} &middot; "
        f"idle timeout {cfg.get('idle_timeout', 0):g} s &middot; "
        + (f"dependencies: {escape(', '.join(deps))}" if deps else "no dependencies")
    )
    starts = view.get("starts") or {}
    queue = view.get("queue", jobs.get("inQueue", 0))
    stats = (
        f"queue {queue} &middot; running {jobs.get('inProgress', 0)} &middot; "
        f"done {jobs.get('completed', 0)} &middot; failed {jobs.get('failed', 0)}"
    )
    if starts:
        stats += (
            f" &middot; cold starts {starts.get('cold', 0)} (last "
            f"{seconds(starts.get('last_cold_ms'))}, mean {seconds(starts.get('mean_cold_ms'))})"
            f" &middot; warm starts {starts.get('warm', 0)}"
        )
    est = " (estimate: emulated on CPU)" if view.get("emulated") else ""
    cost = (
        f"cost this session {money(view.get('session_cost'))}, all time {money(view.get('cost'))}"
    )
    ep_budget = budget_html(((budget or {}).get("endpoints") or {}).get(view["name"]))
    cost += est + (f" &middot; {ep_budget}" if ep_budget else "")
    workers = view.get("workers", [])
    if workers:
        rows = "".join(worker_row(w, now) for w in workers)
        table = f'<table style="border-collapse:collapse; margin:3px 0">{rows}</table>'
    else:
        table = '<div style="color:#718096">no workers: the first call starts one</div>'
    state = remote_state_lines(view)
    extra = "".join(f"<div>{line}</div>" for line in state)
    return (
        f'<div class="fj-card" data-endpoint="{escape(view["name"])}" style="{CARD_STYLE}">'
        f"<div>{head}</div><div>{stats}</div>{table}{extra}<div>{cost}</div></div>"
    )


def spares_html(spares: list[dict[str, Any]] | None) -> str:
    """The spare workers (``/v1/info``'s ``provider.spares``), one line each, as
    ``flash-jupyter status`` writes them; empty without any."""
    lines = format_spares(spares or [])
    if not lines:
        return ""
    *each, note = lines
    items = "".join(f"<div>{escape(line)}</div>" for line in each)
    return (f'<div style="font-size:12px; margin:2px 0; color:#4a5568">{items}'
            f'<div style="color:#718096">{escape(note)}</div></div>')  # fmt: skip


def header_html(
    endpoints: list[dict[str, Any]],
    budget: dict[str, Any] | None,
    connected: bool = True,
    message: str = "",
    spares: list[dict[str, Any]] | None = None,
) -> str:
    """The line above the cards (endpoints, session cost, budget), then the spare workers."""
    session = sum(float(v.get("session_cost") or 0) for v in endpoints)
    est = " (estimate)" if any(v.get("emulated") for v in endpoints) else ""
    parts = [
        f"<b>flash-jupyter</b> &middot; {len(endpoints)} endpoint"
        f"{'' if len(endpoints) == 1 else 's'} &middot; session cost {money(session)}{est}"
    ]
    b = budget_html(budget, "session budget")
    parts.append(b or '<span style="color:#718096">no budget (%flash budget 2.50 sets one)</span>')
    if not connected:
        parts.append(f'<span style="color:#c53030">{escape(message or "not connected")}</span>')
    head = f'<div style="font-size:12px; margin:2px 0">{" &middot; ".join(parts)}</div>'
    return head + spares_html(spares)


def page_html(
    endpoints: list[dict[str, Any]],
    budget: dict[str, Any] | None,
    now: float | None = None,
    connected: bool = True,
    message: str = "",
    spares: list[dict[str, Any]] | None = None,
) -> str:
    """The whole dashboard as static HTML (the ``text/html`` fallback)."""
    cards = "".join(card_html(v, now, budget) for v in endpoints)
    return header_html(endpoints, budget, connected, message, spares) + (
        cards or '<div style="color:#718096">no endpoints yet</div>'
    )


def page_text(
    endpoints: list[dict[str, Any]],
    budget: dict[str, Any] | None,
    connected: bool = True,
    message: str = "",
    spares: list[dict[str, Any]] | None = None,
) -> str:
    """The whole dashboard as text (the ``text/plain`` fallback): ``%flash status --text``
    (the spare workers included) plus the session's cost and budget."""
    lines = [format_status(endpoints, None, spares)]
    session = sum(float(v.get("session_cost") or 0) for v in endpoints)
    lines.append(f"session cost {money(session)}")
    if budget and budget.get("limit") is not None:
        lines.append(
            f"session budget {money(budget.get('spent'))} of {money(budget['limit'])} "
            f"({budget.get('state', 'ok')})"
        )
    if not connected and message:
        lines.append(message)
    return "\n".join(lines)

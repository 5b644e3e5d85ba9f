"""The control plane's endpoints as text: ``flash-jupyter status`` and ``%flash status``.

Plain functions over the ``/v1`` views (dicts), so the CLI and the magics share them without
either importing the other.
"""

from __future__ import annotations

from typing import Any

from .catalog import money


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*map(str, r)) for r in rows)])


def format_spares(spares: list[dict[str, Any]]) -> list[str]:
    """``/v1/info``'s ``provider.spares`` as lines: "spare (environment py311-abc,
    preloaded: torch, numpy): ready". A spare holds a worker slot and is billed to nobody
    until a cold start adopts it."""
    out = []
    for sp in spares:
        names = sp.get("preloaded") if sp.get("state") == "ready" else sp.get("preload")
        what = ", ".join(names or []) or "nothing"
        verb = "preloaded" if sp.get("state") == "ready" else "importing"
        failed = f"; failed to import {', '.join(sp['failed'])}" if sp.get("failed") else ""
        out.append(f"spare (environment {sp['environment']}, {verb}: {what}{failed}): "
                   f"{sp['state']}")  # fmt: skip
    if out:
        out.append("spares hold worker slots and are billed to no endpoint until a cold start "
                   "adopts one")  # fmt: skip
    return out


def format_status(
    endpoints: list[dict[str, Any]],
    billing: dict[str, Any] | None = None,
    spares: list[dict[str, Any]] | None = None,
) -> str:
    """A text dashboard: one block per endpoint, one line per worker slot; then the spare
    workers (``spares``: ``/v1/info``'s ``provider.spares``), if given."""
    if not endpoints:
        return "\n".join(["no endpoints yet", *format_spares(spares or [])])
    out = []
    for ep in endpoints:
        c = ep["config"]
        jobs = ep["health"]["jobs"]
        est = " (estimate: emulated on CPU)" if ep.get("emulated") else ""
        cancelled = f"{jobs['cancelled']} cancelled, " if jobs.get("cancelled") else ""
        out.append(
            f"{ep['name']}  {ep['hardware']}  workers {c['workers_min']}..{c['workers_max']}  "
            f"idle_timeout {c['idle_timeout']:g}s  jobs: {jobs['inQueue']} queued, "
            f"{jobs['inProgress']} running, {jobs['completed']} done, {jobs['failed']} failed, "
            f"{cancelled}{jobs['retried']} retried  cost ${ep['cost']:.6f}{est}"
        )
        rows = [
            [
                w["id"],
                w["state"],
                w.get("hardware_label") or w["hardware"],
                "busy" if w["busy"] else "",
                "" if w["cold_start_ms"] is None else f"{w['cold_start_ms']:.0f} ms",
                f"{w['billed_seconds']} s",
                w["reason"],
            ]
            for w in ep["workers"]
        ]
        head = ["worker", "state", "hardware", "", "cold start", "billed", "note"]
        out.append("  " + table(rows, head).replace("\n", "\n  "))
        for w in ep["workers"]:
            for session, st in (w.get("remote_state") or {}).items():
                out.append(
                    f"  {w['id']} keeps {st.get('notebook') or session}'s "
                    f"{', '.join(st['names'])} ({st['bytes'] / 1e6:.1f} MB): "
                    f"lost when it scales down"
                )
            mem = w.get("gpu_memory")
            if mem:  # as torch counted it after the worker's last job
                out.append(
                    f"  {w['id']} holds {mem['allocated_bytes'] / 2**20:.0f} MiB of GPU memory "
                    f"({mem['reserved_bytes'] / 2**20:.0f} MiB reserved by torch)"
                )
    if billing:
        tag = " (estimate at list price)" if billing.get("estimate") else ""
        out.append(f"total ${billing['total']:.6f}{tag}; prices as of {billing['prices_as_of']}")
    out.extend(format_spares(spares or []))
    return "\n".join(out)


def parse_budget(text: str) -> float | None:
    """A budget as typed (``flash-jupyter budget``, ``%flash budget``): ``off`` (None) or a
    number of US dollars, 0 or more ("$2.50" works too; 0 refuses every new job)."""
    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    try:
        v = float(t.removeprefix("$"))
    except ValueError:
        v = -1.0
    if not v >= 0 or v == float("inf"):
        raise ValueError(
            f"a budget is a number of US dollars, 0 or more (e.g. 2.50), or off; not {text!r}"
        )
    return v


def format_budget(view: dict[str, Any], endpoint: str | None = None, how: str = "") -> str:
    """The spending guard (``/v1/budget``'s view) as text: the session's line, then each
    endpoint with a limit (or the one asked for). ``how``: the command that sets one."""

    def line(what: str, v: dict[str, Any]) -> str:
        spent = money(v.get("spent") or 0.0)
        if v.get("limit") is None:
            return f"{what}: no limit ({spent} spent)"
        pct = f", {v['spent'] / v['limit']:.0%}" if v["limit"] else ""
        state = {"near": "near the limit", "reached": "REACHED"}.get(v["state"], v["state"])
        return f"{what}: {money(v['limit'])}, {spent} spent{pct}: {state}"

    eps = view.get("endpoints") or {}
    lines = [line("budget for this session", view)]
    for name, v in sorted(eps.items()):
        if v.get("limit") is not None or name == endpoint:
            lines.append("  " + line(f"endpoint {name}", v))
    how = how or "flash-jupyter budget"
    if view.get("state") == "reached" or any(v.get("state") == "reached" for v in eps.values()):
        lines.append(
            f"new jobs are refused where the budget is reached; raise it with `{how} LIMIT "
            f"[--endpoint NAME]`, or clear it with `{how} off`"
        )
    elif view.get("limit") is None and not any(v.get("limit") is not None for v in eps.values()):
        lines.append(f"set one with `{how} 2.50` (US dollars; --endpoint NAME for one endpoint)")
    return "\n".join(lines)

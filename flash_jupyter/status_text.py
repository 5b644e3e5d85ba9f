"""The control plane's endpoints as text: ``flash-jupyter status`` and ``%flash status``.

Plain functions over the ``/v1`` views (dicts), so the CLI and the magics share them without
either importing the other.
"""

from __future__ import annotations

from typing import Any


def table(rows: list[list[str]], head: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*map(str, r)) for r in rows)])


def format_status(endpoints: list[dict[str, Any]], billing: dict[str, Any] | None = None) -> str:
    """A text dashboard: one block per endpoint, one line per worker slot."""
    if not endpoints:
        return "no endpoints yet"
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
    if billing:
        tag = " (estimate at list price)" if billing.get("estimate") else ""
        out.append(f"total ${billing['total']:.6f}{tag}; prices as of {billing['prices_as_of']}")
    return "\n".join(out)

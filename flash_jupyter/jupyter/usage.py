"""What this process used, and ``%flash cost``: the session's bill beside a whole-kernel GPU.

Every call and cell notes its endpoint here (``note``: one dict look-up on the hot path);
the first use of each GPU type is when a whole-kernel GPU notebook would have had to take
that GPU and keep it. ``cost_view`` puts the control plane's session bill for the endpoints
this process used beside what holding those GPUs since their first use would have cost at
the same per-second price.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

from ..catalog import money
from .receipts import seconds

# (endpoint, gpu, cpu, gpu_count) -> its hardware name; the endpoints in order of first use
_seen: dict[tuple, str] = {}
_endpoints: dict[str, str] = {}  # endpoint -> hardware


@dataclass
class GpuHeld:
    """A GPU type this process used: since when, how many at most, at what price."""

    hardware: str
    since: float  # wall time of the first cell or call on it
    count: int  # GPUs per worker (the most asked for)
    price_per_gpu: float  # USD per second

    def cost(self, now: float) -> float:
        return (now - self.since) * self.count * self.price_per_gpu


_gpus: dict[str, GpuHeld] = {}


def note(config: Any) -> None:
    """A call or cell is about to go to this endpoint (an ``EndpointConfig``)."""
    key = (config.name, config.gpu, config.cpu, config.gpu_count)
    if key in _seen:
        return
    hw = config.hardware
    _seen[key] = hw.name
    _endpoints[config.name] = hw.name
    if hw.kind == "gpu":
        held = _gpus.get(hw.name)
        if held is None:
            _gpus[hw.name] = GpuHeld(hw.name, time.time(), config.gpu_count, hw.price_per_second)
        elif config.gpu_count > held.count:
            held.count = config.gpu_count


def used_endpoints() -> dict[str, str]:
    """Endpoint -> hardware, for the endpoints this process sent work to."""
    return dict(_endpoints)


def gpus_held() -> list[GpuHeld]:
    return list(_gpus.values())


# ---------------------------------------------------------------- the view


@dataclass
class CostView:
    """``%flash cost``: a table and a bar, as text/plain and text/html."""

    rows: list[dict[str, Any]]  # per endpoint: name, hardware, seconds, cold, cost
    whole: list[dict[str, Any]]  # per GPU type: hardware, since, seconds, count, cost
    since: float | None  # the control plane session's start (wall time)
    now: float

    @property
    def flash_total(self) -> float:
        return sum(r["cost"] or 0.0 for r in self.rows)

    @property
    def whole_total(self) -> float:
        return sum(w["cost"] for w in self.whole)

    def _table(self) -> tuple[list[str], list[list[str]]]:
        head = ["endpoint", "hardware", "billed", "cold starts", "cost"]
        body = [[r["endpoint"], r["hardware"] or "?", seconds(r["seconds"]),
                 "?" if r["cold"] is None else str(r["cold"]), money(r["cost"])]
                for r in self.rows]  # fmt: skip
        body.append(["total", "", seconds(sum(r["seconds"] or 0 for r in self.rows)), "",
                     money(self.flash_total)])  # fmt: skip
        return head, body

    def _whole_rows(self) -> list[list[str]]:
        return [[f"{w['count']}× {w['hardware']}" if w["count"] > 1 else w["hardware"],  # noqa: RUF001
                 time.strftime("%H:%M:%S", time.localtime(w["since"])), seconds(w["seconds"]),
                 money(w["cost"])] for w in self.whole]  # fmt: skip

    def _bars(self) -> list[tuple[str, float]]:
        return [("flash (billed)", self.flash_total), ("whole-kernel GPU", self.whole_total)]

    def text(self) -> str:
        head, body = self._table()
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
        lines = ["this session's bill, for the endpoints this notebook used:"]
        lines += [fmt.format(*head), *(fmt.format(*r) for r in body)]
        lines.append("")
        if not self.whole:
            lines.append("no GPU cell or call in this kernel yet: nothing to compare with")
            return "\n".join(lines)
        lines.append("a whole-kernel GPU notebook (the GPU held from its first use to now):")
        for r in self._whole_rows():
            lines.append(f"  {r[0]} since {r[1]}: {r[2]}, {r[3]}")
        top = max(v for _, v in self._bars()) or 1.0
        for label, v in self._bars():
            n = round(40 * v / top)
            lines.append(f"{label:17} {'█' * n}{'░' * (40 - n)} {money(v)}")
        if self.whole_total > 0:
            lines.append(f"flash cost {100 * self.flash_total / self.whole_total:.0f}% of it")
        return "\n".join(lines)

    def html(self) -> str:
        head, body = self._table()
        th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                      for r in body)  # fmt: skip
        out = [f'<div class="flash-jupyter-cost"><p>This session\'s bill, for the endpoints '
               f"this notebook used:</p><table><tr>{th}</tr>{trs}</table>"]  # fmt: skip
        if not self.whole:
            out.append("<p>No GPU cell or call in this kernel yet: nothing to compare with.</p>")
        else:
            items = "".join(f"<li>{html.escape(r[0])} since {r[1]}: {r[2]}, {r[3]}</li>"
                            for r in self._whole_rows())  # fmt: skip
            out.append("<p>A whole-kernel GPU notebook (the GPU held from its first use to "
                       f"now):</p><ul>{items}</ul>")  # fmt: skip
            top = max(v for _, v in self._bars()) or 1.0
            for (label, v), colour in zip(self._bars(), ("#2da44e", "#cf222e"), strict=True):
                out.append(
                    f'<div style="display:flex;align-items:center;gap:8px;margin:2px 0">'
                    f'<span style="width:130px">{html.escape(label)}</span>'
                    f'<div style="width:300px;background:#eaeef2;height:12px">'
                    f'<div style="width:{100 * v / top:.2f}%;height:12px;background:{colour}">'
                    f"</div></div><span>{money(v)}</span></div>"
                )
        out.append("</div>")
        return "".join(out)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        return {"text/plain": self.text(), "text/html": self.html()}

    def __repr__(self) -> str:
        return self.text()


def cost_view(billing: dict[str, Any], endpoints: list[dict[str, Any]]) -> CostView:
    """The view from the control plane's ``/v1/billing`` and ``/v1/endpoints``."""
    now = time.time()
    views = {e.get("name"): e for e in endpoints}
    bill = billing.get("endpoints") or {}
    rows = []
    for name, hardware in _endpoints.items():
        b = bill.get(name) or {}
        starts = (views.get(name) or {}).get("starts") or {}
        rows.append({"endpoint": name, "hardware": b.get("hardware") or hardware,
                     "seconds": b.get("session_seconds", b.get("billed_seconds")),
                     "cold": starts.get("cold"),
                     "cost": b.get("session_cost", b.get("cost"))})  # fmt: skip
    whole = [{"hardware": g.hardware, "since": g.since, "seconds": now - g.since,
              "count": g.count, "cost": g.cost(now)} for g in _gpus.values()]  # fmt: skip
    return CostView(rows, whole, billing.get("since"), now)

"""A live event bus: job and worker state changes, output, billing ticks.

Consumers (the SSE route, later the widgets and the sidebar) subscribe with a queue; a slow
consumer loses its oldest events rather than slowing the control plane.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

MAX_BACKLOG = 5000


class EventBus:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[dict[str, Any]]] = set()
        self.seq = 0

    @property
    def active(self) -> bool:
        return bool(self._subs)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(MAX_BACKLOG)
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subs.discard(q)

    def publish(self, type_: str, **data: Any) -> None:
        if not self._subs:
            return
        self.seq += 1
        ev = {"type": type_, "seq": self.seq, "time": time.time(), **data}
        for q in self._subs:
            if q.full():
                try:
                    q.get_nowait()
                except asyncio.QueueEmpty:
                    pass
            q.put_nowait(ev)

"""One ``/v1/events`` subscription per Jupyter server, fanned out to every browser socket.

The subscription starts with the first socket and stops with the last, so an idle Lab
costs the control plane nothing. Each event's JSON text is forwarded as it came (parsed
once, not per socket). Messages a socket receives, in order:

- ``{"type": "control_plane", "running": true}`` then a ``snapshot`` (every endpoint's
  view) when it joins while the control plane answers, and again after each reconnect;
- the control plane's events (``endpoint``, ``job``, ``worker``, ``output``, ``budget``...);
- ``{"type": "control_plane", "running": false, "message": ...}`` when it is lost (or when
  it joins and there is none); the hub retries with backoff (0.25 s doubling to 5 s), and
  at once when ``kick`` is called (after ``POST /start``).

Bounds: an upstream line longer than ``event_feed.MAX_EVENT_BYTES`` is dropped as it
streams in; a socket that joins while events pour in holds at most ``MAX_BACKLOG`` of them
before its snapshot (past that it is closed, and the browser reconnects); a socket that
does not read is closed by its handler (``handlers.EventsHandler``). Whatever fails, the
subscription loop keeps going, and its messages never carry the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Protocol

import httpx

from ..event_feed import LineSplitter
from .relay import NotRunning, Relay, RelayError

BACKOFF_START = 0.25
BACKOFF_MAX = 5.0
# The control plane sends a keep-alive every 15 s: a read silent for longer is a lost link.
READ_TIMEOUT = 40.0
MAX_BACKLOG = 1000  # events held for a socket waiting for its own snapshot

WAITING, JOINING, LIVE = "waiting", "joining", "live"


class Sink(Protocol):
    def send(self, text: str) -> None:
        """Queue ``text`` for the browser; raise if the socket is gone (or was dropped)."""

    def drop(self, reason: str) -> None:
        """Close the socket: it fell too far behind (the browser reconnects)."""


def _control_plane(running: bool, message: str = "") -> str:
    msg: dict[str, Any] = {"type": "control_plane", "running": running}
    if message:
        msg["message"] = message
    return json.dumps(msg)


class EventHub:
    """The shared upstream subscription and the sockets it feeds."""

    def __init__(self, relay: Relay):
        self.relay = relay
        self.sinks: dict[Sink, str] = {}  # sink -> WAITING | JOINING | LIVE
        self.backlog: dict[Sink, list[str]] = {}  # JOINING sinks: events after they joined
        self.running: bool | None = None  # None: not known yet (connecting)
        self.message = ""
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._welcomes: set[asyncio.Task] = set()

    # -- sockets
    def add(self, sink: Sink) -> None:
        if self.running is True:
            self.sinks[sink] = JOINING
            self.backlog[sink] = []
            task = asyncio.ensure_future(self._welcome(sink))
            self._welcomes.add(task)
            task.add_done_callback(self._welcomes.discard)
        else:
            self.sinks[sink] = WAITING
            if self.running is False:
                self._send(sink, _control_plane(False, self.message))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def remove(self, sink: Sink) -> None:
        self.sinks.pop(sink, None)
        self.backlog.pop(sink, None)
        if not self.sinks and self._task is not None:
            self._task.cancel()
            self._task = None
            self.running = None

    def kick(self) -> None:
        """Try the control plane now (it was just started)."""
        self._wake.set()

    def _send(self, sink: Sink, text: str) -> None:
        try:
            sink.send(self.relay.scrub(text))
        except Exception:  # a socket that went: forget it
            self.remove(sink)

    async def _welcome(self, sink: Sink) -> None:
        """A socket that joined a live subscription: its own snapshot, then what it missed."""
        try:
            endpoints = await self.relay.request("GET", "/v1/endpoints")
        except (NotRunning, RelayError):
            endpoints = None
        if self.sinks.get(sink) != JOINING:
            return  # gone, or the upstream reconnected and welcomed it meanwhile
        if endpoints is None:
            self.sinks[sink] = WAITING  # the upstream loop notices the loss and retries
            self.backlog.pop(sink, None)
            return
        self._send(sink, _control_plane(True))
        self._send(sink, json.dumps({"type": "snapshot", "endpoints": endpoints}))
        for text in self.backlog.pop(sink, []):
            self._send(sink, text)
        if sink in self.sinks:
            self.sinks[sink] = LIVE

    def _broadcast(self, text: str) -> None:
        for sink, state in list(self.sinks.items()):
            if state == LIVE:
                self._send(sink, text)
            elif state == JOINING:
                backlog = self.backlog[sink]
                backlog.append(text)
                if len(backlog) > MAX_BACKLOG:
                    self.remove(sink)
                    with contextlib.suppress(Exception):
                        sink.drop("too many events before its snapshot; reconnect")

    # -- upstream
    def _down(self, message: str) -> None:
        for sink in self.sinks:
            self.sinks[sink] = WAITING
        self.backlog.clear()
        if self.running is not False or message != self.message:
            self.running, self.message = False, message
            for sink in list(self.sinks):
                self._send(sink, _control_plane(False, message))

    async def _run(self) -> None:
        delay = BACKOFF_START
        while self.sinks:
            try:
                await self._follow()
                message = "the control plane closed the event stream"
            except NotRunning as e:
                message = e.message
            except RelayError as e:
                message = e.message
            except httpx.HTTPError as e:
                message = f"lost the control plane's event stream ({type(e).__name__})"
            except Exception as e:  # never the loop's end; the text may echo a header
                message = f"lost the control plane's event stream ({type(e).__name__})"
                if message != self.message:  # once, not at every retry
                    self.relay.log_error("the event relay", e)
            if self.running:
                delay = BACKOFF_START  # it was up: try again soon
            self._down(message)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)
            delay = min(BACKOFF_MAX, delay * 2)

    async def _follow(self) -> None:
        info = await self.relay.info(refresh=True)
        timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
        async with self.relay.http(info).stream("GET", "/v1/events", timeout=timeout) as r:
            if r.status_code != 200:
                await r.aread()
                raise RelayError(r.status_code, f"/v1/events: HTTP {r.status_code}")
            first = True
            lines = LineSplitter()
            async for chunk in r.aiter_bytes():
                for line in lines.feed(chunk):
                    if line.startswith("data: "):  # not keep-alives and blank separators
                        first = self._take(line[6:], first)

    def _take(self, text: str, first: bool) -> bool:
        """One event's JSON text from upstream; whether the snapshot is still to come."""
        if not first:
            self._broadcast(text)
            return False
        # The snapshot: every socket that waits gets it.
        self.running, self.message = True, ""
        hello = _control_plane(True)
        for sink, state in list(self.sinks.items()):
            if state != LIVE:
                self.backlog.pop(sink, None)
                self.sinks[sink] = LIVE
                self._send(sink, hello)
                self._send(sink, text)
        return False

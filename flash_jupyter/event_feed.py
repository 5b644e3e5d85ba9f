"""One live view of the control plane per process, fed by its event stream.

``EventFeed`` holds a single ``GET /v1/events`` subscription (SSE) for everything in the
process that wants live state (every dashboard of a kernel, a script's own listener), so a
kernel showing 20 endpoints costs the control plane one stream, not a poll per widget. A
daemon thread reads the stream and keeps a current model: the endpoint views by name (from
the ``snapshot``, then kept up to date by ``endpoint``, ``worker``, ``job``, ``billing``,
``state_lost`` and ``budget`` events) and the budget view. Where an event only names an
endpoint (a job changed its queue, a bill closed), a second thread fetches that endpoint's
view again, coalesced and at most a few times a second per endpoint. Listeners are called
with each event once the model holds it. A dropped stream reconnects with backoff and starts
again from a fresh snapshot. The feed never starts a control plane (a dashboard must not keep
one alive); with none running it says so and keeps trying.

A garbled stream costs one event, never the feed: a line longer than ``MAX_EVENT_BYTES`` is
dropped as it streams in (never held whole), an event that is not a JSON object, or that the
model cannot take, is skipped, and the names it remembers are bounded. Nothing it says (a
dashboard shows its messages, and notebooks are saved) carries the control plane's token.

No IPython here: a plain script can use it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from . import envvars, errors

Listener = Callable[[dict[str, Any]], None]

REFETCH_GAP = 0.3  # seconds between two fetches of one endpoint's view
REFETCH_DEBOUNCE = 0.05  # a burst of events costs one fetch
BUDGET_KEY = "\0budget"  # the budget view, refetched like an endpoint's
BACKOFF = (0.2, 5.0)  # first and longest wait between reconnects
MAX_EVENT_BYTES = 16 * 1024 * 1024  # a longer SSE line or event is dropped, not held
MAX_NAMES = 4096  # endpoints waiting for a fetch, or remembered as deleted


class LineSplitter:
    """The lines of a byte stream, each at most ``limit`` bytes. A longer line is dropped
    while it streams in (its bytes are never held past the limit) and counted in
    ``dropped``; ``\r\n`` ends a line as ``\n`` does. Shared by the kernel's feed and
    the Jupyter server's relay (``labserver.events``)."""

    def __init__(self, limit: int = MAX_EVENT_BYTES):
        self.limit = limit
        self.dropped = 0
        self._buf = bytearray()
        self._skipping = False  # inside a line already too long

    def feed(self, chunk: bytes) -> list[str]:
        lines: list[str] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._skipping:
                if len(self._buf) + len(piece) > self.limit:
                    self._buf.clear()
                    self._skipping = True
                    self.dropped += 1
                else:
                    self._buf += piece
            if end < 0:
                return lines
            if not self._skipping:
                lines.append(bytes(self._buf).rstrip(b"\r").decode("utf-8", "replace"))
            self._buf.clear()
            self._skipping = False
            start = end + 1


class EventFeed:
    """The process's live model of the control plane; see the module docstring."""

    def __init__(self, linger: float = 30.0):
        self.linger = linger  # how long to stay subscribed once the last listener left
        self.endpoints: dict[str, dict[str, Any]] = {}  # replaced, never mutated in place
        self.budget: dict[str, Any] | None = None
        self.connected = False
        self.synced = threading.Event()  # set at each snapshot, cleared on a drop
        self.message = "connecting to the control plane"
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: dict[str, float] = {}  # name -> when to fetch its view
        self._last_fetch: dict[str, float] = {}
        # A fetch answered after the delete must not revive it (insertion-ordered, bounded).
        self._deleted: dict[str, None] = {}
        self._thread: threading.Thread | None = None
        self._response: Any = None
        self._stopping = False
        self._idle_since: float | None = None
        self._token = ""  # the control plane's token of the last connection (never shown)
        self._http: Any = None  # its own httpx.Client, made on first use
        self.skipped = 0  # events dropped as garbled (too long, not JSON, not a model fit)

    # ------------------------------------------------------------------ listeners
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(event)`` on the feed's thread after each event (keep it quick)."""
        with self._lock:
            if fn not in self._listeners:
                self._listeners.append(fn)
            self._idle_since = None
        self.start()

    def remove_listener(self, fn: Listener) -> None:
        """The feed stops ``linger`` seconds after its last listener left."""
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)
            if not self._listeners:
                self._idle_since = time.monotonic()
                self._wake.notify_all()
                timer = threading.Timer(self.linger + 0.05, self._end_if_idle)
                timer.daemon = True
                timer.start()

    def _end_if_idle(self) -> None:
        if self._should_stop():
            self._hang_up()

    def _hang_up(self) -> None:
        """Wake the reading thread out of its blocking read: shut the stream's socket down."""
        resp = self._response
        if resp is None:
            return
        try:
            sock = resp.extensions["network_stream"].get_extra_info("socket")
            sock.shutdown(socket.SHUT_RDWR)
        except Exception:
            try:
                resp.close()
            except Exception:
                pass

    def _emit(self, event: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(event)
            except Exception:  # a listener's bug must not end the feed
                pass

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="flash-events", daemon=True)
            self._thread.start()
            threading.Thread(target=self._refetcher, name="flash-refetch", daemon=True).start()

    def stop(self) -> None:
        """End the subscription now (``add_listener`` starts it again)."""
        with self._lock:
            self._stopping = True
            self._wake.notify_all()
        self._hang_up()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_synced(self, timeout: float = 5.0) -> bool:
        """Wait for the first snapshot (True) or give up after ``timeout`` (False)."""
        return self.synced.wait(timeout)

    def _should_stop(self) -> bool:
        if self._stopping:
            return True
        idle = self._idle_since
        return idle is not None and not self._listeners and time.monotonic() - idle > self.linger

    # ------------------------------------------------------------------ the stream
    def _target(self) -> tuple[Any, str, dict[str, str]]:
        """The HTTP client, base URL and headers to use now. The local control plane is
        looked up again each time (it may have restarted elsewhere), never started. The
        feed has its own HTTP client: it needs no wire connection (``client.get_client``
        would open one, and start a control plane that went away meanwhile)."""
        from . import client as fj_client

        url = envvars.get("FLASH_JUPYTER_URL")
        if url:
            token = envvars.get("FLASH_JUPYTER_TOKEN") or ""
            url = url.rstrip("/")
        else:
            info = fj_client.discover(autostart=False)
            url, token = info["url"], info.get("token", "")
        self._token = token
        with self._lock:
            if self._http is None:
                import httpx

                self._http = httpx.Client(timeout=30)
            http = self._http
        return http, url, {"Authorization": f"Bearer {token}"}

    def _run(self) -> None:
        import httpx

        delay = BACKOFF[0]
        while not self._should_stop():
            try:
                http, url, headers = self._target()
                timeout = httpx.Timeout(10, read=40)  # keep-alives come every 15 s
                with http.stream("GET", url + "/v1/events", headers=headers,
                                 timeout=timeout) as r:  # fmt: skip
                    if r.status_code != 200:
                        r.read()
                        raise errors.ControlPlaneError(
                            f"/v1/events answered HTTP {r.status_code}: {r.text[:200]}"
                        )
                    self._response = r
                    delay = BACKOFF[0]
                    self._read(r)
            except Exception as e:  # every failure means: try again later
                if self._should_stop():
                    break
                self._dropped(self._scrub(_describe(e)))
            finally:
                self._response = None
            if self._should_stop():
                break
            with self._lock:
                self._wake.wait(delay)
            delay = min(BACKOFF[1], delay * 2)
        self._dropped("the live view is stopped (no listener left)")
        with self._lock:
            self._thread = None
            self._wake.notify_all()
            again = bool(self._listeners) and not self._stopping  # one came as we ended
        if again:
            self.start()

    def _read(self, r: Any) -> None:
        lines = LineSplitter()
        data: list[str] = []
        size = 0  # of the event being read (its data lines together)
        for chunk in r.iter_bytes():
            if self._should_stop():
                return
            dropped = lines.dropped
            for line in lines.feed(chunk):
                if line.startswith("data:"):
                    size += len(line)
                    if size <= MAX_EVENT_BYTES:
                        data.append(line[5:].strip())
                    elif data:  # too big in all: the event is dropped
                        data = []
                        self.skipped += 1
                elif line == "":
                    if data:
                        self._take("\n".join(data))
                    data, size = [], 0
            self.skipped += lines.dropped - dropped
        raise errors.ControlPlaneError("the control plane closed the event stream")

    def _take(self, text: str) -> None:
        """One event's JSON text: into the model, then to the listeners; a garbled one
        (not JSON, not an object, or not what the model expects) is skipped."""
        try:
            event = json.loads(text)
            if not isinstance(event, dict):
                raise ValueError("an event is a JSON object")
            self._apply(event)
        except Exception:
            self.skipped += 1
            return
        self._emit(event)

    def _scrub(self, text: str) -> str:
        """``text`` without the control plane's token (an exception may echo a header)."""
        for token in (self._token, envvars.get("FLASH_JUPYTER_TOKEN") or ""):
            for t in (token, token.strip(), repr(token)[1:-1]):  # as is, and as repr() shows it
                if len(t) >= 4:
                    text = text.replace(t, "***")
        return text

    def _dropped(self, message: str) -> None:
        was = self.connected
        self.connected = False
        self.synced.clear()
        if was or message != self.message:
            self.message = message
            self._emit({"type": "connection", "connected": False, "message": message})

    # ------------------------------------------------------------------ the model
    def _apply(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        now = time.monotonic()
        if kind == "snapshot":
            eps = {}
            self._deleted.clear()
            views = ev.get("endpoints")
            for view in views if isinstance(views, list) else []:
                if _is_view(view):
                    _stamp(view, now)
                    eps[view["name"]] = view
            with self._lock:
                self.endpoints = eps
            self.connected = True
            self.message = "live"
            self.synced.set()
            self._emit({"type": "connection", "connected": True, "message": "live"})
            self._schedule(BUDGET_KEY)
        elif kind == "endpoint":
            name = ev.get("name")
            if not isinstance(name, str):
                return
            if ev.get("action") == "deleted":
                with self._lock:
                    self.endpoints = {k: v for k, v in self.endpoints.items() if k != name}
                    self._pending.pop(name, None)
                    self._deleted.pop(name, None)
                    self._deleted[name] = None
                    while len(self._deleted) > MAX_NAMES:  # the oldest deletes go first
                        del self._deleted[next(iter(self._deleted))]
            elif name:
                self._deleted.pop(name, None)
                self._schedule(name)
        elif kind == "worker":
            name = ev.get("endpoint")
            if not isinstance(ev.get("id"), str):
                raise ValueError("a worker event names its worker")
            w = {k: v for k, v in ev.items() if k not in ("type", "seq", "time")}
            w["_at"] = now
            with self._lock:
                view = self.endpoints.get(name)
                if view is not None:
                    workers = [x for x in view.get("workers", []) if x.get("id") != w["id"]]
                    workers.append(w)
                    workers.sort(key=lambda x: x["id"])
                    self.endpoints = {**self.endpoints, name: {**view, "workers": workers}}
            self._schedule(name)
        elif kind in ("job", "billing", "state_lost"):
            self._schedule(ev.get("endpoint"))
            if kind == "billing":
                self._schedule(BUDGET_KEY)
        elif kind == "budget":
            with self._lock:
                self.budget = {k: v for k, v in ev.items() if k not in ("type", "seq", "time")}

    def session_cost(self) -> float:
        """This control plane session's cost so far, over the endpoints it knows."""
        return sum(float(v.get("session_cost") or 0) for v in self.endpoints.values())

    # ------------------------------------------------------------------ refetching
    def _schedule(self, name: Any) -> None:
        if not name or not isinstance(name, str):
            return
        now = time.monotonic()
        with self._lock:
            if name not in self._pending and len(self._pending) < MAX_NAMES:
                due = max(now + REFETCH_DEBOUNCE, self._last_fetch.get(name, 0) + REFETCH_GAP)
                self._pending[name] = due
                self._wake.notify_all()

    def _refetcher(self) -> None:
        me = self._thread
        while True:
            with self._lock:
                while True:
                    if self._thread is not me:  # its stream thread ended
                        return
                    now = time.monotonic()
                    due = [n for n, t in self._pending.items() if t <= now]
                    if due:
                        break
                    soonest = min(self._pending.values(), default=now + 1.0)
                    self._wake.wait(max(0.01, soonest - now))
                for n in due:  # an event during the fetch schedules another one
                    del self._pending[n]
                    self._last_fetch[n] = now
                if len(self._last_fetch) > MAX_NAMES:  # older than the gap: no longer needed
                    self._last_fetch = {n: t for n, t in self._last_fetch.items()
                                        if now - t < REFETCH_GAP}  # fmt: skip
            for n in due:
                try:
                    self._fetch(n)
                except Exception:  # a garbled answer costs this view, never the thread
                    self.skipped += 1

    def _fetch(self, name: str) -> None:
        try:
            http, url, headers = self._target()
            path = "/v1/budget" if name == BUDGET_KEY else f"/v1/endpoints/{name}"
            r = http.get(url + path, headers=headers, timeout=10)
        except Exception:  # the stream's reconnect resyncs everything
            return
        if name == BUDGET_KEY:
            if r.status_code == 200:  # a control plane without budgets: none shown
                budget = r.json()
                if not isinstance(budget, dict):
                    raise ValueError("the budget view is a JSON object")
                with self._lock:
                    self.budget = budget
                self._emit({"type": "budget_view"})
            return
        if r.status_code == 404:
            with self._lock:
                self.endpoints = {k: v for k, v in self.endpoints.items() if k != name}
            self._emit({"type": "view", "name": name, "deleted": True})
            return
        if r.status_code != 200:
            return
        view = r.json()
        if not _is_view(view) or view["name"] != name:
            raise ValueError("an endpoint view is a JSON object with its name")
        _stamp(view, time.monotonic())
        with self._lock:
            if name in self._deleted:
                return
            self.endpoints = {**self.endpoints, name: view}
        self._emit({"type": "view", "name": name})


def _is_view(view: Any) -> bool:
    """An endpoint view the model can hold: an object with a name and a list of workers
    (objects, each with an id)."""
    if not isinstance(view, dict) or not isinstance(view.get("name"), str):
        return False
    workers = view.get("workers", [])
    return isinstance(workers, list) and all(
        isinstance(w, dict) and isinstance(w.get("id"), str) for w in workers
    )


def _stamp(view: dict[str, Any], now: float) -> None:
    """When each worker view arrived (``_at``, monotonic): countdowns run from there."""
    for w in view.get("workers", []):
        w["_at"] = now


def _describe(e: BaseException) -> str:
    if isinstance(e, errors.FlashError):
        return str(e)
    return f"lost the control plane's event stream ({type(e).__name__}: {e}); reconnecting"


_feed: EventFeed | None = None
_feed_lock = threading.Lock()


def get_feed() -> EventFeed:
    """The process-wide feed (one event subscription for the whole kernel)."""
    global _feed
    with _feed_lock:
        if _feed is None:
            _feed = EventFeed()
        return _feed

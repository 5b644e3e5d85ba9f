"""The live dashboard: ``flash_jupyter.dashboard()`` and ``%flash status``.

One card per endpoint (its content is ``dashboard_cards.card_html``, a pure function of the
endpoint view) with buttons acting through the process's ``Client``. Updates are pushed by
the process's ``EventFeed`` (one ``/v1/events`` subscription per kernel, whatever the number
of dashboards or endpoints). Each event only marks cards dirty; one renderer thread per
dashboard redraws the dirty cards at most ``1 / MIN_GAP`` times a second, and a card showing
a scale-down countdown is redrawn once a second while it shows one (one tick for all cards).
So the kernel stays responsive with many endpoints, and nothing runs while nothing changes.

``dashboard()`` returns the same live widget each time (one model, any number of views):
displaying it twice costs nothing more. Its ``_repr_mimebundle_`` carries ``text/plain``
and ``text/html`` beside the widget view, so a console, nbconvert or a front end without the
widget manager shows the status instead of a bare ``VBox(...)``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from ..event_feed import EventFeed, get_feed
from . import dashboard_cards as cards

MIN_GAP = 0.2  # seconds between two redraws: at most 5 a second
SYNC_WAIT = 5.0  # how long dashboard() waits for the first snapshot before showing
SPARES_EVERY = 2.0  # spares are not in the event feed: fetched at a redraw, this often at most


def _client() -> Any:
    from ..client import get_client

    return get_client()


def _small(text: str, style: str = "", tip: str = "") -> widgets.Button:
    return widgets.Button(description=text, button_style=style, tooltip=tip,
                          layout=widgets.Layout(width="auto"))  # fmt: skip


class Card(widgets.VBox):
    """One endpoint: its HTML body, its buttons, and a line for what the last action did."""

    def __init__(self, name: str, client: Callable[[], Any] = _client):
        self.name = name
        self._client = client
        self._range: tuple[int, int] | None = None
        self.body = widgets.HTML()
        self.warm_button = _small("Warm", "success", "start one worker now, without a job")
        self.min_input = widgets.BoundedIntText(min=0, max=1000, description="min",
                                                layout=widgets.Layout(width="110px"))  # fmt: skip
        self.max_input = widgets.BoundedIntText(min=0, max=1000, description="max",
                                                layout=widgets.Layout(width="110px"))  # fmt: skip
        self.scale_button = _small("Scale", "", "set the worker range to min..max")
        self.stop_button = _small("Stop", "warning", "stop every worker (min goes to 0)")
        self.purge_button = _small("Purge queue", "", "cancel every job still queued")
        self.delete_button = _small("Delete", "danger", "delete this endpoint")
        self.confirm_button = _small("Delete it", "danger")
        self.cancel_button = _small("Keep it")
        self.confirm_box = widgets.HBox(
            [widgets.HTML(f"Delete <b>{name}</b> and stop its workers?"),
             self.confirm_button, self.cancel_button],
            layout=widgets.Layout(display="none"),
        )  # fmt: skip
        self.message = widgets.HTML()
        self.warm_button.on_click(lambda _: self._act("warm", lambda c: c.warm(name, workers=1)))
        self.scale_button.on_click(lambda _: self._act("scale", self._scale))
        self.stop_button.on_click(lambda _: self._act("stop", lambda c: c.stop(name)))
        self.purge_button.on_click(lambda _: self._act("purge", lambda c: c.purge_queue(name)))
        self.delete_button.on_click(lambda _: self._confirm(True))
        self.cancel_button.on_click(lambda _: self._confirm(False))
        self.confirm_button.on_click(lambda _: self._act("delete", lambda c: c.delete(name)))
        controls = widgets.HBox(
            [self.warm_button, self.min_input, self.max_input, self.scale_button,
             self.stop_button, self.purge_button, self.delete_button]
        )  # fmt: skip
        super().__init__([self.body, controls, self.confirm_box, self.message])

    def show(self, view: dict[str, Any], budget: dict[str, Any] | None, now: float) -> None:
        self.body.value = cards.card_html(view, now, budget)
        cfg = view.get("config", {})
        rng = (int(cfg.get("workers_min", 0)), int(cfg.get("workers_max", 1)))
        if rng != self._range:  # only when it changed: never overwrite what is being typed
            self._range = rng
            self.min_input.value, self.max_input.value = rng

    def close(self) -> None:
        """Close the card and every widget in it (a container's close leaves its children)."""
        for w in (*self.children, *self.children[1].children, *self.confirm_box.children):
            w.close()
        super().close()

    def _confirm(self, ask: bool) -> None:
        self.confirm_box.layout.display = "flex" if ask else "none"

    def _scale(self, c: Any) -> Any:
        return c.scale(self.name, int(self.min_input.value), int(self.max_input.value))

    def _act(self, what: str, fn: Callable[[Any], Any]) -> None:
        """Run an action; say what it did, or its error, in the card (never raise)."""
        self._confirm(False)
        try:
            result = fn(self._client())
        except Exception as e:
            self.message.value = f'<span style="color:#c53030">{what} failed: {_esc(e)}</span>'
            return
        self.message.value = f'<span style="color:#2f855a">{_esc(_said(what, result))}</span>'


def _esc(x: Any) -> str:
    from html import escape

    return escape(str(x))


def _said(what: str, result: Any) -> str:
    if what == "purge" and isinstance(result, dict):
        n = result.get("removed", 0)
        return f"purged: {n} queued job{'' if n == 1 else 's'} cancelled"
    return {
        "warm": "warming a worker: it stays warm for the idle timeout once ready",
        "scale": "scaled",
        "stop": "stopping every worker",
        "delete": "deleted",
    }.get(what, what)


class Dashboard(widgets.VBox):
    """The live dashboard widget; see the module docstring."""

    def __init__(self, feed: EventFeed | None = None, client: Callable[[], Any] = _client):
        self._feed = feed or get_feed()
        self._client = client
        self.header = widgets.HTML()
        self.cards: dict[str, Card] = {}
        self.cards_box = widgets.VBox()
        self._cond = threading.Condition()
        self._dirty: set[str] = set()
        self._all = True
        self._countdowns: set[str] = set()  # cards showing a countdown: the one-second tick
        self._last_tick = 0.0
        self._closed = False
        self.renders = 0  # redraw passes so far (tests, and a curious user)
        self._spares: list[dict[str, Any]] = []
        self._spares_at = -SPARES_EVERY
        super().__init__([self.header, self.cards_box])
        self._feed.add_listener(self._on_event)
        self._feed.wait_synced(SYNC_WAIT)
        self._render(set(), True)
        self._thread = threading.Thread(target=self._loop, name="flash-dashboard", daemon=True)
        self._thread.start()

    # -- events mark cards dirty (on the feed's thread: quick)
    def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind in ("snapshot", "connection", "budget", "budget_view"):
            self._mark(None)
        elif kind == "view":
            self._mark(ev.get("name"))
        elif kind == "worker":
            self._mark(ev.get("endpoint"))
        elif kind == "endpoint" and ev.get("action") == "deleted":
            self._mark(ev.get("name"))

    def _mark(self, name: str | None) -> None:
        with self._cond:
            if name is None:
                self._all = True
            else:
                self._dirty.add(name)
            self._cond.notify()

    # -- one renderer thread: coalesced redraws and the countdown tick
    def _due(self) -> bool:
        if self._countdowns and time.monotonic() - self._last_tick >= 1.0:
            self._dirty |= self._countdowns
            self._last_tick = time.monotonic()
        return bool(self._dirty or self._all)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._due():
                    wait = None
                    if self._countdowns:
                        wait = max(0.05, 1.0 - (time.monotonic() - self._last_tick))
                    self._cond.wait(wait)
                if self._closed:
                    return
                dirty, everything = self._dirty, self._all
                self._dirty, self._all = set(), False
            try:
                self._render(dirty, everything)
            except Exception:  # a bad view must not end the live updates
                pass
            time.sleep(MIN_GAP)

    def _ordered(self) -> list[dict[str, Any]]:
        eps = self._feed.endpoints
        return sorted(eps.values(), key=lambda v: (v.get("created") or 0, v["name"]))

    def _render(self, dirty: set[str], everything: bool) -> None:
        views = self._ordered()
        budget = self._feed.budget
        now = time.monotonic()
        names = [v["name"] for v in views]
        if names != list(self.cards):
            old = self.cards
            self.cards = {n: old.pop(n, None) or Card(n, self._client) for n in names}
            self.cards_box.children = tuple(self.cards.values())
            for card in old.values():
                card.close()
            everything = True  # cheap: unchanged values send nothing
        for v in views:
            if everything or v["name"] in dirty:
                self.cards[v["name"]].show(v, budget, now)
                with self._cond:
                    if cards.has_countdown(v):
                        self._countdowns.add(v["name"])
                    else:
                        self._countdowns.discard(v["name"])
        with self._cond:
            self._countdowns &= set(names)
        self.header.value = cards.header_html(
            views, budget, self._feed.connected, self._feed.message, self._spare_views()
        )
        self.renders += 1

    def _spare_views(self) -> list[dict[str, Any]]:
        """The control plane's spare workers, as of at most SPARES_EVERY seconds ago (the
        last ones known if it cannot be asked)."""
        if time.monotonic() - self._spares_at >= SPARES_EVERY:
            self._spares_at = time.monotonic()
            try:
                self._spares = self._client().spares()
            except Exception:
                pass
        return self._spares

    # -- fallbacks for front ends without the widget manager
    def text(self) -> str:
        return cards.page_text(
            self._ordered(), self._feed.budget, self._feed.connected, self._feed.message,
            self._spare_views(),
        )  # fmt: skip

    def html(self) -> str:
        return cards.page_html(
            self._ordered(), self._feed.budget, None, self._feed.connected, self._feed.message,
            self._spare_views(),
        )  # fmt: skip

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        data = super()._repr_mimebundle_(**kwargs) or {}
        data["text/plain"] = self.text()
        data["text/html"] = self.html()
        return data

    def __repr__(self) -> str:
        return self.text()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop the live updates (the feed unsubscribes once no one listens)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._feed.remove_listener(self._on_event)
        for card in self.cards.values():
            card.close()
        super().close()


_current: Dashboard | None = None
_current_lock = threading.Lock()


def dashboard() -> Dashboard:
    """The kernel's live dashboard of every endpoint of the control plane (the same widget
    each time: display it wherever you like; ``close()`` ends it)."""
    global _current
    _client()  # connect (or start the machine-local control plane) here, errors to the caller
    with _current_lock:
        if _current is None or _current.closed:
            _current = Dashboard()
        return _current

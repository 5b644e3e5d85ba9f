"""What one notebook keeps on workers: per endpoint, the worker that holds its names (its
"home") and a proxy (``RemoteValue``) per name. Plain Python, no IPython: the magics own
one ``RemoteNames`` and hand it the notebook's namespace.

The rules, as Python's own would be:
- a proxy stands for its name only while the notebook still holds that proxy: a local
  ``m = ...`` or ``del m`` since then wins;
- names live on one worker incarnation; when the endpoint's cells land elsewhere, or the
  control plane says that worker went, its proxies are marked lost (saying why), so the next
  use says so instead of reading a stale copy.

The worker learns what became of the names it sent back, and of proxies the notebook let go,
from *notes* carried by the next cell of the endpoint: ``[name, cell, verdict]`` with verdict
"back" (it arrived here: the worker drops its copy), "stays" (this kernel could not rebuild
it: it is a remote name from now on) or "gone" (the notebook no longer holds its proxy).
A note is kept until a cell has run on the worker it is meant for.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any, NamedTuple

from .remote import RemoteValue


class Home(NamedTuple):
    """The worker incarnation holding an endpoint's remote names for this notebook."""

    worker: str
    incarnation: int
    hardware: str


MAX_NOTES = 512  # per worker: beyond, the oldest go (that worker keeps a few copies)
MAX_NOTED_WORKERS = 8  # per endpoint: notes for workers noted less recently go


class RemoteNames:
    def __init__(self) -> None:
        self.proxies: dict[str, dict[str, RemoteValue]] = {}  # endpoint -> name -> proxy
        self.home: dict[str, Home] = {}
        # endpoint -> (worker, incarnation) -> notes for that worker, oldest first
        self.notes: dict[str, dict[tuple[str, int], list[list[str]]]] = {}

    def on(self, endpoint: str) -> dict[str, RemoteValue]:
        """The live proxies of ``endpoint`` (name -> proxy)."""
        return self.proxies.get(endpoint, {})

    def prune(self, endpoint: str, ns: MutableMapping[str, Any]) -> dict[str, RemoteValue]:
        """Drop the proxies the notebook no longer holds (their worker may let them go);
        return those left."""
        mine = self.proxies.get(endpoint, {})
        for n in [n for n, p in mine.items() if ns.get(n) is not p]:
            p = mine.pop(n)
            if p.cell:
                self.note(endpoint, (p.worker, p.incarnation), n, p.cell, "gone")
        return mine

    def note(self, endpoint: str, worker: tuple[str, int], name: str, cell: str,
             verdict: str) -> None:  # fmt: skip
        """Tell ``worker`` (id, incarnation) with the endpoint's next cells what became of
        ``name``, which its cell ``cell`` left there: back, stays or gone."""
        by_worker = self.notes.setdefault(endpoint, {})
        notes = by_worker.pop(worker, [])
        by_worker[worker] = notes  # the most recently noted last
        notes.append([name, cell, verdict])
        del notes[:-MAX_NOTES]
        for key in list(by_worker)[:-MAX_NOTED_WORKERS]:
            del by_worker[key]

    def notes_for(self, endpoint: str) -> list[list[str]]:
        """Every note for the endpoint's workers: the next cell carries them all (one that
        reaches another worker matches nothing there)."""
        return [n for notes in self.notes.get(endpoint, {}).values() for n in notes]

    def delivered(self, endpoint: str, worker: tuple[str, int], sent: list[list[str]]) -> None:
        """A cell carrying ``sent`` ran on ``worker``: the notes meant for it are done."""
        notes = self.notes.get(endpoint, {}).get(worker)
        if notes:
            done = {tuple(n) for n in sent}
            notes[:] = [n for n in notes if tuple(n) not in done]
            if not notes:
                del self.notes[endpoint][worker]

    def affinity(self, endpoint: str, needs: list[str]) -> dict[str, Any] | None:
        """Route a cell to the worker holding this notebook's names there. ``strict``: the
        cell reads some of them, so no other worker will do."""
        home = self.home.get(endpoint)
        if home is None or not self.proxies.get(endpoint):
            return None
        return {"worker": home.worker, "incarnation": home.incarnation,
                "strict": bool(needs), "names": needs}  # fmt: skip

    def forget(
        self, endpoint: str, worker: str | None = None, why: str = "", gone: bool = True
    ) -> list[str]:
        """Mark the proxies of names that lived on ``worker`` (any, if None) as lost.
        ``gone``: that worker is gone, so notes for it are dropped too."""
        mine = self.proxies.get(endpoint, {})
        lost = sorted(n for n, p in mine.items() if worker is None or p.worker == worker)
        for n in lost:
            p = mine.pop(n)
            p.lost = why or f"{n} lived on worker {p.worker}, which is gone"
        self.home.pop(endpoint, None)
        if gone:
            notes = self.notes.get(endpoint, {})
            for key in [k for k in notes if worker is None or k[0] == worker]:
                del notes[key]
        return lost

    def worker_gone(self, worker: str, incarnation: int, why: str) -> dict[str, list[str]]:
        """The control plane says a worker incarnation went: endpoint -> names lost."""
        out: dict[str, list[str]] = {}
        for endpoint, home in list(self.home.items()):
            if home.worker == worker and home.incarnation == incarnation:
                lost = self.forget(endpoint, worker, why)
                if lost:
                    out[endpoint] = lost
        return out

    def settle(self, endpoint: str, home: Home) -> list[str]:
        """A cell of ``endpoint`` ran on ``home``: if its names lived elsewhere, they are
        lost (returned); ``home`` holds them from now on."""
        old = self.home.get(endpoint)
        lost: list[str] = []
        if old is not None and (old.worker, old.incarnation) != (home.worker, home.incarnation):
            # With names there, the cell went elsewhere only because that worker is gone;
            # without, it may still be up, holding copies that its notes will free.
            held = any(p.worker == old.worker for p in self.proxies.get(endpoint, {}).values())
            lost = self.forget(endpoint, old.worker, gone=held)
        notes = self.notes.get(endpoint, {})
        for key in [k for k in notes if k[0] == home.worker and k[1] < home.incarnation]:
            del notes[key]  # an earlier incarnation of this worker: gone
        self.home[endpoint] = home
        return lost

    def take(
        self,
        endpoint: str,
        values: dict[str, Any],
        remote: dict[str, dict[str, Any]],
        ns: MutableMapping[str, Any],
        fetch: Callable[[RemoteValue], Any] | None,
        cell: str = "",
    ) -> None:
        """Put a cell's names into the notebook: values as they are, the rest as proxies
        (``cell``: the worker's id of the cell that left them there)."""
        home = self.home[endpoint]
        mine = self.proxies.setdefault(endpoint, {})
        for n, v in values.items():
            ns[n] = v
            mine.pop(n, None)
        for n, info in remote.items():
            proxy = RemoteValue(n, endpoint, home.worker, home.incarnation, home.hardware,
                                {**info, "cell": cell}, fetch)  # fmt: skip
            ns[n] = proxy
            mine[n] = proxy

    def summary(self) -> list[str]:
        """One line per endpoint holding names of this notebook."""
        lines = []
        for ep, names in self.proxies.items():
            if names:
                home = self.home.get(ep)
                where = home.worker if home else "?"
                lines.append(f"remote state of this notebook on {where} ({ep}): "
                             f"{', '.join(sorted(names))}")  # fmt: skip
        return lines

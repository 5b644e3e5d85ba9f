"""What one notebook keeps on workers: per endpoint, the worker that holds its names (its
"home") and a proxy (``RemoteValue``) per name. Plain Python, no IPython: the magics own
one ``RemoteNames`` and hand it the notebook's namespace.

The rules, as Python's own would be:
- a proxy stands for its name only while the notebook still holds that proxy: a local
  ``m = ...`` or ``del m`` since then wins;
- names live on one worker incarnation; when the endpoint's cells land elsewhere, or the
  control plane says that worker went, its proxies are marked lost (saying why), so the next
  use says so instead of reading a stale copy.
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


class RemoteNames:
    def __init__(self) -> None:
        self.proxies: dict[str, dict[str, RemoteValue]] = {}  # endpoint -> name -> proxy
        self.home: dict[str, Home] = {}

    def on(self, endpoint: str) -> dict[str, RemoteValue]:
        """The live proxies of ``endpoint`` (name -> proxy)."""
        return self.proxies.get(endpoint, {})

    def prune(self, endpoint: str, ns: MutableMapping[str, Any]) -> dict[str, RemoteValue]:
        """Drop the proxies the notebook no longer holds; return those left."""
        mine = self.proxies.get(endpoint, {})
        for n in [n for n, p in mine.items() if ns.get(n) is not p]:
            del mine[n]
        return mine

    def affinity(self, endpoint: str, needs: list[str]) -> dict[str, Any] | None:
        """Route a cell to the worker holding this notebook's names there. ``strict``: the
        cell reads some of them, so no other worker will do."""
        home = self.home.get(endpoint)
        if home is None or not self.proxies.get(endpoint):
            return None
        return {"worker": home.worker, "incarnation": home.incarnation,
                "strict": bool(needs), "names": needs}  # fmt: skip

    def forget(self, endpoint: str, worker: str | None = None, why: str = "") -> list[str]:
        """Mark the proxies of names that lived on ``worker`` (any, if None) as lost."""
        mine = self.proxies.get(endpoint, {})
        lost = sorted(n for n, p in mine.items() if worker is None or p.worker == worker)
        for n in lost:
            p = mine.pop(n)
            p.lost = why or f"{n} lived on worker {p.worker}, which is gone"
        self.home.pop(endpoint, None)
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
            lost = self.forget(endpoint, old.worker)
        self.home[endpoint] = home
        return lost

    def take(
        self,
        endpoint: str,
        values: dict[str, Any],
        remote: dict[str, dict[str, Any]],
        ns: MutableMapping[str, Any],
        fetch: Callable[[RemoteValue], Any] | None,
    ) -> None:
        """Put a cell's names into the notebook: values as they are, the rest as proxies."""
        home = self.home[endpoint]
        mine = self.proxies.setdefault(endpoint, {})
        for n, v in values.items():
            ns[n] = v
            mine.pop(n, None)
        for n, info in remote.items():
            proxy = RemoteValue(n, endpoint, home.worker, home.incarnation, home.hardware,
                                info, fetch)  # fmt: skip
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

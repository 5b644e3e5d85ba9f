"""The notebook's view of a value that stayed on a worker (a "remote name")."""

from __future__ import annotations

from typing import Any


def _size(n: float, how: str = "exact") -> str:
    """``n`` bytes for a person; ``how`` (from the worker): "exact", "at least" (a lower
    bound) or "unknown" (the worker could not see enough to say)."""
    if how == "unknown":
        return "size unknown"
    text = f"{n} B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            text = f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
            break
        n /= 1024
    return f"at least {text}" if how == "at least" else text


class RemoteValue:
    """A name whose value lives in this notebook's namespace on a worker.

    Later ``%%flash`` cells on the same endpoint use it where it is (routed to that
    worker); ``.fetch()`` brings it here. It is lost when that worker scales down or dies.
    """

    def __init__(self, name: str, endpoint: str, worker: str, incarnation: int,
                 hardware: str, info: dict[str, Any], fetch: Any = None):  # fmt: skip
        self.name = name
        self.endpoint = endpoint
        self.worker = worker
        self.incarnation = incarnation
        self.hardware = hardware
        self.type = info.get("type", "?")
        self.module = info.get("module")  # the module's name, when the value is a module
        self.nbytes = int(info.get("bytes") or 0)
        self.size = info.get("size", "exact")  # how well nbytes is known
        self.shape = info.get("shape")
        self.dtype = info.get("dtype")
        self.why = info.get("why", "")
        self.preview = info.get("repr", "")
        self.cell = info.get("cell", "")  # the worker's id of the cell that left it there
        # False: this kernel could not rebuild it (its module is missing here), so a fetch
        # would fail the same way until it can.
        self.loadable = bool(info.get("loadable", True))
        self._mime: dict[str, Any] = info.get("mime") or {}
        self._fetch = fetch
        self.lost = ""  # why, once its worker is gone

    def fetch(self) -> Any:
        """Bring the value here (it must be picklable, and loadable in this kernel)."""
        if self.lost:
            from ..errors import RemoteStateLost

            raise RemoteStateLost(self.lost, [self.name])
        if self._fetch is None:
            raise RuntimeError(f"{self.name} cannot be fetched: it is not a name on the worker")
        return self._fetch(self)

    def _summary(self) -> str:
        if self.module:
            return f"module {self.module}"
        bits = [self.type]
        if self.shape:
            bits.append(str(self.shape))
        if self.dtype:
            bits.append(str(self.dtype))
        bits.append(_size(self.nbytes, self.size))
        return " ".join(bits)

    def __repr__(self) -> str:
        where = f"{self.worker} ({self.hardware}), endpoint {self.endpoint}"
        if self.lost:
            return f"<remote {self.name}: {self._summary()}, was on {where}; lost: {self.lost}>"
        why = f"; {self.why}" if self.why else ""
        offer = "; .fetch() brings it here" if self._fetch is not None and self.loadable else ""
        return f"<remote {self.name}: {self._summary()} on {where}{why}{offer}>"

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        if self.lost:  # what it showed before is no longer there to see
            return {"text/plain": repr(self)}
        data = dict(self._mime)
        data["text/plain"] = repr(self) + (f"\n{self.preview}" if self.preview else "")
        return data

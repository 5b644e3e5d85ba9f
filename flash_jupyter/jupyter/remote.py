"""The notebook's view of a value that stayed on a worker (a "remote name")."""

from __future__ import annotations

from typing import Any


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


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
        self.nbytes = int(info.get("bytes") or 0)
        self.shape = info.get("shape")
        self.dtype = info.get("dtype")
        self.why = info.get("why", "")
        self.preview = info.get("repr", "")
        self._mime: dict[str, Any] = info.get("mime") or {}
        self._fetch = fetch
        self.lost = ""  # why, once its worker is gone

    def fetch(self) -> Any:
        """Bring the value here (it must be picklable)."""
        if self.lost:
            from ..errors import RemoteStateLost

            raise RemoteStateLost(self.lost, [self.name])
        if self._fetch is None:
            raise RuntimeError("this remote value cannot be fetched")
        return self._fetch(self)

    def _summary(self) -> str:
        bits = [self.type]
        if self.shape:
            bits.append(str(self.shape))
        if self.dtype:
            bits.append(str(self.dtype))
        bits.append(_size(self.nbytes))
        return " ".join(bits)

    def __repr__(self) -> str:
        return (
            f"<remote {self.name}: {self._summary()} on {self.worker} ({self.hardware}), "
            f"endpoint {self.endpoint}; {self.why}; .fetch() brings it here>"
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        data = dict(self._mime)
        data["text/plain"] = repr(self) + (f"\n{self.preview}" if self.preview else "")
        return data

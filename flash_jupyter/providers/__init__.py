"""Where workers run. ``local`` (OS processes on this machine) is the default."""

from __future__ import annotations

from .base import Allocation, Provider, WorkerSpec


def get_provider(name: str, **kw) -> Provider:
    if name == "local":
        from .local import LocalProvider

        return LocalProvider(**kw)
    raise ValueError(f"unknown provider {name!r}; known: local")


__all__ = ["Allocation", "Provider", "WorkerSpec", "get_provider"]

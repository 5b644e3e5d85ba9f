"""Where workers run. ``local`` (OS processes on this machine) is the default; ``ray`` (actors
on a Ray cluster's nodes) is imported only when chosen, so nothing else loads Ray."""

from __future__ import annotations

from .base import Allocation, Provider, WorkerSpec

PROVIDERS = ("local", "ray")


def get_provider(name: str, **kw) -> Provider:
    if name == "local":
        from .local import LocalProvider

        return LocalProvider(**kw)
    if name == "ray":
        try:
            from .ray_provider import RayProvider
        except ImportError as e:
            raise ValueError(
                f"the ray provider needs Ray ({e}); install it with: pip install 'ray>=2.9'"
            ) from None
        return RayProvider(**kw)
    raise ValueError(f"unknown provider {name!r}; known: {', '.join(PROVIDERS)}")


__all__ = ["PROVIDERS", "Allocation", "Provider", "WorkerSpec", "get_provider"]

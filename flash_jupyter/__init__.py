"""flash-jupyter: Runpod Flash, native to Jupyter.

Run a function, a class or a notebook cell on a remote GPU/CPU worker::

    from flash_jupyter import Endpoint

    @Endpoint(gpu="A100", workers=(0, 3), idle_timeout=30)
    def square(x):
        return x * x

    square(4)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

# The public names load on first use, so a worker process (which imports only the wire
# modules) and `import flash_jupyter` in a notebook both stay fast.
_EXPORTS = {
    "EndpointConfig": "config",
    "Endpoint": "endpoint",
    "Job": "job",
    "RemoteClass": "endpoint",
    "RemoteFunction": "endpoint",
    "AuthError": "errors",
    "BudgetExceeded": "errors",
    "ConfigError": "errors",
    "ControlPlaneError": "errors",
    "FlashError": "errors",
    "JobCancelled": "errors",
    "JobFailed": "errors",
    "JobTimedOut": "errors",
    "RemoteError": "errors",
    "RemoteStateLost": "errors",
    "SerializationError": "errors",
    "VersionMismatch": "errors",
    "dashboard": "jupyter.dashboard",
}

if TYPE_CHECKING:
    from .config import EndpointConfig
    from .endpoint import Endpoint, RemoteClass, RemoteFunction
    from .errors import (
        AuthError,
        BudgetExceeded,
        ConfigError,
        ControlPlaneError,
        FlashError,
        JobCancelled,
        JobFailed,
        JobTimedOut,
        RemoteError,
        RemoteStateLost,
        SerializationError,
        VersionMismatch,
    )
    from .job import Job


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'flash_jupyter' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def load_ipython_extension(ip) -> None:
    """``%load_ext flash_jupyter``: register the %%flash and %flash magics."""
    from .jupyter.magics import load_ipython_extension as load

    load(ip)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The Jupyter server extension (enabled as ``flash_jupyter``) lives in ``labserver``,
    so that ``import flash_jupyter`` never loads Jupyter's or tornado's modules."""
    return [{"module": "flash_jupyter.labserver"}]


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "AuthError",
    "BudgetExceeded",
    "ConfigError",
    "ControlPlaneError",
    "Endpoint",
    "EndpointConfig",
    "FlashError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobTimedOut",
    "RemoteClass",
    "RemoteError",
    "RemoteFunction",
    "RemoteStateLost",
    "SerializationError",
    "VersionMismatch",
    "__version__",
    "dashboard",
]

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

from .config import EndpointConfig
from .endpoint import Endpoint, Job, RemoteClass, RemoteFunction
from .errors import (
    AuthError,
    ConfigError,
    ControlPlaneError,
    FlashError,
    JobCancelled,
    JobFailed,
    JobTimedOut,
    RemoteError,
    SerializationError,
    VersionMismatch,
)

__all__ = [
    "AuthError",
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
    "SerializationError",
    "VersionMismatch",
    "__version__",
]

"""The seam between the control plane and wherever worker processes live.

A provider places workers (resources), starts and stops their processes, and reports when
one exits. It knows nothing of jobs: workers connect back to the control plane themselves
and take jobs over the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config import EndpointConfig


@dataclass
class Allocation:
    """Resources held by one worker process."""

    hardware: str  # what status views show, e.g. "A100" or "A100 (emulated on CPU)"
    emulated: bool
    devices: list[int] = field(default_factory=list)  # GPU indices (CUDA_VISIBLE_DEVICES)
    type_name: str | None = None  # the catalogue type it got (a GPU list may allow several)


@dataclass
class WorkerSpec:
    worker_id: str
    incarnation: int
    config: EndpointConfig
    allocation: Allocation
    wire: tuple[str, int]  # where the worker connects
    credential: str  # the worker's own wire credential (never the control plane's token)
    spool: str | None = None  # shared-memory folder for large buffers, when on this host


class PlacementError(Exception):
    """The endpoint can never be placed here (not a transient lack of resources)."""


class Provider(Protocol):
    name: str

    def allocate(self, config: EndpointConfig) -> Allocation | None:
        """Reserve resources for one worker; None when the host lacks them now (Throttled).

        Raises PlacementError when it never could (strict GPU mode without the GPU).
        """

    def release(self, allocation: Allocation) -> None: ...

    async def start(
        self, spec: WorkerSpec, on_exit: Callable[[int | None, str], Awaitable[None] | None]
    ) -> Any:
        """Start the worker process; return a handle. ``on_exit(returncode, reason)`` is
        called once when the process has fully stopped."""

    def stop(self, handle: Any) -> None:
        """Ask the process to stop now (SIGTERM)."""

    def kill(self, handle: Any) -> None:
        """Stop the process at once (SIGKILL)."""

    def pid(self, handle: Any) -> int | None: ...

    def describe(self) -> dict[str, Any]: ...

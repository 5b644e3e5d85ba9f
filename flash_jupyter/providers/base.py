"""The seam between the control plane and wherever worker processes live.

A provider places workers (resources), starts and stops their processes, and reports when
one exits. It knows nothing of jobs: workers connect back to the control plane themselves
and take jobs over the wire.

``Provider`` lists what every provider implements. ``OptionalProvider`` lists what a provider
may add (warm pools, emulation hints); the control plane looks each one up with ``getattr``
and does without it when it is missing. ``OPTIONAL_METHODS`` names them.
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
    # The worker shares this host's shared-memory spool. False for a worker on another
    # machine: the control plane then sends it spooled buffers inline.
    same_host: bool = True


@dataclass
class WorkerSpec:
    worker_id: str
    incarnation: int
    config: EndpointConfig
    allocation: Allocation
    wire: tuple[str, int]  # where the worker connects
    credential: str  # the worker's own wire credential (never the control plane's token)
    spool: str | None = None  # shared-memory folder for large buffers, when on this host
    # Where the provider reports the cold start's phase as it moves on: "environment"
    # (building the dependency environment) or "process" (the interpreter starting, until
    # its hello). Optional for a provider: the control plane assumes "environment" first for
    # an endpoint with dependencies and "process" otherwise, and ends the phase at hello.
    on_phase: Callable[[str], None] | None = field(default=None, repr=False, compare=False)
    # Set by a provider that prepared a dependency environment, before it reports "process":
    # "pre-installed" (it existed) or "installed at request time" (this start built it).
    env_source: str | None = None
    # Set by a provider that adopted a warm process instead of starting one: "preloaded"
    # (a spare that had imported modules for the endpoint) or "plain"; None: a fresh one.
    spare: str | None = None
    # Why a start reported the phase "pending" waits (shown as the slot's reason).
    waiting: str | None = None

    def phase(self, name: str) -> None:
        """Report a cold start phase (a no-op when nobody listens)."""
        if self.on_phase is not None:
            self.on_phase(name)


class PlacementError(Exception):
    """The endpoint can never be placed here (not a transient lack of resources)."""


class Provider(Protocol):
    name: str

    def allocate(self, config: EndpointConfig) -> Allocation | None:
        """Reserve resources for one worker; None when the host lacks them now (Throttled).

        Raises PlacementError when it never could (strict GPU mode without the GPU).
        """

    def release(self, allocation: Allocation) -> None:
        """Give an allocation back: its worker has fully stopped (after ``on_exit``)."""

    async def start(
        self, spec: WorkerSpec, on_exit: Callable[[int | None, str], Awaitable[None] | None]
    ) -> Any:
        """Start the worker process; return a handle. ``on_exit(returncode, reason)`` is
        called once when the process has fully stopped (its result is awaited if it is
        awaitable; the control plane's is a plain function). ``reason`` says why in words
        ("exited with code 1 (last log line)", "killed by SIGKILL"): it becomes the worker's
        reason and the error of jobs that fail with it. A start that raises counts as a
        start failure. A provider that builds an environment before the process reports
        each phase with ``spec.phase("environment")`` and ``spec.phase("process")``.

        A provider whose placement can wait (a cluster without a free node) reports
        ``spec.phase("pending")`` (with ``spec.waiting`` saying why): the slot shows
        ``Throttled`` and is not billed until the next phase, where its start (and bill)
        begins. A provider may refine ``spec.allocation`` once placed (the devices it got,
        their names, ``same_host``); the control plane reads it again at each phase."""

    def stop(self, handle: Any) -> None:
        """Ask the process to stop now (SIGTERM)."""

    def kill(self, handle: Any) -> None:
        """Stop the process at once (SIGKILL)."""

    def pid(self, handle: Any) -> int | None:
        """A process id for views, or None where there is none (a remote actor)."""

    def describe(self) -> dict[str, Any]:
        """What ``/v1/info`` shows as ``provider`` (JSON-safe)."""


class OptionalProvider(Protocol):
    """Methods a provider may have. The control plane calls each only if it exists.

    The local provider implements all of them (its spare worker process is a warm pool of
    one). A provider for more than one machine (Ray) needs none of them to work: without
    ``prepare`` every start is a fresh process, and without ``would_emulate`` views say an
    idle endpoint is not emulated until a worker has started.
    """

    async def prepare(
        self,
        wire: tuple[str, int],
        token: str,
        quiet: Callable[[], bool],
        prespawned: Any = None,
    ) -> None:
        """Called once when the control plane starts, before any worker starts.

        ``wire`` is where workers connect, ``token`` derives the credentials of warm-pool
        processes (``credentials.spare_credential``), ``quiet()`` says when the control plane
        has been idle long enough for background work (starting a spare), and
        ``prespawned`` is whatever ``server/boot.py`` started before the heavy imports (the
        local provider's first spare process), or None.
        """

    def close(self) -> None:
        """The control plane is stopping: stop warm-pool processes and start no more. The
        workers themselves are stopped through ``stop``/``kill`` afterwards."""

    def spare_ready(self, nonce: str, conn: Any) -> bool:
        """A warm-pool process connected in the ``spare`` role with this nonce (its
        credential was checked). Return True to keep it: ``conn`` is then its wire
        connection, and ``start`` may hand it a worker by sending
        ``{"op": "assign", "env": ..., "spec": ...}`` and setting ``conn.assigned =
        (worker_id, incarnation)``; the process then says ``worker_hello`` as that worker.
        False closes the connection."""

    def spare_lost(self, conn: Any) -> None:
        """The connection of a spare (one accepted by ``spare_ready``, not yet assigned)
        closed: forget it, and stop its process."""

    def would_emulate(self, config: EndpointConfig) -> bool:
        """Whether a worker of this endpoint would run emulated (a GPU type the provider
        does not have, run on CPU), before any worker has started. Views use it."""

    def unmet(self, configs: list[EndpointConfig]) -> None:
        """Called at each tick of the scheduler with one config per worker waiting
        ``Throttled`` because ``allocate`` found no room (an empty list when none waits).
        A provider for an elastic cluster asks it for room (the Ray provider's autoscaler
        request). Must return quickly: it runs on the control plane's loop."""


OPTIONAL_METHODS = (
    "prepare", "close", "spare_ready", "spare_lost", "would_emulate", "unmet"
)  # fmt: skip

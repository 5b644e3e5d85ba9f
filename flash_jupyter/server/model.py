"""The control plane's in-memory records: endpoints, workers, jobs."""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..config import EndpointConfig

# Job statuses (Runpod's names).
IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
TIMED_OUT = "TIMED_OUT"
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})

# Worker states (the seed's names) and whether each is billed.
INITIALIZING = "Initializing"
IDLE = "Idle"
RUNNING = "Running"
THROTTLED = "Throttled"
OUTDATED = "Outdated"
UNHEALTHY = "Unhealthy"
WORKER_STATES = (INITIALIZING, IDLE, RUNNING, THROTTLED, OUTDATED, UNHEALTHY)


@dataclass
class Job:
    id: str
    endpoint: str
    kind: str  # "py": pickled call; "json": handler(**input) with JSON in and out
    fn: str | None
    body: dict[str, Any]
    created: float = field(default_factory=time.time)
    status: str = IN_QUEUE
    started: float | None = None
    finished: float | None = None
    worker_id: str | None = None
    retries: int = 0
    cold: bool = False
    cold_start_ms: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cost: float = 0.0
    stream: list[Any] = field(default_factory=list)  # chunks yielded by a generator handler
    owner: Any = None  # the wire connection waiting for this job
    waiters: list[Any] = field(default_factory=list)  # asyncio futures (HTTP runsync)
    deadline: float | None = None  # monotonic execution deadline
    cancel_sent: float | None = None
    delivered: bool = False
    incarnation: int = 0  # of the worker that ran it
    run_index: int = 0  # it was the n-th job sent to that worker (order on the worker)
    hardware: str = ""  # what it ran on
    emulated: bool = False  # ... and whether that was emulated on the CPU
    price: float | None = None  # per second, of the worker it ran on (set at dispatch)
    # Cold start phases of the worker it waited for (ms; the worker's dict, filled as the
    # phases end: "environment", "process", then "code" once the job's code is loaded).
    cold_phases: dict[str, float] | None = None
    env_source: str | None = None  # its worker's environment: "pre-installed" or not (cold)
    spare: str | None = None  # its worker came from a spare: "preloaded", "plain" (cold)
    progress: bool = False  # its caller asked for progress frames
    progress_last: tuple | None = None  # the last progress frame sent (status, phase, worker)
    update: Any = None  # runpod.serverless.progress_update's last value: /status output meanwhile
    stream_read: int = 0  # chunks /stream has handed out (Runpod's cursor: each one once)
    # A request's Runpod options (policy.py, webhooks.py); None/False when it gave none.
    timeout: float | None = None  # policy.executionTimeout, seconds (over the endpoint's)
    expires: float | None = None  # policy.ttl: wall time when the job is forgotten
    low: bool = False  # policy.lowPriority: queued behind the others
    hook: Any = None  # webhooks.Delivery: where its final status goes, and how that went

    @property
    def delay_ms(self) -> int | None:
        if self.started is None:
            return None
        return round((self.started - self.created) * 1000)

    @property
    def execution_ms(self) -> int | None:
        if self.started is None:
            return None
        end = self.finished if self.finished is not None else time.time()
        return round((end - self.started) * 1000)


@dataclass
class Worker:
    id: str
    endpoint: str
    state: str = IDLE
    incarnation: int = 0
    handle: Any = None  # provider handle of the running process
    conn: Any = None  # wire connection once the process has said hello
    pid: int | None = None
    env_hash: str | None = None
    allocation: Any = None
    hardware: str = ""
    emulated: bool = False
    jobs: set[str] = field(default_factory=set)
    fns: set[str] = field(default_factory=set)  # function hashes this process holds
    start_signal: float | None = None  # wall time the start was asked for (billing)
    bill: str | None = None  # its open ledger row (billing.Ledger.open), while billed
    ready_at: float | None = None
    last_active: float = field(default_factory=time.monotonic)  # the control plane's clock
    jobs_run: int = 0
    stopping: bool = False
    expected_exit: bool = True  # False when it was stopped for misbehaving (not billed idle)
    removing: bool = False  # slot goes away after this incarnation
    crashes: int = 0
    retry_at: float = 0.0
    reason: str = ""
    cold_start_ms: float | None = None
    price: float = 0.0  # per second, set at each start from what the worker got
    # Notebook sessions keeping names on this process: session -> {name: bytes}.
    remote_state: dict[str, dict[str, int]] = field(default_factory=dict)
    # What the last incarnation held when it went: session -> names (until the next start).
    lost_state: dict[str, list[str]] = field(default_factory=dict)
    spawn_task: Any = None  # the asyncio task asking the provider for the process
    # Cold start phase: "environment", "process" (until hello), "code" (loading the code of
    # its first job), or None; since when (wall), and how long each took (ms).
    phase: str | None = None
    phase_since: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)
    # Its dependency environment: "pre-installed", "installed at request time", or None.
    env_source: str | None = None
    # Its process was a spare: "preloaded" (imports done), "plain", or None (a fresh one).
    spare: str | None = None
    # GPU memory its process holds, as of its last result (worker/gpu_memory.py), or None.
    gpu_memory: dict[str, int] | None = None

    @property
    def live(self) -> bool:
        return self.handle is not None

    @property
    def ready(self) -> bool:
        return self.conn is not None and not self.stopping and self.state == RUNNING

    @property
    def holds_state(self) -> bool:
        """A notebook keeps names on this process (stopping it loses them)."""
        return any(self.remote_state.values())

    def billed_seconds(self, now: float | None = None) -> int:
        if self.start_signal is None:
            return 0
        return max(1, math.ceil((now or time.time()) - self.start_signal))


@dataclass
class EndpointState:
    config: EndpointConfig
    handler: str | None = None  # function hash used by JSON (REST) jobs
    serves: str | None = None  # "function", "class" or "cells" (as last deployed; not stored)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    workers: dict[str, Worker] = field(default_factory=dict)
    queue: deque[str] = field(default_factory=deque)
    completed: int = 0
    failed: int = 0  # FAILED and TIMED_OUT
    cancelled: int = 0
    retried: int = 0
    logs: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=2000))
    billed_cost: float = 0.0  # closed ledger entries, all time (reloaded at start)
    billed_seconds: int = 0
    session_cost: float = 0.0  # closed ledger entries since this control plane started
    session_seconds: int = 0
    exec_ewma_ms: float = 100.0
    next_worker: int = 1
    # Jobs that found a worker ready (warm) or waited for one to start (cold), this session.
    warm_starts: int = 0
    cold_starts: int = 0
    cold_ms_total: float = 0.0
    last_cold_ms: float | None = None
    progress_jobs: set[str] = field(default_factory=set)  # unfinished jobs asking progress
    has_low: bool = False  # a lowPriority job was queued (scaling then skips those: scheduler)

    @property
    def name(self) -> str:
        return self.config.name


def notebook_name(session: str) -> str:
    """A notebook session's short name: "analysis.ipynb" for ".../analysis.ipynb"."""
    return os.path.basename(session.rstrip("/")) or session


def describe_state(sessions: dict[str, Any]) -> str:
    """``{session: names}`` as one line: "analysis.ipynb: a, b; other.ipynb: c"."""
    return "; ".join(
        f"{notebook_name(s)}: {', '.join(sorted(names))}" for s, names in sorted(sessions.items())
    )

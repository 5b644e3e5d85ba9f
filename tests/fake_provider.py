"""An in-process provider, and a harness around a real control plane, for unit tests of the
scheduler and the worker lifecycle: no OS processes, no sockets, a clock the test moves.

The control plane is the real one (``ControlPlane`` with a real ``Store`` in a temporary
folder); only where workers live is fake. The test drives the workers:

- ``FakeProvider.allocate`` gives one slot per worker up to ``capacity`` (None: no limit);
  at capacity it returns None (the worker is Throttled); with ``placement_error`` set it
  raises ``PlacementError`` (strict GPU mode).
- ``start`` makes a ``FakeWorker``; it does not connect by itself. ``w.connect()`` says hello
  through the real wire code (``wire_server.Connection`` with its credential check) on a
  ``FakeConn``, which records the frames the control plane sends it instead of writing them.
- ``w.done(job_id)``, ``w.fail(job_id, ...)`` and ``w.out(job_id, text)`` send the frames a
  worker sends, through the same wire code. ``w.crash(reason)`` ends the process by
  surprise; ``stop``/``kill`` (or an ``exit`` frame) end it as asked, at the next loop turn.
- ``Harness.settle()`` runs the loop until nothing is left to do now; ``advance(s)`` moves
  the control plane's clocks (``cp.clock``, ``cp.wall``) and runs one tick.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from flash_jupyter.config import EndpointConfig
from flash_jupyter.providers.base import Allocation, PlacementError, WorkerSpec
from flash_jupyter.server import model as m
from flash_jupyter.server.control import ControlPlane
from flash_jupyter.server.store import Store
from flash_jupyter.server.wire_server import Connection

_pids = itertools.count(40_000)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeConn(Connection):
    """A wire connection without a socket: what the control plane sends is kept in ``sent``."""

    def __init__(self, cp: ControlPlane, worker: FakeWorker | None = None):
        super().__init__(cp, {"fake": True})
        self.sent: list[dict[str, Any]] = []
        self.fake_worker = worker

    def send(self, meta: dict[str, Any], bufs: list[Any] = ()) -> None:
        if self.proto.closed:
            return
        self.sent.append(meta)
        w = self.fake_worker
        if w is not None and meta.get("op") == "exit" and w.provider.auto_exit:
            self.cp._loop.call_soon(w.exit, 0, "exited with code 0")  # a worker obeys

    def close(self) -> None:
        # As a real transport does: the close is noticed at a later loop turn.
        if not self.proto.closed:
            self.proto.closed = True
            self.cp._loop.call_soon(self.on_close)

    def frames(self, op: str) -> list[dict[str, Any]]:
        return [f for f in self.sent if f.get("op") == op]


class FakeWorker:
    """One incarnation of a worker process, driven by the test."""

    def __init__(self, provider: FakeProvider, spec: WorkerSpec, on_exit: Any):
        self.provider = provider
        self.spec = spec
        self.id, self.incarnation = spec.worker_id, spec.incarnation
        self.on_exit = on_exit
        self.pid = next(_pids)
        self.conn: FakeConn | None = None
        self.exit_reason: str | None = None
        self.stop_asked = False
        self._reported: set[str] = set()

    @property
    def alive(self) -> bool:
        return self.exit_reason is None

    # -- what the process does
    def connect(self) -> bool:
        """Say hello with this incarnation's credential; True if the control plane took it."""
        conn = FakeConn(self.provider.cp, self)
        conn.on_frame({"role": "worker", "id": self.id, "incarnation": self.incarnation,
                       "token": self.spec.credential, "pid": self.pid}, [])  # fmt: skip
        if conn.role != "worker":
            return False
        self.conn = conn
        return True

    def runs(self) -> list[str]:
        """Ids of the jobs the control plane sent this worker, in order."""
        return [f["id"] for f in self.conn.frames("run")] if self.conn else []

    def pending(self) -> list[str]:
        """Jobs sent to this worker that it has not reported yet."""
        return [j for j in self.runs() if j not in self._reported]

    def done(self, job_id: str, result: bytes = b"result", state: dict | None = None) -> None:
        meta: dict[str, Any] = {"op": "done", "id": job_id, "ok": True, "c": "cloudpickle",
                                "refs": [0]}  # fmt: skip
        if state is not None:
            meta["state"] = state
        self._report(job_id, meta, [bytearray(result)])

    def fail(self, job_id: str, message: str = "boom", cancelled: bool = False) -> None:
        meta = {"op": "done", "id": job_id, "ok": False, "cancelled": cancelled,
                "error": {"message": message, "type": "RuntimeError"}}  # fmt: skip
        self._report(job_id, meta, [])

    def out(self, job_id: str, text: str, stream: str = "stdout") -> None:
        self.conn.on_frame({"op": "out", "id": job_id, "stream": stream, "text": text}, [])

    def _report(self, job_id: str, meta: dict[str, Any], bufs: list[Any]) -> None:
        self._reported.add(job_id)
        self.conn.on_frame(meta, bufs)

    def crash(self, reason: str = "killed by SIGKILL") -> None:
        """The process dies unasked: the provider reports the exit, the connection drops."""
        self.exit(-9, reason)

    def exit(self, rc: int | None, reason: str) -> None:
        if not self.alive:
            return
        self.exit_reason = reason
        self.provider.exits.append((self.id, self.incarnation, reason))
        self.on_exit(rc, reason)
        if self.conn is not None:
            self.conn.close()


class FakeProvider:
    """The Provider protocol (providers/base.py), in process. See the module's docstring."""

    name = "fake"

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.in_use = 0
        self.placement_error: str | None = None
        self.start_error: str | None = None  # start() raises this (a provider failure)
        self.cp: ControlPlane | None = None
        self.workers: dict[str, FakeWorker] = {}  # worker id -> its latest incarnation
        self.started: list[tuple[str, int]] = []
        self.exits: list[tuple[str, int, str]] = []
        self.auto_exit = True  # stop/kill/exit frames end the process at the next loop turn

    # -- placement
    def allocate(self, config: EndpointConfig) -> Allocation | None:
        if self.placement_error:
            raise PlacementError(self.placement_error)
        if self.capacity is not None and self.in_use >= self.capacity:
            return None
        self.in_use += 1
        if config.gpu:
            n = f" x{config.gpu_count}" if config.gpu_count > 1 else ""
            return Allocation(f"{config.gpu[0]}{n} (emulated on CPU)", True, [], config.gpu[0])
        return Allocation(config.cpu or "cpu", False, [])

    def release(self, allocation: Allocation) -> None:
        self.in_use -= 1
        assert self.in_use >= 0, "released more than was allocated"

    # -- processes
    async def start(self, spec: WorkerSpec, on_exit: Any) -> FakeWorker:
        if self.start_error:
            raise RuntimeError(self.start_error)
        w = FakeWorker(self, spec, on_exit)
        self.workers[spec.worker_id] = w
        self.started.append((spec.worker_id, spec.incarnation))
        return w

    def stop(self, handle: FakeWorker) -> None:
        handle.stop_asked = True
        if self.auto_exit:
            self.cp._loop.call_soon(handle.exit, 0, "exited with code 0")

    def kill(self, handle: FakeWorker) -> None:
        handle.stop_asked = True
        if self.auto_exit:
            self.cp._loop.call_soon(handle.exit, -9, "killed by SIGKILL")

    def pid(self, handle: FakeWorker) -> int | None:
        return handle.pid

    def describe(self) -> dict[str, Any]:
        return {"provider": self.name, "in_use": self.in_use, "capacity": self.capacity}

    def would_emulate(self, config: EndpointConfig) -> bool:
        return bool(config.gpu)


class Harness:
    """A real control plane on its own event loop, with a FakeProvider and fake clocks."""

    def __init__(self, tmp: Path, capacity: int | None = None):
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock(1000.0)
        self.wall = FakeClock(time.time())
        self.provider = FakeProvider(capacity)
        self.store = Store(tmp / "flash.db")
        self.cp = ControlPlane(self.store, self.provider, token="test-token",
                               wire_addr=("127.0.0.1", 0), clock=self.clock,
                               wall=self.wall)  # fmt: skip
        self.provider.cp = self.cp
        self.loop.run_until_complete(self.cp.start())
        self.cp._tick_task.cancel()  # the test ticks (advance, tick), on its own clock
        self.settle()
        self._jobs = itertools.count(1)

    def close(self) -> None:
        self.cp.closing = True
        self.settle()
        self.store.close()
        self.loop.close()

    # -- time and the loop
    def settle(self, turns: int = 50) -> None:
        """Run the loop until it has nothing ready to do (real time does not matter)."""
        for _ in range(turns):
            self.loop.run_until_complete(asyncio.sleep(0))
            self.store.flush()
            if not self.loop._ready:  # nothing scheduled for now
                return
        raise AssertionError(f"the loop is still busy after {turns} turns")

    def tick(self) -> None:
        self.cp._tick()
        self.settle()

    def advance(self, seconds: float) -> None:
        """Move both clocks, then tick (as the periodic ticker would)."""
        self.clock.advance(seconds)
        self.wall.advance(seconds)
        self.tick()

    # -- endpoints and jobs
    def deploy(self, name: str, **settings: Any) -> m.EndpointState:
        self.cp.deploy(EndpointConfig.build(name, **settings))
        self.settle()
        return self.cp.endpoints[name]

    def client(self) -> FakeConn:
        """A client connection (said hello with the token)."""
        conn = FakeConn(self.cp)
        conn.on_frame({"role": "client", "token": self.cp.token}, [])
        assert conn.role == "client", conn.sent
        return conn

    def submit(self, endpoint: str, owner: FakeConn | None = None,
               affinity: dict | None = None, settle: bool = True) -> m.Job:  # fmt: skip
        body: dict[str, Any] = {"codec": "cloudpickle", "blobs": [b"args"],
                                "fn_codec": "cloudpickle", "fn_blobs": [b"fn"]}  # fmt: skip
        if affinity:
            body["affinity"] = affinity
        job = self.cp.submit(endpoint, "py", body, owner=owner, job_id=f"job-{next(self._jobs)}")
        if owner is not None:
            owner.jobs.add(job.id)
        if settle:
            self.settle()
        return job

    # -- workers
    def worker(self, worker_id: str) -> FakeWorker:
        """The latest incarnation the provider started for this slot."""
        return self.provider.workers[worker_id]

    def connect_all(self) -> list[FakeWorker]:
        """Every started, running process that has not said hello yet does so now."""
        fresh = [w for w in self.provider.workers.values() if w.alive and w.conn is None]
        for w in fresh:
            assert w.connect(), f"{w.id} was refused"
        self.settle()
        return fresh

    def slots(self, endpoint: str) -> list[m.Worker]:
        return list(self.cp.endpoints[endpoint].workers.values())

    def live(self, endpoint: str) -> list[m.Worker]:
        return [w for w in self.slots(endpoint) if w.live]

    def states(self, endpoint: str) -> list[str]:
        return sorted(w.state for w in self.slots(endpoint))

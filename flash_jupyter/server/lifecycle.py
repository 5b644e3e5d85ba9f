"""The worker lifecycle: a slot's process from start to exit.

A slot (``model.Worker``) is ``Idle`` without a process. ``start`` asks the provider for
resources: none now makes it ``Throttled`` (and asks the scheduler to make room); a process
starting is ``Initializing`` until it says hello over the wire, then ``Running``. ``stop``
asks it to go (an ``exit`` frame, SIGTERM, SIGKILL after ``STOP_GRACE``). The provider's exit
callback (``on_exit``) closes the bill, puts the jobs it held back in the queue (counting a
retry for those it was running) and, if nobody asked it to go, makes the slot ``Unhealthy``
until a backoff has passed. Time comes from ``cp.clock`` (monotonic) and ``cp.wall``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import credentials, envvars
from ..providers.base import PlacementError, WorkerSpec
from . import model as m

if TYPE_CHECKING:
    from .control import ControlPlane

START_FAILURES = 3  # a worker that dies this often before connecting fails the queue
MAX_RETRIES: int = envvars.get("FLASH_JUPYTER_MAX_RETRIES")  # read once, at start
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL


def backoff(crashes: int) -> float:
    """Seconds an Unhealthy slot waits before its next start."""
    return min(60.0, 0.5 * 2 ** max(0, crashes - 1))


class Lifecycle:
    def __init__(self, cp: ControlPlane):
        self.cp = cp

    def find(self, worker_id: str, incarnation: int) -> tuple[Any, Any]:
        """(endpoint, worker) of that live incarnation, or (None, None)."""
        ep = self.cp.endpoints.get(worker_id.rsplit("-", 1)[0])
        w = ep.workers.get(worker_id) if ep else None
        if w is None or w.incarnation != incarnation or not w.live:
            return None, None
        return ep, w

    # ------------------------------------------------------------------ start
    def start(self, ep: m.EndpointState, w: m.Worker) -> None:
        cp = self.cp
        cfg = ep.config
        try:
            alloc = cp.provider.allocate(cfg)
        except PlacementError as e:
            self.fail_queued(ep, str(e))
            return
        if alloc is None:
            cp.scheduler.make_room(ep)
            if w.state != m.THROTTLED:
                w.state = m.THROTTLED
                w.reason = "waiting for host resources"
                cp._publish_worker(w)
            return
        w.incarnation += 1
        w.allocation = alloc
        w.hardware, w.emulated = alloc.hardware, alloc.emulated
        w.state = m.INITIALIZING
        w.reason = ""
        w.start_signal = cp.wall()
        w.ready_at = None
        w.cold_start_ms = None
        w.env_hash = cfg.env_hash
        w.price = cp.ledger.price(cfg, alloc)
        w.jobs_run = 0
        w.fns = set()
        w.remote_state = {}
        w.lost_state = {}
        w.gpu_memory = None
        w.stopping = False
        w.expected_exit = True
        w.handle = "starting"
        # The provider says when it moves on (WorkerSpec.on_phase); until then, a worker
        # with dependencies is building its environment, any other is starting its process.
        w.phase_ms = {}
        w.env_source = None
        w.spare = None
        w.phase = "environment" if cfg.dependencies or cfg.system_dependencies else "process"
        w.phase_since = w.start_signal
        cp.ledger.open(ep, w)  # durable from the start: a crash of ours cannot lose it
        cp._publish_worker(w)
        cp.progress.endpoint_moved(ep)
        cred = credentials.worker_credential(cp.token, w.id, w.incarnation)
        inc = w.incarnation

        def on_phase(phase: str) -> None:
            if w.incarnation == inc and spec.env_source is not None:
                w.env_source = spec.env_source  # the environment is ready: which way
            if w.incarnation == inc and w.live and w.conn is None:
                self.provider_phase(ep, w, spec, phase)

        spec = WorkerSpec(w.id, w.incarnation, cfg, alloc, cp.wire_addr, cred, cp.spool,
                          on_phase=on_phase)  # fmt: skip
        w.spawn_task = cp._loop.create_task(self._spawn(ep, w, spec))

    def provider_phase(
        self, ep: m.EndpointState, w: m.Worker, spec: WorkerSpec, phase: str
    ) -> None:
        """The provider moved a start on. ``pending``: its placement waits for resources
        (a cluster without a free node): Throttled and not billed. The next phase after it
        begins the start and the bill. The provider may have refined the allocation (the
        devices it got): the worker's hardware and price follow."""
        cp = self.cp
        if phase == "pending":
            if w.state != m.THROTTLED:
                w.state, w.reason = m.THROTTLED, spec.waiting or "waiting for resources"
                w.start_signal, w.phase, w.phase_ms = None, None, {}
                cp.ledger.void(w, w.reason)
                cp._publish_worker(w)
                cp.progress.endpoint_moved(ep)
            return
        if w.state == m.THROTTLED:  # granted: the start, and its bill, begin now
            w.state, w.reason = m.INITIALIZING, ""
            w.start_signal = w.phase_since = cp.wall()
            cp.ledger.open(ep, w)
        alloc = spec.allocation
        refined = (w.hardware, w.emulated) != (alloc.hardware, alloc.emulated)
        if refined:
            w.hardware, w.emulated = alloc.hardware, alloc.emulated
            w.price = cp.ledger.price(ep.config, alloc)
            cp.ledger.refine(w)
        if phase != w.phase:
            self.set_phase(ep, w, phase)
        elif refined:
            cp._publish_worker(w)

    def set_phase(
        self, ep: m.EndpointState, w: m.Worker, phase: str | None, queued: bool = True
    ) -> None:
        """The worker's cold start moves on: the time of the phase that ends is recorded
        (the job that waited for it shows it as ``coldStartPhases``); the worker view and
        the progress of jobs waiting on the endpoint follow."""
        cp = self.cp
        now = cp.wall()
        if w.phase is not None:
            ms = max(0.0, (now - w.phase_since) * 1000)
            w.phase_ms[w.phase] = w.phase_ms.get(w.phase, 0.0) + ms
        w.phase, w.phase_since = phase, now
        cp._publish_worker(w)
        if phase == "code" or phase is None:
            for jid in list(w.jobs):
                job = cp.jobs.get(jid)
                if job is not None and job.progress:
                    cp.progress.send(job)
        if queued:
            cp.progress.endpoint_moved(ep)

    def code_loaded(self, w: m.Worker) -> None:
        """The worker started running its first job's code: the cold start is over."""
        ep = self.cp.endpoints.get(w.endpoint)
        if ep is not None and w.phase == "code":
            self.set_phase(ep, w, None)

    async def _spawn(self, ep: m.EndpointState, w: m.Worker, spec: WorkerSpec) -> None:
        cp = self.cp
        inc = w.incarnation

        def on_exit(rc: int | None, reason: str) -> None:
            self.on_exit(ep, w, inc, reason)

        try:
            handle = await cp.provider.start(spec, on_exit)
        except Exception as e:
            if w.incarnation == inc:
                msg = f"worker could not start: {e}"
                self.on_exit(ep, w, inc, msg)
                self.fail_queued(ep, msg)
            return
        if w.incarnation != inc:
            return
        w.handle = handle
        w.pid = cp.provider.pid(handle)
        w.spare = spec.spare  # the provider adopted a spare process ("preloaded", "plain")
        if w.stopping:
            cp.provider.stop(handle)

    def hello(self, worker_id: str, incarnation: int, conn: Any, pid: int | None) -> bool:
        """The worker's process connected (its credential was checked by the wire)."""
        cp = self.cp
        ep, w = self.find(worker_id, incarnation)
        if w is None or w.conn is not None:
            return False  # not that worker now, or it is connected already
        w.conn = conn
        w.pid = pid or w.pid
        w.ready_at = cp.wall()
        w.cold_start_ms = (w.ready_at - (w.start_signal or w.ready_at)) * 1000
        w.last_active = cp.clock()
        if w.state == m.INITIALIZING:
            w.state = m.OUTDATED if w.env_hash != ep.config.env_hash else m.RUNNING
        cp.ledger.state(w, w.state, w.ready_at)  # the bill's history: its process is up
        # Publishes the worker. Jobs waiting are dispatched next (their "code" phase starts).
        self.set_phase(ep, w, None, queued=False)
        if w.stopping:
            conn.send({"op": "exit"})
        cp.kick(ep.name)
        return True

    # ------------------------------------------------------------------ stop
    def lost(self, worker_id: str, incarnation: int) -> None:
        """The worker's connection closed; its process exit follows (or has happened)."""
        _, w = self.find(worker_id, incarnation)
        if w is not None:
            w.conn = None
            if not w.stopping:
                # A worker that drops its connection is gone: make sure the process is too.
                self.stop(w, "lost its connection", kill=True, expected=False)

    def stop(
        self,
        w: m.Worker,
        reason: str,
        *,
        kill: bool = False,
        requeue: bool = False,
        expected: bool = True,
    ) -> None:
        """Ask a worker's process to go. ``requeue``: its jobs go back to the queue now,
        without counting a retry; ``expected=False``: it goes for misbehaving (Unhealthy)."""
        if not w.live:
            return
        cp = self.cp
        if not w.stopping:
            w.stopping = True
            w.expected_exit = expected
            w.reason = self.state_lost(w, reason) if w.holds_state else reason
            if requeue:
                self.requeue(w, count_retry=False)
        handle = w.handle
        if handle == "starting":
            return  # _spawn stops it once the process exists
        if kill:
            cp.provider.kill(handle)
        elif w.conn is not None:
            w.conn.send({"op": "exit"})
        else:
            cp.provider.stop(handle)
        if not kill:
            cp._loop.call_later(STOP_GRACE, self._ensure_dead, w, w.incarnation)

    def _ensure_dead(self, w: m.Worker, inc: int) -> None:
        if w.incarnation == inc and w.live and w.handle != "starting":
            self.cp.provider.kill(w.handle)

    def state_lost(self, w: m.Worker, reason: str) -> str:
        """The notebook names kept on ``w`` are gone (or going): tell every client at once,
        so notebooks can mark their proxies lost (clients filter by worker and incarnation),
        and keep what was lost for the worker's view. Returns ``reason`` saying so."""
        cp = self.cp
        held = {s: sorted(v) for s, v in w.remote_state.items() if v}
        w.lost_state = held
        reason = f"{reason}; its remote state was lost ({m.describe_state(held)})"
        sessions = sorted(held)
        frame = {"op": "state_lost", "worker": w.id, "incarnation": w.incarnation,
                 "endpoint": w.endpoint, "sessions": sessions, "names": held,
                 "reason": reason}  # fmt: skip
        for conn in list(cp.clients):
            conn.send(frame)
        if cp.events.active:
            cp.events.publish("state_lost", worker=w.id, incarnation=w.incarnation,
                              endpoint=w.endpoint, sessions=sessions, names=held,
                              reason=reason)  # fmt: skip
        return reason

    # ------------------------------------------------------------------ exit
    def requeue(self, w: m.Worker, count_retry: bool, reason: str = "") -> None:
        """Put the jobs a worker held back in the queue (front, in order). With
        ``count_retry``, those it was running count a retry; past MAX_RETRIES they fail."""
        cp = self.cp
        ep = cp.endpoints.get(w.endpoint)
        if ep is None:
            return
        held = [cp.jobs[j] for j in w.jobs if j in cp.jobs]
        w.jobs.clear()
        running = ep.config.max_concurrency  # the first ones were executing, the rest waiting
        back: list[m.Job] = []
        # In the order the worker got them (start times may tie on a coarse clock).
        for i, job in enumerate(sorted(held, key=lambda j: j.run_index)):
            if job.status != m.IN_PROGRESS:
                continue
            if count_retry and i < running:
                job.retries += 1
                ep.retried += 1
                if job.retries > MAX_RETRIES:
                    cp._finish(
                        job,
                        m.FAILED,
                        error={
                            "message": f"worker {w.id} {reason} while running this job, "
                            f"{job.retries} times; giving up after {MAX_RETRIES} retries",
                            "type": "WorkerLost",
                        },
                    )
                    continue
                # Never silently: a cell or a call that runs twice says so where it prints.
                cp.tell(
                    ep,
                    job,
                    f"flash: worker {w.id} {reason or 'was lost'} while running "
                    f"this job; running it again (retry {job.retries} of {MAX_RETRIES})\n",
                )
            job.status, job.started, job.worker_id, job.deadline = m.IN_QUEUE, None, None, None
            job.cold, job.cold_start_ms = False, None
            cp.store.update_job(job)
            cp._publish_job(job)
            back.append(job)
        for job in reversed(back):
            ep.queue.appendleft(job.id)

    def on_exit(self, ep: m.EndpointState, w: m.Worker, inc: int, reason: str) -> None:
        """The provider says this incarnation's process has fully stopped."""
        cp = self.cp
        if w.incarnation != inc or not w.live:
            return
        stopped = cp.wall()
        asked = w.stopping  # stopped by the control plane (for misbehaving, when unexpected)
        expected = asked and w.expected_exit
        if not asked and w.holds_state:
            self.state_lost(w, f"worker process {reason}")  # nobody asked it to go
        if w.jobs:
            self.requeue(w, count_retry=True, reason=reason)
        if w.allocation is not None:
            cp.provider.release(w.allocation)
            w.allocation = None
            for other in cp.endpoints.values():
                if any(x.state == m.THROTTLED for x in other.workers.values()):
                    cp.kick(other.name)
        cp.ledger.close(ep, w, stopped, reason)
        if w.remote_state:
            lost = sorted(s for s, v in w.remote_state.items() if v)
            if lost:
                cp._log(ep, None, "system", f"[{w.id}] remote state of {', '.join(lost)} "
                        f"is gone with the worker ({reason})\n")  # fmt: skip
            w.remote_state = {}
        if w.conn is not None:
            w.conn.close()
        w.conn = None
        w.handle = None
        w.pid = None
        w.start_signal = None
        w.stopping = False
        w.phase = None
        if expected:
            w.state = m.IDLE
            w.crashes = 0
        else:
            w.state = m.UNHEALTHY
            w.crashes += 1
            w.retry_at = cp.clock() + backoff(w.crashes)
            why = f"worker process {reason}"
            w.reason = f"{w.reason} ({why})" if asked and w.reason else why
            if w.lost_state:
                w.reason += f"; its remote state was lost ({m.describe_state(w.lost_state)})"
            cp._log(ep, None, "system", f"[{w.id}] {w.reason}; restarting with backoff\n")
            if w.ready_at is None and w.crashes >= START_FAILURES:
                # It never came up, several times over: waiting longer helps nobody.
                self.fail_queued(
                    ep, f"workers of {ep.name!r} fail to start ({w.crashes} times): {w.reason}"
                )
        cp._publish_worker(w)
        if w.removing and ep.name in cp.endpoints:
            del ep.workers[w.id]
        if ep.name in cp.endpoints:
            cp.kick(ep.name)

    def fail_queued(self, ep: m.EndpointState, message: str) -> None:
        """Fail every job waiting on the endpoint (its workers cannot start)."""
        cp = self.cp
        for jid in list(ep.queue):
            job = cp.jobs.get(jid)
            ep.queue.remove(jid)
            if job is not None:
                cp._finish(job, m.FAILED, error={"message": message, "type": "WorkerStartError"})

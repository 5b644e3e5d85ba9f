"""The scheduler: how many workers an endpoint wants, which worker gets which job, and room
for a start that the host cannot take.

``reconcile`` makes the scaling decisions. It is cheap and idempotent and runs after anything
changes (``ControlPlane.kick``, coalesced to once per loop turn per endpoint) and on the
periodic tick. ``pump`` hands queued jobs to ready workers (the hot path: one ``run`` frame
per job). ``make_room`` stops another endpoint's idle worker when a start is throttled.
Starting and stopping processes is the lifecycle's business (``lifecycle.py``); time comes
from ``cp.clock`` (monotonic), so tests can advance it.
"""

from __future__ import annotations

import math
import pickle
from typing import TYPE_CHECKING, Any

from .. import shm
from ..protocol import MAX_META
from . import model as m

if TYPE_CHECKING:
    from .control import ControlPlane

CANCEL_GRACE = 2.0  # seconds a worker has to stop a cancelled job before it is replaced
PREFETCH = 16  # extra jobs queued on a worker when jobs are tiny (see pump)
TINY_MS = 2.0
_START_ORDER = {m.THROTTLED: 0, m.IDLE: 1, m.UNHEALTHY: 2}  # which idle slot starts first


class Scheduler:
    def __init__(self, cp: ControlPlane):
        self.cp = cp

    # ------------------------------------------------------------------ periodic
    def tick(self) -> None:
        """Deadlines (execution_timeout, cancel grace), then reconcile every endpoint."""
        cp = self.cp
        now = cp.clock()
        for ep in list(cp.endpoints.values()):
            for w in list(ep.workers.values()):
                for jid in list(w.jobs):
                    job = cp.jobs.get(jid)
                    if job is None:
                        w.jobs.discard(jid)
                    elif job.status == m.IN_PROGRESS and job.deadline and now > job.deadline:
                        self._timeout(job, w, ep)
                    elif (
                        job.status == m.CANCELLED
                        and job.cancel_sent
                        and now - job.cancel_sent > CANCEL_GRACE
                        and w.live
                        and not w.stopping
                    ):
                        cp.lifecycle.stop(
                            w, f"did not stop cancelled job {jid}", kill=True, requeue=True
                        )
            self.reconcile(ep)
        unmet = getattr(cp.provider, "unmet", None)
        if unmet is not None:
            unmet([ep.config for ep in cp.endpoints.values() for w in ep.workers.values()
                   if w.state == m.THROTTLED and not w.live])  # fmt: skip

    def _timeout(self, job: m.Job, w: m.Worker, ep: m.EndpointState) -> None:
        if job.timeout:  # the request's policy.executionTimeout
            what = f"policy.executionTimeout of {job.timeout * 1000:.0f} ms"
        else:
            what = f"execution_timeout of {ep.config.execution_timeout:g} s"
        self.cp._finish(job, m.TIMED_OUT, error={"message": f"{what} exceeded; worker recycled"})
        self.cp.lifecycle.stop(w, f"job {job.id} timed out", kill=True, requeue=True)

    # ------------------------------------------------------------------ scaling
    def reconcile(self, ep: m.EndpointState) -> None:
        """Start or stop workers so the endpoint has what its queue and settings ask for."""
        cp = self.cp
        if cp.closing:
            return
        if cp.budget.blocks(ep.name):
            cp.budget.enforce(ep)  # the spending guard: nothing starts, idle workers go
            return
        cfg = ep.config
        now = cp.clock()
        if ep.queue:
            self.pump(ep)  # first: cells bound to a vanished worker fail, not scale up
        workers = list(ep.workers.values())
        current = _current(ep)
        want = _want(ep, current, cp.jobs)
        need = want - len(current)
        if need > 0:
            for w in self._startable(ep, now)[:need]:
                cp.lifecycle.start(ep, w)
        else:
            for w in workers:
                if w.state == m.THROTTLED and not w.live:
                    w.state, w.reason = m.IDLE, ""
                    cp._publish_worker(w)
            surplus = len(current) - want
            # A start still waiting for its placement (a live Throttled slot) goes first.
            for w in [w for w in current if w.state == m.THROTTLED][: max(0, surplus)]:
                cp.lifecycle.stop(w, "no longer needed while waiting for resources", kill=True)
                surplus -= 1
            if surplus > 0:
                # Longest idle first, and those keeping no notebook's names before those that do.
                idle = sorted(
                    (
                        w
                        for w in current
                        if w.ready and not w.jobs and now - w.last_active >= cfg.idle_timeout
                    ),
                    key=lambda w: (w.holds_state, w.last_active),
                )
                for w in idle[:surplus]:
                    cp.lifecycle.stop(w, "scaled down (idle timeout)")
        for w in workers:
            if (w.state == m.OUTDATED or w.removing) and w.live and not w.jobs and not w.stopping:
                cp.lifecycle.stop(w, "outdated" if w.state == m.OUTDATED else "scaled down")
        if ep.queue:
            self.pump(ep)

    def _startable(self, ep: m.EndpointState, now: float) -> list[m.Worker]:
        """Slots without a process that may start now, in the order they should."""
        return sorted(
            (
                w
                for w in ep.workers.values()
                if not w.live and not w.removing and (w.state != m.UNHEALTHY or w.retry_at <= now)
            ),
            key=lambda w: _START_ORDER.get(w.state, 3),
        )

    def warm(self, ep: m.EndpointState, n: int) -> int:
        """Start workers now, without a job, until ``n`` (at most ``max``) are up or
        starting; returns how many started. Nothing holds them afterwards: once ready they
        are idle workers like any other, scaled down ``idle_timeout`` after their hello
        (never below ``min``, which this leaves as it is)."""
        cp = self.cp
        if cp.closing or cp.budget.blocks(ep.name):
            return 0
        need = min(n, ep.config.workers_max) - len(_current(ep))
        started = 0
        for w in self._startable(ep, cp.clock())[: max(0, need)]:
            cp.lifecycle.start(ep, w)
            started += w.live
        return started

    def scale_down_in(self, ep: m.EndpointState, w: m.Worker) -> float | None:
        """Seconds until the idle worker ``w`` is scaled down; None if it stays (it is busy,
        or needed for ``min`` or the queue). The same choice ``reconcile`` makes: the
        surplus over what is wanted, longest idle first, notebook state kept longest."""
        if not w.ready or w.jobs or w.removing:
            return None
        if self.cp.budget.blocks(ep.name):
            return 0.0
        current = _current(ep)
        surplus = len(current) - _want(ep, current, self.cp.jobs)
        if surplus <= 0:
            return None
        idle = [x for x in current if x.ready and not x.jobs]
        idle.sort(key=lambda x: (x.holds_state, x.last_active))
        if w not in idle[:surplus]:
            return None
        return max(0.0, ep.config.idle_timeout - (self.cp.clock() - w.last_active))

    def make_room(self, wanting: m.EndpointState) -> None:
        """Free a slot for a throttled start by stopping the longest-idle warm worker of
        another endpoint (never below that endpoint's min, never a busy one): on one
        machine, a warm worker nobody calls should not hold up real work. A worker that
        keeps a notebook's names goes only when no other can: then its owners are told at
        once (a line of output on the waiting job, the worker's reason, a ``state_lost``
        frame to the clients)."""
        cp = self.cp
        if any(w.stopping for e in cp.endpoints.values() for w in e.workers.values()):
            return  # a slot is already on its way back
        best: m.Worker | None = None
        for e in cp.endpoints.values():
            if e is wanting:
                continue
            live = [w for w in e.workers.values() if w.live and not w.stopping]
            if len(live) <= e.config.workers_min:
                continue
            for w in live:
                if not w.ready or w.jobs:
                    continue
                if best is None or (w.holds_state, w.last_active) < (
                    best.holds_state,
                    best.last_active,
                ):
                    best = w
        if best is None:
            return
        held = {s: sorted(v) for s, v in best.remote_state.items() if v}
        if held:
            what = m.describe_state(held)
            text = (
                f"flash: stopped worker {best.id} of endpoint {best.endpoint} to make room for "
                f"{wanting.name}; it held remote state of notebook {what}\n"
            )
            job = next((cp.jobs.get(j) for j in wanting.queue if j in cp.jobs), None)
            if job is not None:
                cp.tell(wanting, job, text)
            else:
                cp._log(wanting, None, "stderr", text)
        cp.lifecycle.stop(best, f"made room for {wanting.name}")  # it tells the clients

    # ------------------------------------------------------------------ dispatch (hot path)
    def pump(self, ep: m.EndpointState) -> None:
        """Hand queued jobs to ready workers, least loaded first.

        A worker holds up to max_concurrency jobs; when jobs are tiny (recent mean under
        TINY_MS), up to PREFETCH more wait on the worker, so it never idles for a round trip.
        """
        jobs = self.cp.jobs
        ready = [w for w in ep.workers.values() if w.ready and not w.removing]
        depth = ep.config.max_concurrency
        if ep.exec_ewma_ms < TINY_MS:
            depth += PREFETCH
        waiting: list[str] = []  # jobs bound to a worker that is busy now
        while ep.queue:
            jid = ep.queue.popleft()
            job = jobs.get(jid)
            if job is None or job.status != m.IN_QUEUE:
                continue
            aff = job.body.get("affinity")
            if aff:
                w = self.affine_worker(ep, job, aff)
                if w is None:
                    if job.status == m.IN_QUEUE and not aff.get("strict"):
                        job.body["affinity"] = None  # its worker is gone: any will do
                        ep.queue.appendleft(jid)
                    continue
                if not w.ready or len(w.jobs) >= ep.config.max_concurrency:
                    waiting.append(jid)
                    continue
                self.send_job(ep, w, job)
                continue
            if not ready:
                waiting.append(jid)
                break
            w = min(ready, key=lambda w: len(w.jobs))
            if len(w.jobs) >= depth:
                waiting.append(jid)
                break
            self.send_job(ep, w, job)
        ep.queue.extendleft(reversed(waiting))

    def affine_worker(self, ep: m.EndpointState, job: m.Job, aff: dict) -> m.Worker | None:
        """The worker holding the notebook state a cell asks for; None if it is gone (a
        strict cell then fails: the names it needs went with that worker)."""
        w = ep.workers.get(aff.get("worker", ""))
        if w is not None and w.live and w.incarnation == aff.get("incarnation") and not w.stopping:
            return w
        if aff.get("strict"):
            names = ", ".join(aff.get("names") or ()) or "its remote names"
            was = w.reason if w is not None and w.reason else "it is no longer running"
            self.cp._finish(
                job,
                m.FAILED,
                error={
                    "type": "RemoteStateLost",
                    "message": f"{names} lived on worker {aff.get('worker')}, which is gone "
                    f"({was}); run the cells that define them again",
                    "names": list(aff.get("names") or ()),
                    "worker": aff.get("worker"),
                },
            )
        return None

    def send_job(self, ep: m.EndpointState, w: m.Worker, job: m.Job) -> None:
        """Hand a queued job to a ready worker. A job that cannot be sent fails, with the
        reason, and leaves the worker as it was; it never stays IN_PROGRESS on a worker that
        did not get it."""
        cp = self.cp
        try:
            frame = self.run_frame(w, job)
        except Exception as e:  # whatever it is, the job must end visibly
            why = f"the job could not be sent to a worker: {type(e).__name__}: {e}"
            cp._finish(job, m.FAILED, error={"message": why, "type": "DispatchError"})
            return
        if frame is None:
            return
        meta, bufs, size = frame
        if size > MAX_META:
            why = (
                f"the job is too large for a worker: its input takes {size} bytes in the run "
                f"frame, over the limit of {MAX_META} bytes ({MAX_META >> 20} MiB) a worker "
                f"accepts; pass large data another way (a file, a URL)"
            )
            cp._finish(job, m.FAILED, error={"message": why, "type": "JobTooLarge"})
            return
        job.status, job.started, job.worker_id = m.IN_PROGRESS, cp.wall(), w.id
        job.incarnation = w.incarnation
        job.hardware, job.emulated, job.price = w.hardware, w.emulated, w.price
        job.cold = w.jobs_run == 0 and w.ready_at is not None and job.created < w.ready_at
        job.cold_start_ms = w.cold_start_ms if job.cold else None
        now = cp.clock()
        limit = job.timeout or ep.config.execution_timeout  # a request's policy first
        if limit:
            job.deadline = now + limit
        w.jobs_run += 1
        job.run_index = w.jobs_run
        w.jobs.add(job.id)
        cp.last_activity = now
        try:
            w.conn.send(meta, bufs)
        except Exception as e:
            w.jobs_run -= 1
            job.started = job.cold_start_ms = None  # it never ran: no cost, no delay
            job.cold = False
            why = f"the job could not be sent to worker {w.id}: {type(e).__name__}: {e}"
            cp._finish(job, m.FAILED, error={"message": why, "type": "DispatchError"})
            return
        if "fnrefs" in meta and job.fn is not None:
            w.fns.add(job.fn)
        if job.cold:  # its first job: the worker now loads its code (until "started")
            job.cold_phases = w.phase_ms
            job.env_source = w.env_source
            job.spare = w.spare
            cp.lifecycle.set_phase(ep, w, "code", queued=False)
        elif len(w.jobs) == 1:
            cp._publish_worker(w)  # idle -> busy
        # IN_PROGRESS is not written: after a crash a running job goes back to the queue
        # anyway, so the row can say IN_QUEUE until the job ends (one commit per job saved).
        cp._publish_job(job)

    def run_frame(self, w: m.Worker, job: m.Job) -> tuple[dict[str, Any], list[Any], int] | None:
        """The run frame of ``job`` for ``w``, and the size of the part a worker caps
        (MAX_META): a JSON job's input travels inside it. None if the job failed already."""
        meta: dict[str, Any] = {"op": "run", "id": job.id, "kind": job.kind}
        bufs: list[Any] = []
        body = job.body
        if job.fn is not None:
            meta["fn"] = job.fn
            if job.fn not in w.fns:
                f = self.cp.get_function(job.fn)
                if f is None:
                    self.cp._finish(job, m.FAILED, error={"message": "function payload lost"})
                    return None
                meta["fnc"] = f[0]
                meta["fnrefs"] = _refs(w, f[1], bufs)
        elif body.get("fn_blobs"):
            meta["fnc"] = body["fn_codec"]
            meta["fnrefs"] = _refs(w, body["fn_blobs"], bufs)
        size = 0
        if job.kind == "json":
            meta["input"] = body.get("input")
            # Measured as the wire encodes it (a second encoding, for JSON jobs only: their
            # input is the one part of a run frame's metadata that can be large).
            size = len(pickle.dumps(meta, protocol=5))
        else:
            meta["c"] = body.get("codec", "cloudpickle")
            meta["refs"] = _refs(w, body.get("blobs") or (), bufs)
            meta["stamp"] = body.get("stamp")
            if body.get("paths"):
                meta["paths"] = body["paths"]
            if body.get("noshm"):
                meta["noshm"] = True
        return meta, bufs, size


def _refs(w: m.Worker, blobs: Any, bufs: list[Any]) -> list[Any]:
    """``shm.to_refs`` for ``w``: a worker on another host cannot open the spool, so the
    spooled buffers it needs travel inline (mapped here, sent from the mapping)."""
    if w.allocation is None or w.allocation.same_host:
        return shm.to_refs(blobs, bufs)
    inline = [shm.open_blob(list(b), []) if isinstance(b, shm.SpoolRef) else b for b in blobs]
    return shm.to_refs(inline, bufs)


def _current(ep: m.EndpointState) -> list[m.Worker]:
    """Workers up or starting that count toward the endpoint's scale."""
    return [w for w in ep.workers.values() if w.live and w.state != m.OUTDATED and not w.stopping]


def _want(ep: m.EndpointState, current: list[m.Worker], jobs: dict[str, m.Job]) -> int:
    """How many workers the endpoint wants now: its queue and jobs, within min..max."""
    cfg = ep.config
    demand = _scaling_queue(ep, jobs) + sum(len(w.jobs) for w in current)
    return max(cfg.workers_min, min(cfg.workers_max, math.ceil(demand / cfg.max_concurrency)))


def _scaling_queue(ep: m.EndpointState, jobs: dict[str, m.Job]) -> int:
    """Queued jobs that may make the endpoint scale up: not those with ``lowPriority``
    (Runpod's rule: they run on workers that are up, started for ``min`` or other jobs).
    They queue at the end, so only that run of the queue is read."""
    n = len(ep.queue)
    if not ep.has_low:
        return n
    while n and (job := jobs.get(ep.queue[n - 1])) is not None and job.low:
        n -= 1
    return n

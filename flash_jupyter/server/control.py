"""The control plane's core: endpoints, the job queue, the worker lifecycle, billing.

Everything here runs on one asyncio loop, so no locks: the HTTP routes, the wire
connections and the provider's exit callbacks all call into ``ControlPlane`` from the loop.
Scaling decisions are made by ``_reconcile``, which is cheap and idempotent and runs after
anything changes (coalesced to once per loop turn per endpoint) and on a periodic tick.
"""

from __future__ import annotations

import asyncio
import math
import os
import pickle
import sys
import time
import uuid
from collections import deque
from typing import Any

from .. import credentials, shm
from ..config import EndpointConfig
from ..errors import ConfigError
from ..protocol import MAX_META
from ..providers.base import Allocation, PlacementError, Provider, WorkerSpec
from . import model as m
from .events import EventBus
from .spool_keeper import SpoolKeeper
from .store import Store
from .views import Views

START_FAILURES = 3  # a worker that dies this often before connecting fails the queue
MAX_RETRIES = int(os.environ.get("FLASH_JUPYTER_MAX_RETRIES", "2"))
RECENT_JOBS = 10_000  # finished jobs kept in memory; older ones are read from the store
RESULT_TTL = 30 * 60  # seconds a finished job stays queryable (Runpod keeps /run results 30 min)
CANCEL_GRACE = 2.0  # seconds a worker has to stop a cancelled job before it is replaced
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
TICK = 0.1
PREFETCH = 16  # extra jobs queued on a worker when jobs are tiny (see _pump)
TINY_MS = 2.0
INPUT_PARTS = ("input", "blobs", "fn_blobs")  # what a job holds only until it is over


def backoff(crashes: int) -> float:
    return min(60.0, 0.5 * 2 ** max(0, crashes - 1))


class NotFound(KeyError):
    pass


class ControlPlane(Views, SpoolKeeper):
    def __init__(
        self,
        store: Store,
        provider: Provider,
        *,
        token: str,
        wire_addr: tuple[str, int],
        events: EventBus | None = None,
        spool: str | None = None,
        spare: Any = None,
    ):
        self.spool = spool
        self._prespawned_spare = spare  # started by boot.py before the heavy imports
        self.store = store
        self.provider = provider
        self.token = token
        self.wire_addr = wire_addr
        self.events = events or EventBus()
        self.endpoints: dict[str, m.EndpointState] = {}
        self.jobs: dict[str, m.Job] = {}
        self.functions: dict[str, tuple[str, list[Any]]] = {}
        self.started = time.time()
        self._dirty: set[str] = set()
        self._kick_scheduled = False
        self._tick_task: asyncio.Task | None = None
        self._last_prune = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.clients: set[Any] = set()  # open client connections
        self._recent: deque[str] = deque()  # finished jobs kept in memory, oldest first
        self.last_activity = 0.0  # monotonic time of the last dispatch or finish
        self.writers: dict[str, Any] = {}  # spool writer folder -> its connection

    # ------------------------------------------------------------------ startup
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.bind_loop(self._loop.call_soon)
        for row in self.store.load_endpoints():
            cfg, dropped = _stored_config(row["config"])
            ep = m.EndpointState(cfg, row["handler"], row["created"], row["updated"])
            self.endpoints[cfg.name] = ep
            self._ensure_slots(ep)
            if dropped:
                # Written by a version that let NaN or Infinity through: repaired, not fatal.
                note = (f"stored setting(s) {', '.join(dropped)} of endpoint {cfg.name!r} "
                        f"were not finite numbers; reset to their defaults")  # fmt: skip
                print(f"flash-jupyter: {note}", file=sys.stderr, flush=True)
                self._log(ep, None, "system", note + "\n")
                self.store.save_endpoint(cfg.name, cfg.to_dict(), cfg.config_hash, ep.handler,
                                         ep.created, ep.updated)  # fmt: skip
        for ep in self.endpoints.values():
            tot = self.store.ledger_total(ep.name, ep.created)
            ep.billed_seconds, ep.billed_cost = int(tot["seconds"]), tot["cost"]
        for ep_name, counts in self.store.job_counts().items():
            if ep_name in self.endpoints:
                self.endpoints[ep_name].completed = counts["completed"]
                self.endpoints[ep_name].failed = counts["failed"]
        for row in self.store.load_jobs(recent=RECENT_JOBS):
            ep = self.endpoints.get(row["endpoint"])
            job = _job_from_row(row)
            if job.status in m.TERMINAL:
                _forget_inputs(job)
                self.jobs[job.id] = job
                self._recent.append(job.id)
                continue
            if ep is None and job.status not in m.TERMINAL:
                job.status, job.error = m.FAILED, {"message": "endpoint was deleted"}
                job.finished = time.time()
                self.store.update_job(job)
            self.jobs[job.id] = job
            if job.status == m.IN_PROGRESS and ep is not None:
                # Its worker went down with the previous control plane: run it again.
                job.status, job.started, job.worker_id = m.IN_QUEUE, None, None
                ep.retried += 1
                self.store.update_job(job)
            if job.status == m.IN_QUEUE and ep is not None:
                ep.queue.append(job.id)
        self.clean_spool()
        keep = {ep.handler for ep in self.endpoints.values() if ep.handler}
        keep.update(j.fn for j in self.jobs.values() if j.fn and j.status not in m.TERMINAL)
        self.store.prune_functions(keep)
        for name in self.endpoints:
            self.kick(name)
        self._tick_task = asyncio.ensure_future(self._ticker())
        prepare = getattr(self.provider, "prepare", None)
        if prepare is not None:
            await prepare(self.wire_addr, self.token, self.quiet, self._prespawned_spare)

    async def shutdown(self) -> None:
        """Stop every worker and wait for them, so the ledger closes every bill."""
        self.closing = True
        if self._tick_task:
            self._tick_task.cancel()
        close = getattr(self.provider, "close", None)
        if close is not None:
            close()
        live = [w for ep in self.endpoints.values() for w in ep.workers.values() if w.live]
        for w in live:
            self._stop_worker(w, "control plane stopping", requeue=True)
        deadline = time.monotonic() + STOP_GRACE + 2
        while any(w.live for w in live) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.store.flush()

    # ------------------------------------------------------------------ endpoints
    def _ensure_slots(self, ep: m.EndpointState) -> None:
        """An endpoint has ``workers_max`` worker slots; Idle ones hold no process."""
        slots = [w for w in ep.workers.values() if not w.removing]
        while len(slots) < ep.config.workers_max:
            wid = f"{ep.name}-{ep.next_worker}"
            ep.next_worker += 1
            w = m.Worker(wid, ep.name)
            ep.workers[wid] = w
            slots.append(w)
        extra = len(slots) - ep.config.workers_max
        if extra > 0:
            # Drop idle slots first, then ask busy ones to go when done.
            order = sorted(slots, key=lambda w: (w.live, len(w.jobs)))
            for w in order[:extra]:
                if w.live:
                    w.removing = True
                else:
                    del ep.workers[w.id]

    def deploy(self, cfg: EndpointConfig, handler: str | None = None) -> dict[str, Any]:
        """Create, reuse or update an endpoint by name (the Runpod rule)."""
        # Refuse what can never be placed (strict GPU mode) before recording anything.
        try:
            alloc = self.provider.allocate(cfg)
        except PlacementError:
            raise
        if alloc is not None:
            self.provider.release(alloc)
        now = time.time()
        ep = self.endpoints.get(cfg.name)
        if ep is None:
            ep = m.EndpointState(cfg, handler, now, now)
            self.endpoints[cfg.name] = ep
            action = "created"
        elif ep.config == cfg:
            action = "reused"
            if handler and handler != ep.handler:
                ep.handler = handler
            else:
                self._ensure_slots(ep)
                return self._deploy_answer(ep, action)
        else:
            old = ep.config
            ep.config, ep.updated = cfg, now
            if handler:
                ep.handler = handler
            action = "updated"
            if old.env_hash != cfg.env_hash:
                for w in ep.workers.values():
                    if w.live and w.env_hash != cfg.env_hash:
                        w.state = m.OUTDATED
                        self._publish_worker(w)
        self._ensure_slots(ep)
        self.store.save_endpoint(cfg.name, cfg.to_dict(), cfg.config_hash, ep.handler,
                                 ep.created, ep.updated)  # fmt: skip
        self.events.publish("endpoint", name=cfg.name, action=action)
        self.kick(cfg.name)
        return self._deploy_answer(ep, action)

    def _deploy_answer(self, ep: m.EndpointState, action: str) -> dict[str, Any]:
        return {"name": ep.name, "action": action, "config_hash": ep.config.config_hash}

    def endpoint(self, name: str) -> m.EndpointState:
        ep = self.endpoints.get(name)
        if ep is None:
            raise NotFound(f"no endpoint named {name!r}")
        return ep

    def scale(self, name: str, wmin: int, wmax: int) -> dict[str, Any]:
        ep = self.endpoint(name)
        d = ep.config.to_dict()
        d["workers_min"], d["workers_max"] = wmin, wmax
        return self.deploy(EndpointConfig.from_dict(d))

    def stop_endpoint(self, name: str) -> dict[str, Any]:
        """Scale to zero now: idle workers stop at once, busy ones after their job."""
        ep = self.endpoint(name)
        if ep.config.workers_min:
            self.scale(name, 0, ep.config.workers_max)
        for w in ep.workers.values():
            if w.live and not w.jobs:
                self._stop_worker(w, "stopped by user")
        self.kick(name)
        return {"name": name, "stopping": sum(w.live for w in ep.workers.values())}

    def delete_endpoint(self, name: str) -> None:
        ep = self.endpoint(name)
        for jid in list(ep.queue):
            self.cancel(jid, reason="endpoint deleted")
        for w in ep.workers.values():
            for jid in list(w.jobs):
                self.cancel(jid, reason="endpoint deleted")
            w.removing = True
            if w.live:
                self._stop_worker(w, "endpoint deleted")
        del self.endpoints[name]
        self.store.delete_endpoint(name)
        self.events.publish("endpoint", name=name, action="deleted")

    def put_function(self, h: str, codec: str, blobs: list[Any]) -> None:
        if h not in self.functions:
            self.functions[h] = (codec, blobs)
            self.store.save_function(h, codec, blobs)

    def get_function(self, h: str) -> tuple[str, list[Any]] | None:
        f = self.functions.get(h)
        if f is None:
            f = self.store.load_function(h)
            if f is not None:
                self.functions[h] = f
        return f

    # ------------------------------------------------------------------ jobs
    def submit(
        self,
        endpoint: str,
        kind: str,
        body: dict[str, Any],
        *,
        fn: str | None = None,
        owner: Any = None,
        job_id: str | None = None,
        on_commit: Any = None,
    ) -> m.Job:
        ep = self.endpoint(endpoint)
        if kind == "json":
            if ep.handler is None:
                raise ValueError(
                    f"endpoint {endpoint!r} has no handler yet: call or deploy its function "
                    f"from Python once (e.g. fn.deploy()) before calling it over HTTP"
                )
            fn = ep.handler
        jid = job_id or uuid.uuid4().hex
        old = self.jobs.get(jid)
        if old is not None and old.status not in m.TERMINAL:
            raise ValueError(f"job id {jid!r} already exists")
        job = m.Job(jid, endpoint, kind, fn, body, owner=owner)
        # The store serializes the job first: a body it cannot take raises here, before the
        # job is anywhere (no queued id nobody was told of, no worker left holding it).
        self.store.insert_job(job, after=on_commit)
        self.jobs[jid] = job
        ep.queue.append(jid)
        self._publish_job(job)
        self.kick(endpoint)
        return job

    def find_job(self, job_id: str) -> m.Job | None:
        """A job in memory, or a finished one from the store (older than the recent few)."""
        job = self.jobs.get(job_id)
        if job is None:
            row = self.store.load_job(job_id)
            if row is not None:
                job = _job_from_row(row)
        return job

    def job(self, job_id: str, endpoint: str | None = None) -> m.Job:
        job = self.find_job(job_id)
        if job is None or (endpoint is not None and job.endpoint != endpoint):
            raise NotFound(
                f"no job {job_id!r}" + (f" on endpoint {endpoint!r}" if endpoint else "")
            )
        return job

    def cancel(self, job_id: str, reason: str = "cancelled") -> m.Job:
        job = self.job(job_id)
        if job.status in m.TERMINAL:
            return job
        ep = self.endpoints.get(job.endpoint)
        if job.status == m.IN_QUEUE:
            if ep is not None:
                try:
                    ep.queue.remove(job.id)
                except ValueError:
                    pass
            self._finish(job, m.CANCELLED, error={"message": reason})
            return job
        w = ep.workers.get(job.worker_id) if ep and job.worker_id else None
        if w is not None and w.conn is not None:
            w.conn.send({"op": "cancel", "id": job.id})
        job.cancel_sent = time.monotonic()
        self._finish(job, m.CANCELLED, error={"message": reason}, keep_on_worker=True)
        return job

    def purge_queue(self, endpoint: str) -> int:
        ep = self.endpoint(endpoint)
        ids = list(ep.queue)
        for jid in ids:
            self.cancel(jid, reason="queue purged")
        return len(ids)

    def _finish(
        self,
        job: m.Job,
        status: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        keep_on_worker: bool = False,
    ) -> None:
        if job.status in m.TERMINAL:
            return
        job.status = status
        job.finished = time.time()
        self.last_activity = time.monotonic()
        job.result, job.error = result, error
        ep = self.endpoints.get(job.endpoint)
        w = ep.workers.get(job.worker_id) if ep and job.worker_id else None
        if w is not None:
            if not keep_on_worker:
                w.jobs.discard(job.id)
            w.last_active = time.monotonic()
        if ep is not None:
            price = w.price if w is not None and w.live else ep.config.price_per_second
            if job.started is not None:
                secs = job.finished - job.started
                if job.cold and job.cold_start_ms:
                    secs += job.cold_start_ms / 1000
                job.cost = secs * price
                ms = (job.finished - job.started) * 1000
                ep.exec_ewma_ms = 0.8 * ep.exec_ewma_ms + 0.2 * ms
            if status == m.COMPLETED:
                ep.completed += 1
            else:
                ep.failed += 1
        if job.owner is not None and job.kind == "py" and status == m.COMPLETED:
            # The result goes straight to its caller; the row only records the outcome. If
            # it never arrives (a crash in between), the caller resubmits (see op_watch).
            self.store.update_job(job, with_result=False)
        else:
            self.store.update_job(job)
        self._drop_inputs(job)
        _forget_inputs(job)  # after _drop_inputs, which reads them
        self._recent.append(job.id)
        while len(self._recent) > RECENT_JOBS:
            old = self.jobs.get(self._recent.popleft())
            if old is not None and old.status in m.TERMINAL:
                del self.jobs[old.id]
        if job.owner is not None:
            job.owner.deliver(job)
        for fut in job.waiters:
            if not fut.done():
                fut.set_result(job)
        job.waiters.clear()
        self._publish_job(job)
        if ep is not None:
            self.kick(ep.name)

    # ------------------------------------------------------------------ scaling
    def quiet(self, seconds: float = 0.3) -> bool:
        """No job was dispatched or finished for ``seconds``: a moment for background work."""
        return time.monotonic() - self.last_activity > seconds

    def kick(self, name: str) -> None:
        """Reconcile this endpoint soon (once per loop turn, however often asked)."""
        self._dirty.add(name)
        if not self._kick_scheduled and self._loop is not None:
            self._kick_scheduled = True
            self._loop.call_soon(self._run_kicks)

    def _run_kicks(self) -> None:
        self._kick_scheduled = False
        dirty, self._dirty = self._dirty, set()
        for name in dirty:
            ep = self.endpoints.get(name)
            if ep is not None:
                self._reconcile(ep)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self._tick()
            except Exception:
                import traceback

                traceback.print_exc()

    def _tick(self) -> None:
        now = time.monotonic()
        for ep in list(self.endpoints.values()):
            for w in list(ep.workers.values()):
                for jid in list(w.jobs):
                    job = self.jobs.get(jid)
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
                        self._stop_worker(
                            w, f"did not stop cancelled job {jid}", kill=True, requeue=True
                        )
            self._reconcile(ep)
        if now - self._last_prune > 60:
            self._last_prune = now
            self._prune()

    def _timeout(self, job: m.Job, w: m.Worker, ep: m.EndpointState) -> None:
        limit = ep.config.execution_timeout
        self._finish(
            job,
            m.TIMED_OUT,
            error={"message": f"execution_timeout of {limit:g} s exceeded; worker recycled"},
        )
        self._stop_worker(w, f"job {job.id} timed out", kill=True, requeue=True)

    def _prune(self) -> None:
        cutoff = time.time() - RESULT_TTL
        old = [j for j in self.jobs.values() if j.finished is not None and j.finished < cutoff]
        for j in old:
            self._drop_results(j)
            del self.jobs[j.id]
        self.store.delete_jobs_before(cutoff)

    def _reconcile(self, ep: m.EndpointState) -> None:
        if self.closing:
            return
        cfg = ep.config
        now = time.monotonic()
        if ep.queue:
            self._pump(ep)  # first: cells bound to a vanished worker fail, not scale up
        workers = list(ep.workers.values())
        current = [w for w in workers if w.live and w.state != m.OUTDATED and not w.stopping]
        demand = len(ep.queue) + sum(len(w.jobs) for w in current)
        want = max(cfg.workers_min, min(cfg.workers_max, math.ceil(demand / cfg.max_concurrency)))
        need = want - len(current)
        if need > 0:
            order = {m.THROTTLED: 0, m.IDLE: 1, m.UNHEALTHY: 2}
            spare = sorted(
                (
                    w
                    for w in workers
                    if not w.live
                    and not w.removing
                    and (w.state != m.UNHEALTHY or w.retry_at <= now)
                ),
                key=lambda w: order.get(w.state, 3),
            )
            for w in spare[:need]:
                self._start_worker(ep, w)
        else:
            for w in workers:
                if w.state == m.THROTTLED:
                    w.state = m.IDLE
                    self._publish_worker(w)
            surplus = len(current) - want
            if surplus > 0:
                idle = [
                    w
                    for w in current
                    if w.ready and not w.jobs and now - w.last_active >= cfg.idle_timeout
                ]
                for w in idle[:surplus]:
                    self._stop_worker(w, "idle timeout")
        for w in workers:
            if (w.state == m.OUTDATED or w.removing) and w.live and not w.jobs and not w.stopping:
                self._stop_worker(w, "outdated" if w.state == m.OUTDATED else "scaled down")
        if ep.queue:
            self._pump(ep)

    def _pump(self, ep: m.EndpointState) -> None:
        """Hand queued jobs to ready workers, least loaded first.

        A worker holds up to max_concurrency jobs; when jobs are tiny (recent mean under
        TINY_MS), up to PREFETCH more wait on the worker, so it never idles for a round trip.
        """
        ready = [w for w in ep.workers.values() if w.ready and not w.removing]
        depth = ep.config.max_concurrency
        if ep.exec_ewma_ms < TINY_MS:
            depth += PREFETCH
        waiting: list[str] = []  # jobs bound to a worker that is busy now
        while ep.queue:
            jid = ep.queue.popleft()
            job = self.jobs.get(jid)
            if job is None or job.status != m.IN_QUEUE:
                continue
            aff = job.body.get("affinity")
            if aff:
                w = self._affine_worker(ep, job, aff)
                if w is None:
                    if job.status == m.IN_QUEUE and not aff.get("strict"):
                        job.body["affinity"] = None  # its worker is gone: any will do
                        ep.queue.appendleft(jid)
                    continue
                if not w.ready or len(w.jobs) >= ep.config.max_concurrency:
                    waiting.append(jid)
                    continue
                self._send_job(ep, w, job)
                continue
            if not ready:
                waiting.append(jid)
                break
            w = min(ready, key=lambda w: len(w.jobs))
            if len(w.jobs) >= depth:
                waiting.append(jid)
                break
            self._send_job(ep, w, job)
        ep.queue.extendleft(reversed(waiting))

    def _affine_worker(self, ep: m.EndpointState, job: m.Job, aff: dict) -> m.Worker | None:
        """The worker holding the notebook state a cell asks for; None if it is gone (a
        strict cell then fails: the names it needs went with that worker)."""
        w = ep.workers.get(aff.get("worker", ""))
        if w is not None and w.live and w.incarnation == aff.get("incarnation") and not w.stopping:
            return w
        if aff.get("strict"):
            names = ", ".join(aff.get("names") or ()) or "its remote names"
            was = w.reason if w is not None and w.reason else "it is no longer running"
            self._finish(
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

    def _send_job(self, ep: m.EndpointState, w: m.Worker, job: m.Job) -> None:
        """Hand a queued job to a ready worker. A job that cannot be sent fails, with the
        reason, and leaves the worker as it was; it never stays IN_PROGRESS on a worker that
        did not get it."""
        try:
            frame = self._run_frame(w, job)
        except Exception as e:  # whatever it is, the job must end visibly
            why = f"the job could not be sent to a worker: {type(e).__name__}: {e}"
            self._finish(job, m.FAILED, error={"message": why, "type": "DispatchError"})
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
            self._finish(job, m.FAILED, error={"message": why, "type": "JobTooLarge"})
            return
        now = time.time()
        job.status, job.started, job.worker_id = m.IN_PROGRESS, now, w.id
        job.incarnation = w.incarnation
        job.hardware = w.hardware
        job.cold = w.jobs_run == 0 and w.ready_at is not None and job.created < w.ready_at
        job.cold_start_ms = w.cold_start_ms if job.cold else None
        if ep.config.execution_timeout:
            job.deadline = time.monotonic() + ep.config.execution_timeout
        w.jobs_run += 1
        w.jobs.add(job.id)
        self.last_activity = time.monotonic()
        try:
            w.conn.send(meta, bufs)
        except Exception as e:
            w.jobs_run -= 1
            job.started = job.cold_start_ms = None  # it never ran: no cost, no delay
            job.cold = False
            why = f"the job could not be sent to worker {w.id}: {type(e).__name__}: {e}"
            self._finish(job, m.FAILED, error={"message": why, "type": "DispatchError"})
            return
        if "fnrefs" in meta and job.fn is not None:
            w.fns.add(job.fn)
        # IN_PROGRESS is not written: after a crash a running job goes back to the queue
        # anyway, so the row can say IN_QUEUE until the job ends (one commit per job saved).
        self._publish_job(job)

    def _run_frame(self, w: m.Worker, job: m.Job) -> tuple[dict[str, Any], list[Any], int] | None:
        """The run frame of ``job`` for ``w``, and the size of the part a worker caps
        (MAX_META): a JSON job's input travels inside it. None if the job failed already."""
        meta: dict[str, Any] = {"op": "run", "id": job.id, "kind": job.kind}
        bufs: list[Any] = []
        body = job.body
        if job.fn is not None:
            meta["fn"] = job.fn
            if job.fn not in w.fns:
                f = self.get_function(job.fn)
                if f is None:
                    self._finish(job, m.FAILED, error={"message": "function payload lost"})
                    return None
                meta["fnc"] = f[0]
                meta["fnrefs"] = shm.to_refs(f[1], bufs)
        elif body.get("fn_blobs"):
            meta["fnc"] = body["fn_codec"]
            meta["fnrefs"] = shm.to_refs(body["fn_blobs"], bufs)
        size = 0
        if job.kind == "json":
            meta["input"] = body.get("input")
            # Measured as the wire encodes it (a second encoding, for JSON jobs only: their
            # input is the one part of a run frame's metadata that can be large).
            size = len(pickle.dumps(meta, protocol=5))
        else:
            meta["c"] = body.get("codec", "cloudpickle")
            meta["refs"] = shm.to_refs(body.get("blobs") or (), bufs)
            meta["stamp"] = body.get("stamp")
            if body.get("paths"):
                meta["paths"] = body["paths"]
            if body.get("noshm"):
                meta["noshm"] = True
        return meta, bufs, size

    # ------------------------------------------------------------------ workers
    def _start_worker(self, ep: m.EndpointState, w: m.Worker) -> None:
        cfg = ep.config
        try:
            alloc = self.provider.allocate(cfg)
        except PlacementError as e:
            self._fail_queued(ep, str(e))
            return
        if alloc is None:
            self._reclaim_idle(ep)
            if w.state != m.THROTTLED:
                w.state = m.THROTTLED
                w.reason = "waiting for host resources"
                self._publish_worker(w)
            return
        w.incarnation += 1
        w.allocation = alloc
        w.hardware, w.emulated = alloc.hardware, alloc.emulated
        w.state = m.INITIALIZING
        w.reason = ""
        w.start_signal = time.time()
        w.ready_at = None
        w.cold_start_ms = None
        w.env_hash = cfg.env_hash
        w.price = _price(cfg, alloc)
        w.jobs_run = 0
        w.fns = set()
        w.remote_state = {}
        w.stopping = False
        w.handle = "starting"
        self._publish_worker(w)
        cred = credentials.worker_credential(self.token, w.id, w.incarnation)
        spec = WorkerSpec(w.id, w.incarnation, cfg, alloc, self.wire_addr, cred, self.spool)
        w.spawn_task = asyncio.ensure_future(self._spawn(ep, w, spec))  # type: ignore[attr-defined]

    def _reclaim_idle(self, wanting: m.EndpointState) -> None:
        """Free a slot for a throttled start by stopping the longest-idle warm worker of
        another endpoint (never below that endpoint's min, never a busy one): on one
        machine, a warm worker nobody calls should not hold up real work."""
        if any(w.stopping for e in self.endpoints.values() for w in e.workers.values()):
            return  # a slot is already on its way back
        best: m.Worker | None = None
        for e in self.endpoints.values():
            if e is wanting:
                continue
            live = [w for w in e.workers.values() if w.live and not w.stopping]
            if len(live) <= e.config.workers_min:
                continue
            for w in live:
                if w.ready and not w.jobs and (best is None or w.last_active < best.last_active):
                    best = w
        if best is not None:
            self._stop_worker(best, f"made room for {wanting.name}")

    async def _spawn(self, ep: m.EndpointState, w: m.Worker, spec: WorkerSpec) -> None:
        inc = w.incarnation

        async def on_exit(rc: int | None, reason: str) -> None:
            self._on_exit(ep, w, inc, reason)

        try:
            handle = await self.provider.start(spec, on_exit)
        except Exception as e:
            if w.incarnation == inc:
                msg = f"worker could not start: {e}"
                self._on_exit(ep, w, inc, msg)
                self._fail_queued(ep, msg)
            return
        if w.incarnation != inc:
            return
        w.handle = handle
        w.pid = self.provider.pid(handle)
        if w.stopping:
            self.provider.stop(handle)

    def worker_hello(self, worker_id: str, incarnation: int, conn: Any, pid: int | None) -> bool:
        ep_name = worker_id.rsplit("-", 1)[0]
        ep = self.endpoints.get(ep_name)
        w = ep.workers.get(worker_id) if ep else None
        if w is None or w.incarnation != incarnation or not w.live or w.conn is not None:
            return False  # not that worker now, or it is connected already
        w.conn = conn
        w.pid = pid or w.pid
        w.ready_at = time.time()
        w.cold_start_ms = (w.ready_at - (w.start_signal or w.ready_at)) * 1000
        w.last_active = time.monotonic()
        if w.state == m.INITIALIZING:
            w.state = m.OUTDATED if w.env_hash != ep.config.env_hash else m.RUNNING
        self._publish_worker(w)
        if w.stopping:
            conn.send({"op": "exit"})
        self.kick(ep.name)
        return True

    def worker_lost(self, worker_id: str, incarnation: int) -> None:
        """The worker's connection closed; its process exit follows (or has happened)."""
        ep = self.endpoints.get(worker_id.rsplit("-", 1)[0])
        w = ep.workers.get(worker_id) if ep else None
        if w is not None and w.incarnation == incarnation and w.live:
            w.conn = None
            if not w.stopping:
                # A worker that drops its connection is gone: make sure the process is too.
                self._stop_worker(w, "lost its connection", kill=True, expected=False)

    def _stop_worker(
        self,
        w: m.Worker,
        reason: str,
        *,
        kill: bool = False,
        requeue: bool = False,
        expected: bool = True,
    ) -> None:
        if not w.live:
            return
        if not w.stopping:
            w.stopping = True
            w.expected_exit = expected  # type: ignore[attr-defined]
            w.reason = reason
            if requeue:
                self._requeue(w, count_retry=False)
        handle = w.handle
        if handle == "starting":
            return  # _spawn stops it once the process exists
        if kill:
            self.provider.kill(handle)
        elif w.conn is not None:
            w.conn.send({"op": "exit"})
        else:
            self.provider.stop(handle)
        if not kill:
            self._loop.call_later(STOP_GRACE, self._ensure_dead, w, w.incarnation)

    def _ensure_dead(self, w: m.Worker, inc: int) -> None:
        if w.incarnation == inc and w.live and w.handle != "starting":
            self.provider.kill(w.handle)

    def _requeue(self, w: m.Worker, count_retry: bool, reason: str = "") -> None:
        """Put the jobs a worker held back in the queue (front, in order)."""
        ep = self.endpoints.get(w.endpoint)
        if ep is None:
            return
        held = [self.jobs[j] for j in w.jobs if j in self.jobs]
        w.jobs.clear()
        running = ep.config.max_concurrency  # the first ones were executing, the rest waiting
        back: list[m.Job] = []
        for i, job in enumerate(sorted(held, key=lambda j: j.started or 0)):
            if job.status != m.IN_PROGRESS:
                continue
            if count_retry and i < running:
                job.retries += 1
                ep.retried += 1
                if job.retries > MAX_RETRIES:
                    self._finish(
                        job,
                        m.FAILED,
                        error={
                            "message": f"worker {w.id} {reason} while running this job, "
                            f"{job.retries} times; giving up after {MAX_RETRIES} retries",
                            "type": "WorkerLost",
                        },
                    )
                    continue
            job.status, job.started, job.worker_id, job.deadline = m.IN_QUEUE, None, None, None
            job.cold, job.cold_start_ms = False, None
            self.store.update_job(job)
            self._publish_job(job)
            back.append(job)
        for job in reversed(back):
            ep.queue.appendleft(job.id)

    def _on_exit(self, ep: m.EndpointState, w: m.Worker, inc: int, reason: str) -> None:
        if w.incarnation != inc or not w.live:
            return
        stopped = time.time()
        expected = w.stopping and getattr(w, "expected_exit", True)
        if w.jobs:
            self._requeue(w, count_retry=True, reason=reason)
        if w.allocation is not None:
            self.provider.release(w.allocation)
            w.allocation = None
            for other in self.endpoints.values():
                if any(x.state == m.THROTTLED for x in other.workers.values()):
                    self.kick(other.name)
        if w.start_signal is not None:
            secs = max(1, math.ceil(stopped - w.start_signal))
            cost = secs * w.price
            ep.billed_seconds += secs
            ep.billed_cost += cost
            ep.session_seconds += secs
            ep.session_cost += cost
            self.store.add_ledger(w.id, ep.name, w.hardware, w.emulated, w.start_signal,
                                  stopped, secs, cost)  # fmt: skip
            self.events.publish("billing", worker=w.id, endpoint=ep.name, seconds=secs,
                                cost=cost, estimate=w.emulated)  # fmt: skip
        if w.remote_state:
            lost = sorted(s for s, v in w.remote_state.items() if v)
            if lost:
                self._log(ep, None, "system", f"[{w.id}] remote state of {', '.join(lost)} "
                          f"is gone with the worker ({reason})\n")  # fmt: skip
            w.remote_state = {}
        if w.conn is not None:
            w.conn.close()
        w.conn = None
        w.handle = None
        w.pid = None
        w.start_signal = None
        w.stopping = False
        if expected:
            w.state = m.IDLE
            w.crashes = 0
        else:
            w.state = m.UNHEALTHY
            w.crashes += 1
            w.retry_at = time.monotonic() + backoff(w.crashes)
            w.reason = f"worker process {reason}"
            self._log(ep, None, "system", f"[{w.id}] {w.reason}; restarting with backoff\n")
            if w.ready_at is None and w.crashes >= START_FAILURES:
                # It never came up, several times over: waiting longer helps nobody.
                self._fail_queued(
                    ep, f"workers of {ep.name!r} fail to start ({w.crashes} times): {w.reason}"
                )
        self._publish_worker(w)
        if w.removing and ep.name in self.endpoints:
            del ep.workers[w.id]
        if ep.name in self.endpoints:
            self.kick(ep.name)

    def _fail_queued(self, ep: m.EndpointState, message: str) -> None:
        for jid in list(ep.queue):
            job = self.jobs.get(jid)
            ep.queue.remove(jid)
            if job is not None:
                self._finish(job, m.FAILED, error={"message": message, "type": "WorkerStartError"})

    # ------------------------------------------------------------------ worker messages
    def worker_frame(
        self, worker_id: str, conn: Any, meta: dict[str, Any], bufs: list[bytearray]
    ) -> None:
        """A frame from a worker. It speaks for its own jobs only: anything naming another
        job is ignored, and malformed frames raise (the connection then stops the worker)."""
        op = meta.get("op")
        if op == "done":
            self._job_done(worker_id, conn, meta, bufs)
        elif op == "dones":
            for item in meta["items"]:
                self._job_done(worker_id, conn, item, bufs)
        elif op == "release":
            self.route_release(conn.spool_paths(meta["paths"]))
        elif op in ("out", "display", "chunk"):
            job = self.jobs.get(meta["id"])
            if job is None or job.worker_id != worker_id:
                return
            if op == "out":
                stream, text = meta["stream"], meta["text"]
                if stream not in ("stdout", "stderr") or not isinstance(text, str):
                    raise ValueError("out frames carry stdout or stderr text")
                ep = self.endpoints.get(job.endpoint)
                if ep is not None:
                    self._log(ep, job, stream, text)
                if job.owner is not None and job.status not in m.TERMINAL:
                    job.owner.send({"op": "out", "id": job.id, "stream": stream, "text": text})
            elif op == "display":
                if job.owner is not None and job.status not in m.TERMINAL:
                    job.owner.send(meta)
                if self.events.active:
                    text = (meta.get("data") or {}).get("text/plain", "")
                    self.events.publish("display", endpoint=job.endpoint, job=job.id, text=text)
            else:
                job.stream.append(meta["output"])
                self.events.publish("chunk", job=job.id, endpoint=job.endpoint)

    def worker_misbehaved(self, worker: tuple[str, int], reason: str) -> None:
        """A worker sent what it must not: stop it (its jobs are retried elsewhere)."""
        wid, inc = worker
        ep = self.endpoints.get(wid.rsplit("-", 1)[0])
        w = ep.workers.get(wid) if ep else None
        if w is not None and w.incarnation == inc and w.live:
            self._log(ep, None, "system", f"[{wid}] {reason}; stopping it\n")
            self._stop_worker(w, reason, kill=True, expected=False)

    def _log(self, ep: m.EndpointState, job: m.Job | None, stream: str, text: str) -> None:
        entry = {"time": time.time(), "job": job.id if job else None, "stream": stream,
                 "text": text, "worker": job.worker_id if job else None}  # fmt: skip
        ep.logs.append(entry)
        self.events.publish("output", endpoint=ep.name, **entry)

    def _job_done(
        self, worker_id: str, conn: Any, meta: dict[str, Any], bufs: list[bytearray]
    ) -> None:
        job = self.jobs.get(meta["id"])
        if job is None:
            return
        ep = self.endpoints.get(job.endpoint)
        w = ep.workers.get(worker_id) if ep else None
        if w is not None:
            w.jobs.discard(job.id)
            w.last_active = time.monotonic()
            if meta.get("ok"):
                w.crashes = 0
            if meta.get("state"):
                w.remote_state.update(meta["state"])
        if job.status in m.TERMINAL or job.worker_id != worker_id:
            if ep is not None:
                self.kick(ep.name)
            return
        if meta.get("ok"):
            if job.kind == "json":
                result = {"output": meta.get("output")}
            else:
                result = {
                    "codec": meta.get("c", "cloudpickle"),
                    "blobs": conn.own_refs(meta["refs"], bufs, conn.writer_name),
                }
            self._finish(job, m.COMPLETED, result=result)
        else:
            err = meta.get("error") or {}
            status = m.CANCELLED if meta.get("cancelled") else m.FAILED
            self._finish(job, status, error=err)

    # ------------------------------------------------------------------ events
    def _publish_job(self, job: m.Job) -> None:
        if self.events.active:
            self.events.publish("job", endpoint=job.endpoint, **self.status_payload(job))

    def _publish_worker(self, w: m.Worker) -> None:
        if self.events.active:
            ep = self.endpoints.get(w.endpoint)
            if ep is not None:
                self.events.publish("worker", **self.worker_view(w, ep))


def _forget_inputs(job: m.Job) -> None:
    """A job that is over keeps its outcome, not its input: a finished job stays in memory
    (RECENT_JOBS of them) and nothing reads its input again (retries happen before)."""
    body = job.body
    if body:
        for k in INPUT_PARTS:
            if k in body:
                del body[k]


def _stored_config(d: dict[str, Any]) -> tuple[EndpointConfig, list[str]]:
    """An endpoint's stored settings, and which of them were dropped: NaN or infinite
    numbers (an older version let them through) go back to their defaults."""
    try:
        return EndpointConfig.from_dict(d), []
    except ConfigError:
        bad = sorted(k for k, v in d.items() if isinstance(v, float) and not math.isfinite(v))
        if not bad:
            raise
    return EndpointConfig.from_dict({k: v for k, v in d.items() if k not in bad}), bad


def _job_from_row(row: dict[str, Any]) -> m.Job:
    job = m.Job(**{k: row[k] for k in ("id", "endpoint", "kind", "fn", "body", "created")})
    for k in ("status", "started", "finished", "worker_id", "retries", "cold", "cold_start_ms",
              "result", "error", "cost"):  # fmt: skip
        setattr(job, k, row[k])
    return job


def _price(cfg: EndpointConfig, alloc: Allocation) -> float:
    """Per-second price of one worker: the GPU type it actually got, times gpu_count."""
    if alloc.type_name and cfg.gpu:
        from .. import catalog

        return catalog.lookup(alloc.type_name, "gpu").price_per_second * cfg.gpu_count
    return cfg.price_per_second


__all__ = ["Allocation", "ControlPlane", "NotFound"]

"""The control plane: the owner that wires the rooms together.

Everything runs on one asyncio loop, so no locks: the HTTP routes, the wire connections and
the provider's exit callbacks all call into ``ControlPlane`` from the loop. It holds the
endpoints and the jobs and answers the API that ``http_app.py`` and ``wire_server.py`` use
(deploy, submit, cancel, views). The behaviours live in their own rooms, each holding a
reference to it:

- ``scheduler.py`` (``cp.scheduler``): reconcile (scaling), the dispatch pump, affinity,
  making room, execution deadlines;
- ``lifecycle.py`` (``cp.lifecycle``): a worker's start, hello, loss, stop, exit, requeue and
  backoff;
- ``billing.py`` (``cp.ledger``): prices, job costs, the ledger, the billing view;
- ``wire_server.py``: frames from clients and from workers (results, output);
- ``views.py`` and ``spool_keeper.py``: read-only views and the shared-memory spool (mixins).

Time is read through ``cp.clock`` (monotonic: idle timeouts, backoff, deadlines) and
``cp.wall`` (wall time: job timestamps, billing), which tests may replace.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import envvars, shm
from ..config import EndpointConfig
from ..errors import ConfigError
from ..providers.base import Allocation, PlacementError, Provider
from . import model as m
from . import policy as job_policy
from .billing import Ledger
from .budget import Budget
from .events import EventBus
from .lifecycle import Lifecycle
from .progress import Progress
from .scheduler import Scheduler
from .spool_keeper import SpoolKeeper
from .store import Store
from .views import Views
from .webhooks import Delivery, Webhooks

RECENT_JOBS = 10_000  # finished jobs kept in memory; older ones are read from the store
RESULT_TTL = envvars.get("FLASH_JUPYTER_RESULT_TTL")  # finished jobs stay queryable (s)
TICK = 0.1
INPUT_PARTS = ("input", "blobs", "fn_blobs")  # what a job holds only until it is over


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
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.clock = clock  # monotonic seconds: idle timeouts, backoff, deadlines
        self.wall = wall  # seconds since the epoch: job timestamps, billing
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
        self.started = wall()
        self._dirty: set[str] = set()
        self._kick_scheduled = False
        self._tick_task: asyncio.Task | None = None
        self._last_prune = clock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.clients: set[Any] = set()  # open client connections
        self._recent: deque[str] = deque()  # finished jobs kept in memory, oldest first
        self.last_activity = 0.0  # monotonic time of the last dispatch or finish
        self.writers: dict[str, Any] = {}  # spool writer folder -> its connection
        self.scheduler = Scheduler(self)
        self.lifecycle = Lifecycle(self)
        self.ledger = Ledger(self)
        self.budget = Budget(self)  # the spending guard (budget.py)
        self.progress = Progress(self)  # where a job stands, for callers asking (progress.py)
        self.webhooks = Webhooks(self)  # a request's webhook, called when its job ends
        self._expiry: list[tuple[float, str]] = []  # (wall time, job id): policy.ttl, a heap

    # ------------------------------------------------------------------ startup
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.store.bind_loop(self._loop.call_soon)
        for row in self.store.load_endpoints():
            cfg, dropped = _stored_config(row["config"])
            # By keyword: the third field is ``serves`` (a positional created went there, and
            # updated became created: the ledger's all-time totals of an endpoint updated
            # after its workers ran read 0 after a restart).
            ep = m.EndpointState(cfg, row["handler"], created=row["created"],
                                 updated=row["updated"])  # fmt: skip
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
        self.ledger.load()
        self.budget.load()
        for ep_name, counts in self.store.job_counts().items():
            ep = self.endpoints.get(ep_name)
            if ep is not None:
                ep.completed, ep.failed = counts["completed"], counts["failed"]
                ep.cancelled = counts.get("cancelled", 0)
        for row in self.store.load_jobs(recent=RECENT_JOBS):
            ep = self.endpoints.get(row["endpoint"])
            job = _job_from_row(row)
            if job.kind == "json" and len(job.body) > 1:
                self._request_options(job, job.status not in m.TERMINAL)
            if job.status in m.TERMINAL:
                _forget_inputs(job)
                self.jobs[job.id] = job
                self._recent.append(job.id)
                continue
            if ep is None and job.status not in m.TERMINAL:
                job.status, job.error = m.FAILED, {"message": "endpoint was deleted"}
                job.finished = self.wall()
                self.store.update_job(job)
            self.jobs[job.id] = job
            if job.status == m.IN_PROGRESS and ep is not None:
                # Its worker went down with the previous control plane: run it again.
                job.status, job.started, job.worker_id = m.IN_QUEUE, None, None
                ep.retried += 1
                self.store.update_job(job)
            if job.status == m.IN_QUEUE and ep is not None:
                ep.queue.append(job.id)
        for ep in self.endpoints.values():
            if any(self.jobs[j].low for j in ep.queue if j in self.jobs):
                ep.has_low = True
                ep.queue = type(ep.queue)(sorted(ep.queue, key=lambda j: self.jobs[j].low))
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
        await self.webhooks.close()
        live = [w for ep in self.endpoints.values() for w in ep.workers.values() if w.live]
        for w in live:
            self.lifecycle.stop(w, "control plane stopping", requeue=True)
        deadline = time.monotonic() + 5  # real time: the processes' grace, then SIGKILL
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
            w = m.Worker(wid, ep.name, last_active=self.clock())
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

    def deploy(
        self, cfg: EndpointConfig, handler: str | None = None, serves: str | None = None
    ) -> dict[str, Any]:
        """Create, reuse or update an endpoint by name (the Runpod rule)."""
        # Refuse what can never be placed (strict GPU mode) before recording anything.
        try:
            alloc = self.provider.allocate(cfg)
        except PlacementError:
            raise
        if alloc is not None:
            self.provider.release(alloc)
        now = self.wall()
        ep = self.endpoints.get(cfg.name)
        dropped = False  # a class now serves the name: no older function answers HTTP for it
        # (a class deployed with its HTTP handler, `flash-jupyter deploy`, keeps it)
        if (ep is not None and serves == "class" and ep.serves != "class"
                and ep.handler is not None and not handler):  # fmt: skip
            ep.handler, dropped = None, True
        if ep is None:
            ep = m.EndpointState(cfg, handler, now, now)
            self.endpoints[cfg.name] = ep
            action = "created"
        elif ep.config == cfg:
            action = "reused"
            if handler and handler != ep.handler:
                ep.handler = handler
            elif not dropped:
                ep.serves = serves or ep.serves
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
        ep.serves = serves or ep.serves
        self._ensure_slots(ep)
        self.store.save_endpoint(cfg.name, cfg.to_dict(), cfg.config_hash, ep.handler,
                                 ep.created, ep.updated)  # fmt: skip
        self.events.publish("endpoint", name=cfg.name, action=action)
        self.kick(cfg.name)
        return self._deploy_answer(ep, action)

    def _deploy_answer(self, ep: m.EndpointState, action: str) -> dict[str, Any]:
        return {"name": ep.name, "action": action, "config_hash": ep.config.config_hash}

    def with_changes(self, cfg: EndpointConfig, changes: Any) -> EndpointConfig:
        """A deploy that names ``changes`` (a ``%%flash`` cell's settings): an endpoint that
        exists changes only those; a new one is ``cfg`` (what the caller built from them)."""
        if changes is None:
            return cfg
        if not isinstance(changes, dict):
            raise ConfigError("deploy: changes must be a mapping of settings")
        existing = self.endpoints.get(cfg.name)
        return existing.config.changed(**changes) if existing is not None else cfg

    @staticmethod
    def check_serves(serves: Any) -> str | None:
        if serves not in (None, "function", "class", "cells"):
            raise ConfigError(f"deploy: serves must be function, class or cells, not {serves!r}")
        return serves

    def deploy_changes(self, name: str, changes: Any, serves: Any = None) -> dict[str, Any]:
        """Deploy by changes (HTTP ``PUT`` with ``{"changes": ...}``), the wire's rule: an
        endpoint that exists changes only these settings, a new one starts from the
        defaults plus them. Returns the endpoint view plus ``action``."""
        if not isinstance(changes, dict):
            raise ConfigError(
                '"changes" must be a JSON object of settings, e.g. {"idle_timeout": 30}'
            )
        if "name" in changes:
            raise ConfigError("the endpoint's name comes from the path, not from changes")
        serves = self.check_serves(serves)
        existing = self.endpoints.get(name)
        if existing is not None:
            cfg = self.with_changes(existing.config, changes)
        else:
            cfg = EndpointConfig.build(name, **changes)
        answer = self.deploy(cfg, serves=serves)
        return {**self.endpoint_view(self.endpoints[name]), "action": answer["action"]}

    def warm(self, name: str, workers: Any = 1) -> dict[str, Any]:
        """Start workers now, without a job (``Scheduler.warm``): the endpoint view, plus
        ``started`` (how many began starting now)."""
        ep = self.endpoint(name)
        if type(workers) is not int or workers < 0:
            raise ValueError(f"workers must be a whole number, 0 or more, not {workers!r}")
        self.budget.check_submit(name)  # warm workers cost money too
        started = self.scheduler.warm(ep, workers)
        return {**self.endpoint_view(ep), "started": started}

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
                self.lifecycle.stop(w, "stopped by user")
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
                self.lifecycle.stop(w, "endpoint deleted")
        del self.endpoints[name]
        self.store.delete_endpoint(name)
        self.budget.endpoint_deleted(name)
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
        progress: bool = False,
    ) -> m.Job:
        self.budget.check_submit(endpoint)  # BudgetExceeded: nothing recorded
        ep = self.endpoint(endpoint)
        if kind == "json":
            if ep.handler is None:
                raise ValueError(_no_handler(endpoint, ep.serves))
            fn = ep.handler
        jid = job_id or uuid.uuid4().hex
        old = self.jobs.get(jid)
        if old is not None and old.status not in m.TERMINAL:
            raise ValueError(f"job id {jid!r} already exists")
        job = m.Job(jid, endpoint, kind, fn, body, created=self.wall(), owner=owner)
        job.progress = progress and owner is not None
        if kind == "json" and len(body) > 1:  # a request's webhook or policy (checked)
            self._request_options(job, True)
        # The store serializes the job first: a body it cannot take raises here, before the
        # job is anywhere (no queued id nobody was told of, no worker left holding it).
        self.store.insert_job(job, after=on_commit)
        self.jobs[jid] = job
        queue = ep.queue
        ep.has_low = ep.has_low or job.low
        if queue and not job.low and (last := self.jobs.get(queue[-1])) and last.low:
            queue.insert(self._before_low(queue), jid)  # ahead of the low-priority jobs
        else:
            queue.append(jid)
        if job.progress:
            ep.progress_jobs.add(jid)
        self._publish_job(job)
        self.kick(endpoint)
        return job

    def _request_options(self, job: m.Job, unfinished: bool) -> None:
        """Set a JSON job's fields from its request's ``policy`` and ``webhook`` (in normal
        form: checked at the door, kept in its body so a restart reads them back)."""
        body = job.body
        if body.get("policy"):
            job_policy.apply(job, body["policy"])
            if job.expires is not None:
                heapq.heappush(self._expiry, (job.expires, job.id))
        if unfinished and body.get("webhook"):
            job.hook = Delivery(body["webhook"])

    def _before_low(self, queue: Any) -> int:
        """Where a job without lowPriority goes: before the low-priority jobs at the end."""
        i = len(queue) - 1
        while i > 0 and (j := self.jobs.get(queue[i - 1])) is not None and j.low:
            i -= 1
        return i

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
        job.cancel_sent = self.clock()
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
        job.finished = self.wall()
        self.last_activity = now = self.clock()
        job.result, job.error = result, error
        ep = self.endpoints.get(job.endpoint)
        w = ep.workers.get(job.worker_id) if ep and job.worker_id else None
        if w is not None:
            if not keep_on_worker:
                w.jobs.discard(job.id)
            w.last_active = now
            if w.phase == "code" and job.cold:  # it ended before saying it started
                self.lifecycle.set_phase(ep, w, None, queued=False)
            elif not w.jobs:
                self._publish_worker(w)  # busy -> idle (its scale-down countdown starts)
        if ep is not None:
            ep.progress_jobs.discard(job.id)
            if job.started is not None:
                job.cost = self.ledger.job_cost(job, w, ep)
                ms = (job.finished - job.started) * 1000
                ep.exec_ewma_ms = 0.8 * ep.exec_ewma_ms + 0.2 * ms
                if job.cold:
                    ep.cold_starts += 1
                    ep.last_cold_ms = job.cold_start_ms or 0.0
                    ep.cold_ms_total += ep.last_cold_ms
                else:
                    ep.warm_starts += 1
            if status == m.COMPLETED:
                ep.completed += 1
            elif status == m.CANCELLED:
                ep.cancelled += 1
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
        if job.hook is not None:
            self.webhooks.send(job)  # in the background: the job is over already
        if job.expires is not None and job.expires <= self.wall():
            self.forget(job)  # it ran past its ttl: its record goes now that it is over
        if ep is not None:
            self.kick(ep.name)

    def forget(self, job: m.Job) -> None:
        """Drop a finished job's record now (policy.ttl): /status then answers 404."""
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]
        self._drop_results(job)
        self.store.delete_job(job.id)

    def _expire(self, now: float) -> None:
        """Jobs whose policy.ttl has passed: a queued one ends TIMED_OUT, then every one
        that is over is forgotten (a running one when it ends: ``_finish``)."""
        while self._expiry and self._expiry[0][0] <= now:
            _, jid = heapq.heappop(self._expiry)
            job = self.jobs.get(jid)
            if job is None or job.expires is None or job.expires > now:
                continue
            if job.status == m.IN_QUEUE:
                ep = self.endpoints.get(job.endpoint)
                if ep is not None and jid in ep.queue:
                    ep.queue.remove(jid)
                ttl = (job.expires - job.created) * 1000
                self._finish(job, m.TIMED_OUT, error={
                    "type": "Expired", "message": f"its policy.ttl of {ttl:.0f} ms passed "
                    f"before a worker took it; the job expired"})  # fmt: skip
            elif job.status in m.TERMINAL:
                self.forget(job)

    # ------------------------------------------------------------------ scheduling
    def quiet(self, seconds: float = 0.3) -> bool:
        """No job was dispatched or finished for ``seconds``: a moment for background work."""
        return self.clock() - self.last_activity > seconds

    def kick(self, name: str) -> None:
        """Reconcile this endpoint soon (once per loop turn, however often asked)."""
        self._dirty.add(name)
        if not self._kick_scheduled and self._loop is not None:
            self._kick_scheduled = True
            self._loop.call_soon(self._run_kicks)

    def _run_kicks(self) -> None:
        self._kick_scheduled = False
        dirty, self._dirty = self._dirty, set()
        reconcile = self.scheduler.reconcile
        for name in dirty:
            ep = self.endpoints.get(name)
            if ep is not None:
                reconcile(ep)

    def _pump(self, ep: m.EndpointState) -> None:
        """Dispatch now (``Scheduler.pump``); tests of the core call it by this name."""
        self.scheduler.pump(ep)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self._tick()
            except Exception:
                import traceback

                traceback.print_exc()

    def _tick(self) -> None:
        self.scheduler.tick()
        self.ledger.tick()  # open bills' workers alive now: one write per SEEN_EVERY s
        if self.budget.active:
            self.budget.evaluate()  # publishes only when a state changes
        if self._expiry and self._expiry[0][0] <= self.wall():
            self._expire(self.wall())
        now = self.clock()
        if now - self._last_prune > min(60, RESULT_TTL):
            self._last_prune = now
            self._prune()

    def _prune(self) -> None:
        cutoff = self.wall() - RESULT_TTL
        old = [j for j in self.jobs.values() if j.finished is not None and j.finished < cutoff]
        for j in old:
            self._drop_results(j)
            del self.jobs[j.id]
        self.store.delete_jobs_before(cutoff)

    # ------------------------------------------------------------------ workers (the wire's)
    def worker_hello(self, worker_id: str, incarnation: int, conn: Any, pid: int | None) -> bool:
        """A worker's process connected over the wire (``Lifecycle.hello``)."""
        return self.lifecycle.hello(worker_id, incarnation, conn, pid)

    def worker_lost(self, worker_id: str, incarnation: int) -> None:
        """A worker's connection closed (``Lifecycle.lost``)."""
        self.lifecycle.lost(worker_id, incarnation)

    def billing(self) -> dict[str, Any]:
        """The billing view (``Ledger.view``)."""
        return self.ledger.view()

    def _log(self, ep: m.EndpointState, job: m.Job | None, stream: str, text: str) -> None:
        entry = {"time": self.wall(), "job": job.id if job else None, "stream": stream,
                 "text": text, "worker": job.worker_id if job else None}  # fmt: skip
        ep.logs.append(entry)
        self.events.publish("output", endpoint=ep.name, **entry)

    def tell(self, ep: m.EndpointState, job: m.Job, text: str) -> None:
        """A line from the control plane in a job's own output (the caller's cell sees it
        where the job's prints go; the logs and the event stream keep it too)."""
        self._log(ep, job, "stderr", text)
        if job.owner is not None:
            job.owner.send({"op": "out", "id": job.id, "stream": "stderr", "text": text})

    # ------------------------------------------------------------------ events
    def _publish_job(self, job: m.Job) -> None:
        if job.progress:
            self.progress.send(job)
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
    # Spool files are stored as SpoolRefs; rows written before there was one hold tuples.
    for part in (job.body, job.result):
        for k in ("blobs", "fn_blobs"):
            if part and part.get(k):
                part[k] = shm.stored_blobs(part[k])
    return job


__all__ = ["Allocation", "ControlPlane", "NotFound"]


def _no_handler(name: str, serves: str | None) -> str:
    """Why an endpoint cannot take an HTTP job, and what to do instead."""
    if serves == "class":
        return (
            f"endpoint {name!r} serves a class, deployed from Python without an HTTP handler: "
            f"call its methods from Python (obj = Cls(...); obj.method(...)), or deploy its "
            f"file with `flash-jupyter deploy FILE`, after which its methods answer HTTP "
            f'({{"input": {{"method": ..., "args": {{...}}}}}})'
        )
    if serves == "cells":
        return (
            f"endpoint {name!r} runs %%flash cells, which answer HTTP once their notebook is "
            f"deployed (`flash-jupyter deploy NOTEBOOK.ipynb`: the input becomes the cells' "
            f"variables); or decorate a function with @Endpoint(name=...) and call its .deploy()"
        )
    return (
        f"endpoint {name!r} has no handler yet: deploy its function from Python once "
        f"(fn.deploy(), or a first call) before calling it over HTTP"
    )

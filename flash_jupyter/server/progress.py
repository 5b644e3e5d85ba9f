"""Where a job stands, told to the caller that asked (a submit with ``"progress": 1``: a
notebook kernel with live receipts): queued, cold start with the starting worker's phase
(environment, process, code), in progress. A frame goes out only when that changes; callers
that did not ask cost nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import model as m
from .views import receipt_label

if TYPE_CHECKING:
    from .control import ControlPlane


class Progress:
    """``cp.progress``."""

    def __init__(self, cp: ControlPlane):
        self.cp = cp

    def send(self, job: m.Job) -> None:
        """Tell the caller of ``job`` where it stands, if that changed (it asked with
        ``"progress": 1``): queued, cold start (with the worker's phase), in progress."""
        owner = job.owner
        if owner is None or job.status in m.TERMINAL:
            return
        ep = self.cp.endpoints.get(job.endpoint)
        status, phase, w = m.IN_QUEUE, None, None
        if ep is None:
            pass
        elif job.status == m.IN_PROGRESS:
            w = ep.workers.get(job.worker_id) if job.worker_id else None
            if w is not None and job.cold and w.phase == "code":
                status, phase = "COLD_START", "code"
            else:
                status = m.IN_PROGRESS
        else:
            starting = [x for x in ep.workers.values()
                        if x.live and x.conn is None and x.phase and not x.stopping]  # fmt: skip
            if starting:
                w = min(starting, key=lambda x: x.start_signal or 0.0)
                status, phase = "COLD_START", w.phase
        key = (status, phase, w.id if w is not None else None)
        if key == job.progress_last:
            return
        job.progress_last = key
        hardware = None
        if w is not None and w.hardware:
            hardware = receipt_label(w.hardware, w.emulated)
        owner.send({"op": "progress", "id": job.id, "status": status, "phase": phase,
                    "worker": key[2], "hardware": hardware})  # fmt: skip

    def endpoint_moved(self, ep: m.EndpointState) -> None:
        """A worker of ``ep`` moved on in its cold start: the queued jobs asking for progress
        hear it (none asked: nothing to do)."""
        for jid in list(ep.progress_jobs):
            job = self.cp.jobs.get(jid)
            if job is None:
                ep.progress_jobs.discard(jid)
            elif job.status == m.IN_QUEUE:
                self.send(job)

"""Read-only views of the control plane's state: Runpod's job and health shapes, worker and
endpoint views for the dashboard (the billing view is ``billing.py``'s). Mixed into
``ControlPlane``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import EndpointConfig
from . import model as m
from .runpod_errors import runpod_error

PHASES = ("environment", "process", "code")  # a cold start's phases, in order


def receipt_label(hardware: str, emulated: bool) -> str:
    """Hardware as a receipt says it: "A100", or "A100, emulated on CPU"."""
    base = hardware.replace(" (emulated on CPU)", "")
    return f"{base}, emulated on CPU" if emulated else base


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


class Views:
    endpoints: dict[str, m.EndpointState]
    provider: Any
    started: float
    clock: Callable[[], float]
    wall: Callable[[], float]
    ledger: Any
    scheduler: Any

    def status_payload(self, job: m.Job) -> dict[str, Any]:
        """A job as Runpod's /status shows it, plus flash-jupyter's timings."""
        d: dict[str, Any] = {"id": job.id, "status": job.status}
        if job.started is not None:
            d["delayTime"] = job.delay_ms
            d["executionTime"] = job.execution_ms
        if job.worker_id:
            d["workerId"] = job.worker_id
            d["workerIncarnation"] = job.incarnation
            if job.hardware:
                d["hardware"] = job.hardware
        if job.status == m.COMPLETED and job.kind == "json" and job.result is not None:
            d["output"] = job.result.get("output")
        elif job.update is not None and job.status == m.IN_PROGRESS:
            d["output"] = job.update  # progress_update's, as Runpod's /status shows it
        if job.error is not None:
            if job.kind == "json":
                if job.status == m.FAILED:  # as Runpod's workers report it (runpod_errors.py)
                    d["error"] = runpod_error(job.error, job.worker_id)
                else:
                    d["error"] = job.error.get("message")
            else:  # JSON-safe: the pickled exception itself only travels on the wire
                d["error"] = {k: v for k, v in job.error.items() if k != "exc"}
        if job.hook is not None:  # its webhook's delivery (webhooks.py)
            d["webhook"] = job.hook.view()
        d["retries"] = job.retries
        d["cold"] = job.cold
        if job.cold_start_ms is not None:
            d["coldStartTime"] = round(job.cold_start_ms)
        d["cost"] = round(job.cost, 8)
        if job.started is not None and job.price is not None:
            # The receipt: what it ran on, and its cost split (they add up to "cost").
            if job.hardware:
                d["hardwareLabel"] = receipt_label(job.hardware, job.emulated)
            _, run, cold = self.ledger.job_cost_parts(job, None, None)
            d["pricePerSecond"] = job.price
            d["costRun"] = round(run, 8)
            d["costColdStart"] = round(cold, 8)
            if job.cold and job.cold_phases is not None:
                ph = job.cold_phases
                d["coldStartPhases"] = {k: round(ph.get(k, 0.0)) for k in PHASES}
                # "pre-installed" | "installed at request time" | None (no dependencies)
                d["environment"] = job.env_source
                # "preloaded" | "plain": a spare process was adopted; None: a fresh one
                d["spare"] = job.spare
        return d

    def health(self, name: str) -> dict[str, Any]:
        """Runpod's /health, exactly its shape (the /v1 view adds ``jobs.cancelled``)."""
        ep = self.endpoint(name)
        ws = list(ep.workers.values())
        running = sum(1 for w in ws if w.conn is not None and w.jobs)
        ready = sum(1 for w in ws if w.conn is not None and w.state in (m.RUNNING, m.OUTDATED))
        in_progress = sum(1 for w in ws for _ in w.jobs)
        return {
            "workers": {
                "idle": ready - running,
                "initializing": sum(1 for w in ws if w.state == m.INITIALIZING),
                "ready": ready,
                "running": running,
                "throttled": sum(1 for w in ws if w.state == m.THROTTLED),
                "unhealthy": sum(1 for w in ws if w.state == m.UNHEALTHY),
            },
            "jobs": {
                "completed": ep.completed,
                "failed": ep.failed,  # FAILED and TIMED_OUT (CANCELLED: endpoint_view)
                "inProgress": in_progress,
                "inQueue": len(ep.queue),
                "retried": ep.retried,
            },
        }

    def worker_view(self, w: m.Worker, ep: m.EndpointState) -> dict[str, Any]:
        now = self.wall()
        return {
            "id": w.id,
            "endpoint": w.endpoint,
            "state": w.state,
            "busy": bool(w.jobs),
            "jobs": list(w.jobs),
            "pid": w.pid,
            "hardware": w.hardware or ep.config.hardware.name,
            "emulated": w.emulated if w.hardware else self._would_emulate(ep.config),
            # What text status shows: "A100 (emulated on CPU)", "A100 x2", "cpu3c-2-4".
            "hardware_label": self._hardware_label(w, ep),
            "incarnation": w.incarnation,
            "cold_start_ms": None if w.cold_start_ms is None else round(w.cold_start_ms, 1),
            "uptime_s": round(now - w.start_signal, 3) if w.live and w.start_signal else 0,
            "idle_s": round(self.clock() - w.last_active, 3) if w.ready and not w.jobs else 0,
            # The cold start's phase (environment, process, code) or None; the countdown to
            # the scale-down of an idle worker above what the endpoint wants (None: it stays).
            "phase": w.phase if w.live else None,
            # Its dependency environment: "pre-installed", "installed at request time", None.
            "env_source": w.env_source if w.live else None,
            # Its process was a spare: "preloaded", "plain"; None: a fresh process.
            "spare": w.spare if w.live else None,
            # Its GPUs: the indices it was given (CUDA_VISIBLE_DEVICES) and the memory its
            # process held after its last job, as torch counts it (None: no CUDA use seen).
            "gpu_devices": list(w.allocation.devices) if w.allocation is not None else [],
            "gpu_memory": w.gpu_memory if w.live else None,
            "scale_down_in_s": _round(self.scheduler.scale_down_in(ep, w)),
            "idle_timeout": ep.config.idle_timeout,
            **self.ledger.worker_bill(w, ep, now),
            "reason": w.reason,
            # session -> what it keeps here; "notebook" is the session's short name.
            "remote_state": {
                s: {"notebook": m.notebook_name(s), "names": sorted(v), "bytes": sum(v.values())}
                for s, v in w.remote_state.items()
                if v
            },
            # What the last incarnation kept when it went (until the next start).
            "lost_state": {
                s: {"notebook": m.notebook_name(s), "names": names}
                for s, names in w.lost_state.items()
            },
        }

    def _hardware_label(self, w: m.Worker, ep: m.EndpointState) -> str:
        """The worker's hardware as a person reads it, emulation included."""
        if w.hardware:
            label, emulated = w.hardware, w.emulated
        else:  # no process yet: what it would get
            label, emulated = ep.config.hardware.name, self._would_emulate(ep.config)
        if emulated and "emulated" not in label:
            label += " (emulated on CPU)"
        return label

    def endpoint_view(self, ep: m.EndpointState) -> dict[str, Any]:
        health = self.health(ep.name)
        health["jobs"]["cancelled"] = ep.cancelled
        return {
            "name": ep.name,
            "config": ep.config.to_dict(),
            "config_hash": ep.config.config_hash,
            "hardware": ep.config.hardware.name,
            "price_per_second": ep.config.price_per_second,
            "created": ep.created,
            "updated": ep.updated,
            "has_handler": ep.handler is not None,
            "workers": [self.worker_view(w, ep) for w in ep.workers.values()],
            "health": health,
            "queue": len(ep.queue),
            "starts": {
                "cold": ep.cold_starts,
                "warm": ep.warm_starts,
                "last_cold_ms": None if ep.last_cold_ms is None else round(ep.last_cold_ms, 1),
                "mean_cold_ms": round(ep.cold_ms_total / ep.cold_starts, 1)
                if ep.cold_starts
                else None,
            },
            **self.ledger.endpoint_bill(ep, self.wall()),
            "emulated": any(w.emulated for w in ep.workers.values())
            or self._would_emulate(ep.config),
        }

    def _would_emulate(self, cfg: EndpointConfig) -> bool:
        would = getattr(self.provider, "would_emulate", None)  # optional (providers/base.py)
        return bool(would is not None and would(cfg))

"""Read-only views of the control plane's state: Runpod's job and health shapes, worker and
endpoint views for the dashboard, and billing. Mixed into ``ControlPlane``."""

from __future__ import annotations

import time
from typing import Any

from .. import catalog
from ..config import EndpointConfig
from . import model as m


class Views:
    endpoints: dict[str, m.EndpointState]
    provider: Any
    started: float

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
        if job.error is not None:
            if job.kind == "json":
                d["error"] = job.error.get("message")
            else:  # JSON-safe: the pickled exception itself only travels on the wire
                d["error"] = {k: v for k, v in job.error.items() if k != "exc"}
        d["retries"] = job.retries
        d["cold"] = job.cold
        if job.cold_start_ms is not None:
            d["coldStartTime"] = round(job.cold_start_ms)
        d["cost"] = round(job.cost, 8)
        return d

    def health(self, name: str) -> dict[str, Any]:
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
                "failed": ep.failed,
                "inProgress": in_progress,
                "inQueue": len(ep.queue),
                "retried": ep.retried,
            },
        }

    def worker_view(self, w: m.Worker, ep: m.EndpointState) -> dict[str, Any]:
        now = time.time()
        return {
            "id": w.id,
            "endpoint": w.endpoint,
            "state": w.state,
            "busy": bool(w.jobs),
            "jobs": list(w.jobs),
            "pid": w.pid,
            "hardware": w.hardware or ep.config.hardware.name,
            "emulated": w.emulated,
            "incarnation": w.incarnation,
            "cold_start_ms": None if w.cold_start_ms is None else round(w.cold_start_ms, 1),
            "uptime_s": round(now - w.start_signal, 3) if w.live and w.start_signal else 0,
            "idle_s": round(time.monotonic() - w.last_active, 3) if w.ready and not w.jobs else 0,
            "billed_seconds": w.billed_seconds(now) if w.live else 0,
            "cost": round(w.billed_seconds(now) * w.price, 8) if w.live else 0,
            "price_per_second": w.price if w.live else ep.config.price_per_second,
            "reason": w.reason,
            "remote_state": {
                s: {"names": sorted(v), "bytes": sum(v.values())}
                for s, v in w.remote_state.items()
                if v
            },
        }

    def endpoint_view(self, ep: m.EndpointState) -> dict[str, Any]:
        live = [w for w in ep.workers.values() if w.live]
        live_seconds = sum(w.billed_seconds() for w in live)
        live_cost = sum(w.billed_seconds() * w.price for w in live)
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
            "health": self.health(ep.name),
            "cost": round(ep.billed_cost + live_cost, 8),
            "billed_seconds": ep.billed_seconds + live_seconds,
            "session_cost": round(ep.session_cost + live_cost, 8),
            "session_seconds": ep.session_seconds + live_seconds,
            "emulated": any(w.emulated for w in ep.workers.values())
            or self._would_emulate(ep.config),
        }

    def _would_emulate(self, cfg: EndpointConfig) -> bool:
        gpus = getattr(self.provider, "gpus", [])
        return bool(cfg.gpu) and not any(hw and hw.name in cfg.gpu for _, _, hw in gpus)

    def billing(self) -> dict[str, Any]:
        """What has been billed: all time (the ledger) and this session (since the control
        plane started), per endpoint, with running workers counted up to now."""
        by_ep = {}
        total = session = 0.0
        estimate = False
        for ep in self.endpoints.values():
            v = self.endpoint_view(ep)
            by_ep[ep.name] = {
                "cost": v["cost"],
                "billed_seconds": v["billed_seconds"],
                "session_cost": v["session_cost"],
                "session_seconds": v["session_seconds"],
                "price_per_second": ep.config.price_per_second,
                "hardware": v["hardware"],
                "estimate": v["emulated"],
            }
            total += v["cost"]
            session += v["session_cost"]
            estimate = estimate or v["emulated"]
        return {
            "currency": catalog.CURRENCY,
            "prices_as_of": catalog.PRICES_AS_OF,
            "total": round(total, 8),
            "session": round(session, 8),
            "estimate": estimate,
            "basis": (
                "estimate at list price: hardware emulated on CPU"
                if estimate
                else "per-second list price"
            ),
            "since": self.started,
            "endpoints": by_ep,
        }

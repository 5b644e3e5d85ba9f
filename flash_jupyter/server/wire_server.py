"""The binary wire, server side: clients (kernels, scripts) and workers connect here.

The first frame is a JSON hello carrying the token; a wrong token gets one error frame and
the connection is closed. After that, frames are handed to the control plane.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from .. import shm, wire
from ..config import EndpointConfig
from . import model as m
from .control import ControlPlane, NotFound
from .frames import FrameProtocol


class Connection:
    """One wire connection; becomes a client or a worker after its hello."""

    def __init__(self, cp: ControlPlane, info: dict[str, Any]):
        self.cp = cp
        self.info = info
        self.proto = FrameProtocol(self.on_frame, self.on_close)
        self.role: str | None = None
        self.worker: tuple[str, int] | None = None
        self.jobs: set[str] = set()
        self.writer: str | None = None

    # -- used by the control plane
    def send(self, meta: dict[str, Any], bufs: list[Any] = ()) -> None:
        self.proto.send(meta, bufs)

    def close(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()

    def deliver(self, job: m.Job) -> None:
        """Send a finished job's outcome to the client waiting for it."""
        if self.proto.closed:
            return
        meta: dict[str, Any] = {"op": "done", **self.cp.status_payload(job)}
        bufs: list[Any] = []
        if job.status == m.COMPLETED and job.result is not None and job.kind == "py":
            meta["c"] = job.result["codec"]
            meta["refs"] = shm.to_refs(job.result["blobs"], bufs)
            job.result = None  # delivered: the client owns it now (and unlinks shm files)
            job.delivered = True
        if job.error is not None:
            meta["error"] = job.error
        self.send(meta, bufs)
        self.jobs.discard(job.id)

    # -- frames
    def on_close(self) -> None:
        if self.role == "spare":
            lost = getattr(self.cp.provider, "spare_lost", None)
            if lost is not None:
                lost(self)
        elif self.role == "worker" and self.worker:
            self.cp.writer_gone(f"w-{self.worker[0]}-{self.worker[1]}")
            self.cp.worker_lost(*self.worker)
        elif self.role == "client":
            self.cp.clients.discard(self)
            if self.writer:
                self.cp.writer_gone(self.writer)
            for jid in self.jobs:
                job = self.cp.jobs.get(jid)
                if job is not None and job.owner is self:
                    job.owner = None

    def on_frame(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        if self.role is None:
            self._hello(meta)
            return
        if self.role == "worker":
            self.cp.worker_frame(self.worker[0], meta, bufs)
            return
        if self.role == "spare":
            if meta.get("op") == "worker_hello":
                self._become_worker(meta)
            return
        op = meta.get("op")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            self.send({"op": "error", "message": f"unknown op {op!r}"})
            return
        try:
            handler(meta, bufs)
        except Exception as e:
            rid = meta.get("rid")
            jid = meta.get("id")
            if rid is not None:
                self.send({"op": "reply", "rid": rid, "ok": False, "error": str(e)})
            elif jid is not None:
                self.send({"op": "done", "id": jid, "status": m.FAILED,
                           "error": {"message": str(e), "type": "SubmitError"}})  # fmt: skip
            else:
                self.send({"op": "error", "message": str(e)})

    def _hello(self, meta: dict[str, Any]) -> None:
        token = str(meta.get("token", ""))
        if not hmac.compare_digest(token.encode(), self.cp.token.encode()):
            self.send({"op": "error", "status": 401, "message": "401 Unauthorized: bad token"})
            self.close()
            return
        role = meta.get("role")
        if role == "worker":
            self._become_worker(meta)
            return
        if role == "spare":
            ready = getattr(self.cp.provider, "spare_ready", None)
            if ready is None or not ready(int(meta.get("pid", 0)), self):
                self.send({"op": "exit"})
                self.close()
                return
            self.role = "spare"
            return
        self.role = "client"
        self.cp.clients.add(self)
        writer = str(meta.get("writer") or "")
        if writer.startswith("c-") and "/" not in writer:
            self.writer = writer
            self.cp.writers[writer] = self
        self.send({"op": "welcome", **self.info, "stamp": wire.stamp(), "time": time.time()})

    def _become_worker(self, meta: dict[str, Any]) -> None:
        wid, inc = meta["id"], int(meta["incarnation"])
        if not self.cp.worker_hello(wid, inc, self, meta.get("pid")):
            self.send({"op": "exit"})
            self.close()
            return
        self.role, self.worker = "worker", (wid, inc)
        self.cp.writers[f"w-{wid}-{inc}"] = self

    # -- client operations
    def _reply(self, meta: dict[str, Any], result: Any) -> None:
        self.send({"op": "reply", "rid": meta["rid"], "ok": True, "result": result})

    def op_deploy(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        cfg = EndpointConfig.from_dict(meta["config"])
        handler = meta.get("handler")
        if handler:
            self.cp.put_function(handler, meta["hc"], shm.from_refs(meta["hrefs"], bufs))
        self._reply(meta, self.cp.deploy(cfg, handler))

    def op_submit(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        fn = meta.get("fn")
        body: dict[str, Any] = {"codec": meta.get("c", "cloudpickle"), "stamp": meta.get("stamp"),
                                "blobs": shm.from_refs(meta["refs"], bufs)}  # fmt: skip
        if meta.get("paths"):
            body["paths"] = meta["paths"]
        if meta.get("affinity"):
            body["affinity"] = meta["affinity"]
        if meta.get("noshm"):
            body["noshm"] = True
        if "fnrefs" in meta:
            blobs = shm.from_refs(meta["fnrefs"], bufs)
            if fn:
                self.cp.put_function(fn, meta["fnc"], blobs)
            else:
                body["fn_codec"], body["fn_blobs"] = meta["fnc"], blobs
        elif fn and self.cp.get_function(fn) is None:
            self.send({"op": "need_fn", "id": meta["id"], "fn": fn})
            return
        self.cp.submit(meta["ep"], "py", body, fn=fn, owner=self, job_id=meta["id"])
        self.jobs.add(meta["id"])

    def op_cancel(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        try:
            self.cp.cancel(meta["id"])
        except NotFound:
            pass

    def op_watch(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        """After a reconnect: take over delivery of these jobs; report unknown ones."""
        unknown = []
        for jid in meta["ids"]:
            job = self.cp.find_job(jid)
            lost_result = job is not None and job.kind == "py" and job.status == m.COMPLETED \
                and job.result is None  # fmt: skip
            if job is None or job.delivered or lost_result:
                unknown.append(jid)  # never recorded, or its result is gone: run it again
                continue
            self.cp.jobs.setdefault(jid, job)
            job.owner = self
            self.jobs.add(jid)
            if job.status in m.TERMINAL:
                self.deliver(job)
        if unknown:
            self.send({"op": "unknown", "ids": unknown})

    def op_release(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        self.cp.route_release(meta["paths"])

    def op_status(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        try:
            self._reply(meta, self.cp.status_payload(self.cp.job(meta["id"])))
        except NotFound as e:
            self.send({"op": "reply", "rid": meta["rid"], "ok": False, "error": str(e.args[0])})

"""The binary wire, server side: clients (kernels, scripts) and workers connect here.

The first frame is a JSON hello carrying a credential: the token for a client, a worker's
own credential for a worker (see ``flash_jupyter.credentials``). A wrong one gets one error
frame, and the connection is closed with nothing after the hello read. After that, each
frame is one operation: a client's (``op_*``: deploy, submit, cancel, ...) or a worker's
(``_worker_frame``: results, output, releases). What a frame names is checked against what
the peer may touch: a worker speaks only for its own jobs, spool files are only those of the
spool. A worker that sends what it must not is stopped (``_misbehaved``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from .. import credentials, shm, wire
from ..config import EndpointConfig
from ..errors import BudgetExceeded
from . import model as m
from .control import ControlPlane, NotFound
from .frames import MAX_FRAME, FrameProtocol


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
        self.sessions: set[str] = set()  # notebooks (of a client) keeping names on workers

    # -- used by the control plane
    @property
    def writer_name(self) -> str | None:
        """This peer's folder in the spool: the only spool files it may name."""
        if self.worker is not None:
            return f"w-{self.worker[0]}-{self.worker[1]}"
        return self.writer

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
            if self.sessions:
                self._forget_sessions()

    def _forget_sessions(self) -> None:
        """The kernel that ran these notebooks is gone: their names on workers are freed (no
        one can reach them any more), unless another live connection still uses them."""
        live = set().union(*(c.sessions for c in self.cp.clients if c is not self))
        gone = self.sessions - live
        for ep in self.cp.endpoints.values():
            for w in ep.workers.values():
                drop = [s for s in gone if s in w.remote_state]
                if drop and w.conn is not None:
                    for s in drop:
                        del w.remote_state[s]
                    w.conn.send({"op": "forget", "sessions": drop})

    def on_frame(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        if self.role is None:
            self._hello(meta)
            return
        if self.role == "worker":
            try:
                self._worker_frame(meta, bufs)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                # A worker that sends what it should not is not trusted further.
                self._misbehaved(f"sent a bad {meta.get('op')!r} frame: {e}")
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
                kind = "BudgetExceeded" if isinstance(e, BudgetExceeded) else "SubmitError"
                self.send({"op": "done", "id": jid, "status": m.FAILED,
                           "error": {"message": str(e), "type": kind}})  # fmt: skip
            else:
                self.send({"op": "error", "message": str(e)})

    def _refuse(self) -> None:
        self.send({"op": "error", "status": 401, "message": "401 Unauthorized: bad credential"})
        self.proto.refuse()

    def _hello(self, meta: dict[str, Any]) -> None:
        role, given = meta.get("role"), meta.get("token")
        token = self.cp.token
        if role == "worker":
            wid, inc = meta.get("id"), meta.get("incarnation")
            if not (isinstance(wid, str) and type(inc) is int) or not credentials.same(
                credentials.worker_credential(token, wid, inc), given
            ):
                self._refuse()
                return
            self.proto.accept()
            self._become_worker(meta)
            return
        if role == "spare":
            nonce = meta.get("nonce")
            if not isinstance(nonce, str) or not credentials.same(
                credentials.spare_credential(token, nonce), given
            ):
                self._refuse()
                return
            self.proto.accept()
            # What it imported before connecting (the provider shows it): no credential.
            self.spare_report = {k: meta.get(k) for k in ("preloaded", "failed", "cuda")}
            ready = getattr(self.cp.provider, "spare_ready", None)
            if ready is None or not ready(nonce, self):
                self.send({"op": "exit"})
                self.close()
                return
            self.role = "spare"
            return
        if role not in (None, "client") or not credentials.same(token, given):
            self._refuse()
            return
        self.proto.accept()
        self.role = "client"
        self.cp.clients.add(self)
        writer = meta.get("writer")
        if isinstance(writer, str) and writer.startswith("c-") and _plain_name(writer):
            self.writer = writer
            self.cp.writers[writer] = self
        self.send({"op": "welcome", **self.info, "stamp": wire.stamp(), "time": time.time(),
                   "max_frame": MAX_FRAME})  # fmt: skip

    def _become_worker(self, meta: dict[str, Any]) -> None:
        wid, inc = meta.get("id"), meta.get("incarnation")
        if self.role == "spare" and getattr(self, "assigned", None) != (wid, inc):
            self.close()  # a spare becomes the worker it was assigned, nothing else
            return
        if not self.cp.worker_hello(wid, inc, self, meta.get("pid")):
            self.send({"op": "exit"})
            self.close()
            return
        self.role, self.worker = "worker", (wid, inc)
        self.cp.writers[f"w-{wid}-{inc}"] = self

    # -- worker frames
    def _worker_frame(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        """A frame from a worker. It speaks for its own jobs only: anything naming another
        job is ignored, and malformed frames raise (the connection then stops the worker)."""
        op = meta.get("op")
        if op == "done":
            self._job_done(meta, bufs)
        elif op == "dones":
            for item in meta["items"]:
                self._job_done(item, bufs)
        elif op == "release":
            self.cp.route_release(self.spool_paths(meta["paths"]))
        elif op == "started":  # once per incarnation: its first job's code is loaded
            job = self.cp.jobs.get(meta["id"])
            if job is not None and job.worker_id == self.worker[0]:
                _, w = self.cp.lifecycle.find(*self.worker)
                if w is not None:
                    self.cp.lifecycle.code_loaded(w)
        elif op in ("out", "display", "chunk", "progress"):
            cp = self.cp
            job = cp.jobs.get(meta["id"])
            if job is None or job.worker_id != self.worker[0]:
                return
            if op == "out":
                stream, text = meta["stream"], meta["text"]
                if stream not in ("stdout", "stderr") or not isinstance(text, str):
                    raise ValueError("out frames carry stdout or stderr text")
                ep = cp.endpoints.get(job.endpoint)
                if ep is not None:
                    cp._log(ep, job, stream, text)
                if job.owner is not None and job.status not in m.TERMINAL:
                    job.owner.send({"op": "out", "id": job.id, "stream": stream, "text": text})
            elif op == "display":
                if job.owner is not None and job.status not in m.TERMINAL:
                    job.owner.send(meta)
                if cp.events.active:
                    text = (meta.get("data") or {}).get("text/plain", "")
                    cp.events.publish("display", endpoint=job.endpoint, job=job.id, text=text)
            elif op == "progress":  # runpod.serverless.progress_update (runpod_worker)
                if job.status == m.IN_PROGRESS:
                    job.update = meta["output"]
                    cp._publish_job(job)
            else:
                job.stream.append(meta["output"])
                cp.events.publish("chunk", job=job.id, endpoint=job.endpoint)

    def _job_done(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        """A worker finished one of its jobs: the outcome, and the notebook state it keeps.
        Everything it names is checked before anything changes, so a bad frame leaves the
        job on the worker (and the worker's exit puts it back in the queue)."""
        cp = self.cp
        worker_id = self.worker[0]
        job = cp.jobs.get(meta["id"])
        if job is None:
            return
        ok = meta.get("ok")
        state = meta.get("state")
        if state:
            _check_state(state)
        gpu_mem = _check_gpu_memory(meta.get("gpu_mem"))
        current = job.worker_id == worker_id and job.status not in m.TERMINAL
        if current and ok and job.kind != "json":
            result = {
                "codec": meta.get("c", "cloudpickle"),
                "blobs": self.own_refs(meta["refs"], bufs, self.writer_name),
            }
        ep = cp.endpoints.get(job.endpoint)
        w = ep.workers.get(worker_id) if ep else None
        if w is not None:
            w.jobs.discard(job.id)
            w.last_active = cp.clock()
            if ok:
                w.crashes = 0
            if gpu_mem is not None:
                w.gpu_memory = gpu_mem
            if state:
                w.remote_state.update(state)
                if job.owner is not None:
                    job.owner.sessions.update(state)
        if not current:
            if ep is not None:
                cp.kick(ep.name)
            return
        if ok:
            if job.kind == "json":
                result = {"output": meta.get("output")}
            cp._finish(job, m.COMPLETED, result=result)
        else:
            err = meta.get("error") or {}
            status = m.CANCELLED if meta.get("cancelled") else m.FAILED
            cp._finish(job, status, error=err)

    def _misbehaved(self, reason: str) -> None:
        """This worker sent what it must not: stop it (its jobs are retried elsewhere)."""
        wid, inc = self.worker
        ep, w = self.cp.lifecycle.find(wid, inc)
        if w is not None:
            self.cp._log(ep, None, "system", f"[{wid}] {reason}; stopping it\n")
            self.cp.lifecycle.stop(w, reason, kill=True, expected=False)

    # -- what a peer may name
    def own_refs(self, refs: Any, bufs: list[Any], writer: str | None) -> list[Any]:
        """Blob references from this peer: indexes into the frame, or spool files in the
        peer's own spool folder. Anything else is refused before it is recorded."""
        if not isinstance(refs, list):
            raise ValueError("refs must be a list")
        for r in refs:
            if type(r) is int:
                if not 0 <= r < len(bufs):
                    raise ValueError("buffer reference out of range")
            elif not self.own_spool_file(r, writer):
                raise ValueError("a blob names a file outside this connection's spool folder")
        return shm.from_refs(refs, bufs)

    def own_spool_file(self, ref: Any, writer: str | None) -> bool:
        """``ref``, as a frame carries it (a plain ``["shm", path, size]``), names a file
        in this peer's own spool folder."""
        try:
            f = shm.SpoolRef.from_wire(ref)  # checks the shape, the path's and size's types
        except ValueError:
            return False
        return (
            writer is not None
            and self.cp.spool is not None
            and os.path.dirname(f.path) == os.path.join(self.cp.spool, writer)
            and _plain_name(os.path.basename(f.path))
        )

    def spool_paths(self, paths: Any) -> list[str]:
        """The paths of a ``release`` that are spool files (others are ignored)."""
        spool = self.cp.spool
        if not spool or not isinstance(paths, list):
            return []
        return [
            p
            for p in paths
            if isinstance(p, str)
            and os.path.dirname(os.path.dirname(p)) == spool
            and _plain_name(os.path.basename(os.path.dirname(p)))
            and _plain_name(os.path.basename(p))
        ]

    # -- client operations
    def _reply(self, meta: dict[str, Any], result: Any) -> None:
        self.send({"op": "reply", "rid": meta["rid"], "ok": True, "result": result})

    def op_deploy(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        cfg = EndpointConfig.from_dict(meta["config"])
        cfg = self.cp.with_changes(cfg, meta.get("changes"))
        serves = self.cp.check_serves(meta.get("serves"))
        handler = meta.get("handler")
        if handler:
            self.cp.put_function(
                handler, meta["hc"], self.own_refs(meta["hrefs"], bufs, self.writer)
            )
        self._reply(meta, self.cp.deploy(cfg, handler, serves=serves))

    def op_submit(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        _check_submit(meta)
        self.cp.budget.check_submit(meta["ep"])  # before anything is recorded
        fn = meta.get("fn")
        blobs = self.own_refs(meta["refs"], bufs, self.writer)
        body: dict[str, Any] = {"codec": meta.get("c", "cloudpickle"), "stamp": meta.get("stamp"),
                                "blobs": blobs}  # fmt: skip
        if meta.get("paths"):
            body["paths"] = meta["paths"]
        if meta.get("affinity"):
            body["affinity"] = meta["affinity"]
        if meta.get("noshm"):
            body["noshm"] = True
        if "fnrefs" in meta:
            blobs = self.own_refs(meta["fnrefs"], bufs, self.writer)
            if fn:
                self.cp.put_function(fn, meta["fnc"], blobs)
            else:
                body["fn_codec"], body["fn_blobs"] = meta["fnc"], blobs
        elif fn and self.cp.get_function(fn) is None:
            self.send({"op": "need_fn", "id": meta["id"], "fn": fn})
            return
        self.cp.submit(meta["ep"], "py", body, fn=fn, owner=self, job_id=meta["id"],
                       progress=bool(meta.get("progress")))  # fmt: skip
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
        self.cp.route_release(self.spool_paths(meta["paths"]))

    def op_status(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        try:
            self._reply(meta, self.cp.status_payload(self.cp.job(meta["id"])))
        except NotFound as e:
            self.send({"op": "reply", "rid": meta["rid"], "ok": False, "error": str(e.args[0])})


def _plain_name(name: str) -> bool:
    """A single path component made by this project (no separators, not . or ..)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _check_state(state: Any) -> None:
    """A worker's report of the names it keeps: {session: {name: bytes}}."""
    if not isinstance(state, dict) or not all(
        isinstance(s, str)
        and isinstance(v, dict)
        and all(isinstance(n, str) and type(b) is int for n, b in v.items())
        for s, v in state.items()
    ):
        raise ValueError("state is {session: {name: size}}")


GPU_MEMORY_KEYS = ("allocated_bytes", "reserved_bytes", "devices")


def _check_gpu_memory(mem: Any) -> dict[str, int] | None:
    """A worker's GPU memory report (worker/gpu_memory.py): exactly its keys, counts >= 0."""
    if mem is None:
        return None
    if not (
        isinstance(mem, dict)
        and sorted(mem) == sorted(GPU_MEMORY_KEYS)
        and all(type(v) is int and v >= 0 for v in mem.values())
    ):
        raise ValueError(f"gpu_mem is {{{', '.join(GPU_MEMORY_KEYS)}}}: counts")
    return dict(mem)


def _check_submit(meta: dict[str, Any]) -> None:
    """A submit's fields have the shapes the control plane relies on later (a bad one would
    otherwise fail deep in scheduling, for every job of the endpoint)."""
    jid, ep, fn = meta.get("id"), meta.get("ep"), meta.get("fn")
    if not (isinstance(jid, str) and 0 < len(jid) <= 128):
        raise ValueError("a job id is a string of 1 to 128 characters")
    if not isinstance(ep, str) or not (fn is None or isinstance(fn, str)):
        raise ValueError("endpoint and function hash are strings")
    if not isinstance(meta.get("c", ""), str) or not isinstance(meta.get("fnc", ""), str):
        raise ValueError("codecs are strings")
    stamp = meta.get("stamp")
    if stamp is not None and not (
        isinstance(stamp, dict) and all(isinstance(v, str) for v in stamp.values())
    ):
        # The worker reads it before anything else (wire.check_stamp); found by fuzzing.
        raise ValueError('the version stamp is {"py": str, "ser": str} (wire.stamp())')
    paths = meta.get("paths")
    if paths and not (isinstance(paths, (list, tuple)) and all(isinstance(p, str) for p in paths)):
        raise ValueError("paths is a list of strings")
    aff = meta.get("affinity")
    if aff and not (
        isinstance(aff, dict)
        and isinstance(aff.get("worker"), str)
        and type(aff.get("incarnation")) is int
        and isinstance(aff.get("names", []), list)
        and all(isinstance(n, str) for n in aff.get("names", []))
    ):
        raise ValueError("affinity is {worker: str, incarnation: int, strict: bool, names: [str]}")

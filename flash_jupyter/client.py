"""Talking to the control plane: discovery, auto-start, jobs over the wire, management over HTTP.

Discovery: ``FLASH_JUPYTER_URL`` (+ ``FLASH_JUPYTER_TOKEN``) names a control plane; without
them the client uses the machine-local one found through the runtime file in the data dir,
and starts it (detached, shared by every kernel and script of the user) when none runs.

Jobs travel on one persistent binary connection (see ``protocol``): a call is one frame
out and one frame back through the control plane, with output frames streaming meanwhile.
A job's payload is kept until its result arrives, so a control plane restart loses
nothing: after reconnecting, the client asks for its jobs back and resubmits any the
control plane never recorded.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from . import envvars, errors, paths, shm, wire
from .protocol import SyncConnection, pid_alive

START_TIMEOUT = 30.0


# ---------------------------------------------------------------- discovery


def _http_get_json(url: str, token: str, timeout: float = 5.0) -> Any:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise errors.AuthError(f"{url}: 401 Unauthorized (check FLASH_JUPYTER_TOKEN)") from None
        raise errors.ControlPlaneError(f"{url}: HTTP {e.code}") from None
    except OSError as e:
        raise errors.ControlPlaneError(f"cannot reach the control plane at {url}: {e}") from None


def _try_connect(info: dict[str, Any]) -> SyncConnection | None:
    try:
        return SyncConnection.open(info["wire_host"], int(info["wire_port"]), timeout=2.0)
    except OSError:
        return None


def start_local(data_dir: Path | None = None, extra_args: list[str] = ()) -> dict[str, Any]:
    """Start the machine-local control plane, detached, unless one already runs."""
    data_dir = paths.ensure_private_dir(Path(data_dir or paths.home()))
    with open(data_dir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = paths.read_runtime(data_dir)
        if info and pid_alive(int(info.get("pid", 0))):
            conn = _try_connect(info)
            if conn is not None:
                conn.close()
                return info
        import subprocess

        with open(data_dir / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flash_jupyter.server", "--data-dir", str(data_dir),
                 "--idle-shutdown", repr(envvars.get("FLASH_JUPYTER_IDLE_SHUTDOWN")),
                 *extra_args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                close_fds=True,
            )  # fmt: skip
        # Reap it when it ends, so it never lingers as a zombie of this process.
        threading.Thread(target=proc.wait, name="flash-reap", daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            info = paths.read_runtime(data_dir)
            if info and info.get("pid") == proc.pid:
                return info
            if proc.returncode is not None:  # set by the reaping thread
                raise errors.ControlPlaneError(
                    f"the control plane exited at start (code {proc.returncode}); "
                    f"see {data_dir / 'server.log'}"
                )
            time.sleep(0.002)
        raise errors.ControlPlaneError(f"the control plane did not start in {START_TIMEOUT:g} s")


def discover(autostart: bool = True) -> dict[str, Any]:
    """Connection details of the control plane this process should use."""
    url = envvars.get("FLASH_JUPYTER_URL")
    if url:
        token = envvars.get("FLASH_JUPYTER_TOKEN") or ""
        if not token.isascii() or not token.isprintable() or token != token.strip():
            # Said before any request: httpx and urllib would echo the token in their error.
            raise errors.ConfigError(
                "FLASH_JUPYTER_TOKEN has spaces or control characters (a stray newline or "
                "\\r from a file?): it cannot be sent in an HTTP header; set it to the token "
                "alone (`flash-jupyter env` prints it)"
            )
        info = _http_get_json(url.rstrip("/") + "/v1/info", token)
        host = urlparse(url).hostname or "127.0.0.1"
        return {**info, "url": url.rstrip("/"), "token": token, "wire_host": host}
    info = paths.read_runtime()
    if info and pid_alive(int(info.get("pid", 0))):
        return info
    if not autostart:
        raise errors.ControlPlaneError("no control plane is running (flash-jupyter serve)")
    return start_local()


# ---------------------------------------------------------------- jobs


class JobState:
    """Client-side record of one submitted job."""

    __slots__ = (
        "callbacks", "done", "endpoint", "events", "files", "frame", "id", "outcome",
        "released", "sink",
    )  # fmt: skip

    def __init__(self, job_id: str, endpoint: str, frame: tuple[dict, list]):
        self.id = job_id
        self.endpoint = endpoint
        self.frame: tuple[dict, list] | None = frame  # kept for resubmission until done
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.outcome: dict[str, Any] | None = None
        self.done = threading.Event()
        self.callbacks: list[Any] = []
        self.sink: Any = None  # where output goes when nobody waits (None: the queue)
        self.released: list[str] = []  # spool files the worker let go of before the end
        self.files: list[str] = []  # spool files this job's input was written to


class Client:
    """One connection to a control plane, shared by everything in this process."""

    def __init__(self, info: dict[str, Any] | None = None):
        self._info = info
        self.conn: SyncConnection | None = None
        self.welcome: dict[str, Any] = {}
        self.jobs: dict[str, JobState] = {}
        self.replies: dict[int, tuple[threading.Event, list]] = {}
        self._rid = itertools.count(1)
        self._lock = threading.RLock()
        self._sent_fns: set[str] = set()
        self.deployed: dict[str, tuple[str, dict]] = {}  # name -> (config hash, answer)
        self._http: Any = None
        self.spool: shm.Spool | None = None
        self.writer = "c-" + os.urandom(6).hex()  # this client's folder in the spool
        self._file_job: dict[str, str] = {}  # spool file -> job that reads it
        self._releaser = shm.Releaser(self._send_release)
        self.same_host = False
        self._closed = False
        # Called from the reader thread with each "state_lost" notice: a worker holding
        # notebooks' remote names went (stopped, crashed, made room for another endpoint).
        self.on_state_lost: list[Any] = []
        self._connect()

    # -- connection
    def _connect(self) -> None:
        info = self._info or discover()
        conn = _try_connect(info)
        if conn is None and not envvars.is_set("FLASH_JUPYTER_URL") and self._info is None:
            info = start_local()
            conn = _try_connect(info)
        if conn is None:
            raise errors.ControlPlaneError(
                f"cannot connect to the control plane at {info.get('wire_host')}:"
                f"{info.get('wire_port')}"
            )
        conn.send({"role": "client", "token": info.get("token", ""), "stamp": wire.stamp(),
                   "pid": os.getpid(), "writer": self.writer}, hello=True)  # fmt: skip
        meta, _ = conn.recv()
        if meta.get("op") == "error":
            conn.close()
            if meta.get("status") == 401:
                raise errors.AuthError(meta.get("message", "401 Unauthorized"))
            raise errors.ControlPlaneError(meta.get("message", "refused"))
        self.info, self.conn, self.welcome = info, conn, meta
        root = meta.get("spool")
        same_host = meta.get("boot_id") == paths.boot_id()
        self.same_host = same_host
        if root and same_host and os.access(root, os.W_OK):
            if self.spool is None or self.spool.root != root:
                self.spool = shm.Spool(root, self.writer)
        else:
            self.spool = None
        self._sent_fns = set()
        threading.Thread(
            target=self._reader, args=(conn,), name="flash-reader", daemon=True
        ).start()

    @property
    def url(self) -> str:
        return self.info["url"]

    @property
    def token(self) -> str:
        return self.info.get("token", "")

    def _reader(self, conn: SyncConnection) -> None:
        try:
            while True:
                meta, bufs = conn.recv()
                self._dispatch(meta, bufs)
        except (ConnectionError, OSError):
            pass
        if self._closed or conn is not self.conn:
            return
        with self._lock:
            if not any(not j.done.is_set() for j in self.jobs.values()):
                # Nothing in flight: connect again (starting a control plane if need be)
                # at the next use, not now: `flash-jupyter shutdown` should stay shut.
                self.conn = None
                return
        self._reconnect()

    def _live(self) -> SyncConnection:
        """The connection, re-established if it was dropped while idle."""
        conn = self.conn
        if conn is None:
            with self._lock:
                if self.conn is None:
                    if not envvars.is_set("FLASH_JUPYTER_URL"):
                        self._info = None
                    self._connect()
                    for _, cfg_msg in list(self.deployed.values()):
                        self._request_nowait(cfg_msg)
                conn = self.conn
        return conn

    def _reconnect(self) -> None:
        delay = 0.05
        deadline = time.monotonic() + 120
        while not self._closed and time.monotonic() < deadline:
            try:
                with self._lock:
                    self._info = None if not envvars.is_set("FLASH_JUPYTER_URL") else self._info
                    self._connect()
                    pending = [j for j in self.jobs.values() if not j.done.is_set()]
                    for _, cfg_msg in list(self.deployed.values()):
                        self._request_nowait(cfg_msg)
                    if pending:
                        self.conn.send({"op": "watch", "ids": [j.id for j in pending]})
                return
            except errors.FlashError:
                time.sleep(delay)
                delay = min(1.0, delay * 2)
        for j in list(self.jobs.values()):
            if not j.done.is_set():
                self._complete(j, {"id": j.id, "status": "FAILED",
                                   "error": {"message": "lost the control plane"}})  # fmt: skip

    def _dispatch(self, meta: dict[str, Any], bufs: list[bytearray]) -> None:
        op = meta.get("op")
        if op == "done":
            job = self.jobs.get(meta["id"])
            if job is None:
                shm.discard(shm.from_refs(meta.get("refs", []), bufs))
                return
            if "refs" in meta:
                meta["blobs"] = [shm.open_blob(r, bufs, self._releaser) for r in meta["refs"]]
            self._complete(job, meta)
        elif op == "out":
            job = self.jobs.get(meta["id"])
            if job is not None:
                if job.sink is not None:
                    job.sink(meta["stream"], meta["text"])
                else:
                    job.events.put(("out", (meta["stream"], meta["text"])))
        elif op == "progress":  # asked for with submit(progress=True)
            job = self.jobs.get(meta["id"])
            if job is not None:
                job.events.put(("progress", meta))
        elif op == "display":
            job = self.jobs.get(meta["id"])
            if job is not None:
                extra = {k: meta[k] for k in ("transient", "update", "clear") if k in meta}
                job.events.put(("display", (meta["data"], meta.get("metadata") or {}, extra)))
        elif op == "reply":
            slot = self.replies.pop(meta["rid"], None)
            if slot is not None:
                slot[1].append(meta)
                slot[0].set()
        elif op == "release":
            self._on_release(meta["paths"])
        elif op == "need_fn":
            self._sent_fns.discard(meta["fn"])
            job = self.jobs.get(meta["id"])
            if job is not None and job.frame is not None:
                self._resend(job)
        elif op == "state_lost":
            for listener in list(self.on_state_lost):
                try:
                    listener(meta)
                except Exception:  # a listener's bug must not stop the reader thread
                    pass
        elif op == "unknown":
            for jid in meta["ids"]:
                job = self.jobs.get(jid)
                if job is not None and job.frame is not None and not job.done.is_set():
                    self._resend(job)

    def _send_release(self, paths: list[str]) -> None:
        if self.conn is not None:
            self.conn.send({"op": "release", "paths": paths})

    def _on_release(self, paths: list[str]) -> None:
        # A file is rewritten only once its job is over: a worker that released it and
        # then died before reporting would see its retry read the file again.
        ready = []
        for p in paths:
            jid = self._file_job.get(p)
            job = self.jobs.get(jid) if jid else None
            if job is not None and not job.done.is_set():
                job.released.append(p)
            else:
                self._file_job.pop(p, None)
                ready.append(p)
        if ready and self.spool is not None:
            self.spool.release(ready)

    def _complete(self, job: JobState, meta: dict[str, Any]) -> None:
        for p in job.files:
            self._file_job.pop(p, None)  # a release arriving later frees the file at once
        if job.released and self.spool is not None:
            self.spool.release(job.released)
        job.released = []
        job.outcome = meta
        job.frame = None
        self.jobs.pop(job.id, None)
        job.done.set()
        job.events.put(("done", meta))
        for cb in job.callbacks:
            try:
                cb(job)
            except Exception:
                pass

    def close(self) -> None:
        self._closed = True
        if self.conn is not None:
            self.conn.close()
        self._releaser.close()
        if self.spool is not None:
            self.spool.close()
        if self._http is not None:
            self._http.close()

    # -- requests over the wire
    def _request_nowait(
        self, meta: dict[str, Any], bufs: list[Any] = ()
    ) -> tuple[threading.Event, list]:
        rid = next(self._rid)
        slot = (threading.Event(), [])
        self.replies[rid] = slot
        self._live().send({**meta, "rid": rid}, bufs)
        return slot

    def request(self, meta: dict[str, Any], bufs: list[Any] = (), timeout: float = 60) -> Any:
        ev, box = self._request_nowait(meta, bufs)
        if not ev.wait(timeout):
            raise errors.ControlPlaneError(f"no answer to {meta.get('op')} in {timeout:g} s")
        reply = box[0]
        if not reply.get("ok"):
            raise errors.ControlPlaneError(reply.get("error", "request failed"))
        return reply["result"]

    # -- endpoints and jobs
    def deploy(
        self,
        config: dict[str, Any],
        handler: wire.Payload | None = None,
        changes: dict[str, Any] | None = None,
        serves: str | None = None,
    ) -> dict[str, Any]:
        """Create, reuse or update an endpoint (and set its HTTP handler function).

        With ``changes``, an endpoint that exists keeps every setting not named there
        (``config`` is only what a new endpoint starts from). ``serves``: "function",
        "class" or "cells", so HTTP callers of a class or a cell endpoint learn why they
        cannot call it."""
        meta: dict[str, Any] = {"op": "deploy", "config": config}
        if changes is not None:
            meta["changes"] = changes
        if serves is not None:
            meta["serves"] = serves
        bufs: list[Any] = []
        if handler is not None:
            meta["handler"] = _fn_hash(handler)
            meta["hc"] = handler.codec
            meta["hrefs"] = list(range(1 + len(handler.buffers)))
            bufs = [handler.data, *handler.buffers]
        answer = self.request(meta, bufs)
        again = {k: v for k, v in meta.items() if k in ("op", "config", "changes", "serves")}
        self.deployed[config["name"]] = (answer["config_hash"], again)
        return answer

    def submit(
        self,
        endpoint: str,
        fn: wire.Payload | None,
        call: wire.Payload,
        affinity: dict[str, Any] | None = None,
        progress: bool = False,
    ) -> JobState:
        """Queue one call. ``fn`` None: the call needs no function (a notebook cell).
        ``affinity``: run on this worker (its notebook state is there). ``progress``: the
        control plane reports each change of where the job stands (queued, cold start and
        its phase, running) as ``("progress", meta)`` in ``JobState.events``; without it
        nothing extra is sent."""
        jid = os.urandom(16).hex()
        blobs = shm.blobs_for(call.data, call.buffers, self.spool)
        files = [f.path for f in shm.spool_refs(blobs)]
        for f in files:
            self._file_job[f] = jid
        meta: dict[str, Any] = {"op": "submit", "id": jid, "ep": endpoint, "c": call.codec,
                                "stamp": wire.stamp()}  # fmt: skip
        if self.same_host:
            meta["paths"] = _user_paths()
        if self.spool is None:
            meta["noshm"] = True  # results must come back inline: we cannot map their files
        if affinity:
            meta["affinity"] = affinity
        if progress:
            meta["progress"] = 1
        bufs: list[Any] = []
        meta["refs"] = shm.to_refs(blobs, bufs)
        h = _fn_hash(fn) if fn is not None else None
        fn_bufs: list[Any] = []
        full_meta, full_bufs = dict(meta, fn=h), list(bufs)
        if fn is not None:
            if h is None or h not in self._sent_fns:
                fn_bufs = shm.blobs_for(fn.data, fn.buffers, None)
                meta["fnc"], meta["fnrefs"] = (
                    fn.codec,
                    list(range(len(bufs), len(bufs) + len(fn_bufs))),
                )
            meta["fn"] = h
            # Keep everything needed to send it again (with the function) after a reconnect.
            full_meta["fnc"] = fn.codec
            full_meta["fnrefs"] = list(range(len(bufs), len(bufs) + 1 + len(fn.buffers)))
            full_bufs += [fn.data, *fn.buffers]
        inline = sum(memoryview(b).nbytes for b in full_bufs)  # spool files are not here
        limit = self.welcome.get("max_frame")
        if limit and inline > limit:
            shm.discard(blobs)
            raise errors.SerializationError(
                f"this call sends {inline} bytes over the wire, more than the control plane "
                f"takes in one frame ({limit} bytes, FLASH_JUPYTER_MAX_FRAME_BYTES)"
            )
        job = JobState(jid, endpoint, (full_meta, full_bufs))
        job.files = files
        self.jobs[jid] = job
        with self._lock:
            self._live().send(meta, [*bufs, *fn_bufs])
        if h is not None:
            self._sent_fns.add(h)
        return job

    def _resend(self, job: JobState) -> None:
        meta, bufs = job.frame
        with self._lock:
            self._live().send(meta, bufs)
        if meta.get("fn"):
            self._sent_fns.add(meta["fn"])

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._live().send({"op": "cancel", "id": job_id})

    def job_status(self, job_id: str) -> dict[str, Any]:
        return self.request({"op": "status", "id": job_id})

    # -- management over HTTP
    @property
    def http(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
            )
        return self._http

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        r = self.http.request(method, path, **kw)
        if r.status_code == 401:
            raise errors.AuthError("401 Unauthorized: wrong token")
        if r.status_code >= 400:
            try:
                msg = r.json().get("error", r.text)
            except ValueError:
                msg = r.text
            if r.status_code == 402:  # the spending guard: its message says what to do
                raise errors.BudgetExceeded(msg)
            raise errors.ControlPlaneError(f"{method} {path}: {r.status_code} {msg}")
        return r.json()

    def endpoints(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/endpoints")

    def endpoint(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/endpoints/{name}")

    def health(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v2/{name}/health")

    def scale(self, name: str, wmin: int, wmax: int) -> dict[str, Any]:
        return self._call("POST", f"/v1/endpoints/{name}/scale", json={"min": wmin, "max": wmax})

    def stop(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/endpoints/{name}/stop")

    def delete(self, name: str) -> dict[str, Any]:
        self.deployed.pop(name, None)
        return self._call("DELETE", f"/v1/endpoints/{name}")

    def logs(self, name: str, tail: int = 200) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/endpoints/{name}/logs", params={"tail": tail})

    def billing(self) -> dict[str, Any]:
        return self._call("GET", "/v1/billing")

    def warm(self, name: str, workers: int = 1) -> dict[str, Any]:
        """Start up to ``workers`` workers now (at most the endpoint's max), without a job;
        they stay warm ``idle_timeout`` once ready. The endpoint view."""
        return self._call("POST", f"/v1/endpoints/{name}/warm", json={"workers": workers})

    def purge_queue(self, name: str) -> dict[str, Any]:
        """Cancel every job still queued on the endpoint: ``{"removed": n, ...}``."""
        return self._call("POST", f"/v2/{name}/purge-queue")

    def budget(self) -> dict[str, Any]:
        """The spending guard's view: limit, spent, state, and the same per endpoint."""
        return self._call("GET", "/v1/budget")

    def set_budget(self, limit: float | None, endpoint: str | None = None) -> dict[str, Any]:
        """Set the session's spending limit in USD (None clears it), or one endpoint's."""
        body: dict[str, Any] = {"limit": limit}
        if endpoint is not None:
            body["endpoint"] = endpoint
        return self._call("PUT", "/v1/budget", json=body)

    def jobs_list(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        params = {"endpoint": endpoint} if endpoint else {}
        return self._call("GET", "/v1/jobs", params=params)

    def spares(self) -> list[dict[str, Any]]:
        """The provider's spare workers (``/v1/info``'s ``provider.spares``): kept ready per
        environment, holding worker slots, billed to no endpoint until adopted."""
        return (self._call("GET", "/v1/info").get("provider") or {}).get("spares") or []


_USER_PATHS: tuple[tuple, tuple[str, ...]] = ((), ())


def _user_paths() -> tuple[str, ...]:
    """The caller's own code folders (working directory, script folder; not installed
    packages): a worker on this machine adds them to its sys.path, so `import mylib` inside
    a remote function finds the same mylib.py the notebook imports."""
    global _USER_PATHS
    key = (os.getcwd(), *sys.path)
    if _USER_PATHS[0] != key:
        import sysconfig

        skip = {os.path.realpath(p) for p in sysconfig.get_paths().values()}
        out = [key[0]]
        for p in sys.path:
            real = os.path.realpath(p or ".")
            if (
                os.path.isdir(real)
                and real not in skip
                and real not in out
                and "site-packages" not in real
                and "dist-packages" not in real
                and not real.startswith(os.path.realpath(sys.base_prefix))
            ):
                out.append(real)
        _USER_PATHS = (key, tuple(out))
    return _USER_PATHS[1]


def _fn_hash(p: wire.Payload) -> str | None:
    """Content hash of a function payload; None (no caching) when it carries big buffers."""
    if p.buffers:
        return None
    return hashlib.blake2b(p.data, digest_size=16).hexdigest()


# ---------------------------------------------------------------- the shared client

_client: Client | None = None
_client_lock = threading.Lock()
_client_pid = 0


def get_client() -> Client:
    """The process-wide client (created, and the control plane started, on first use)."""
    global _client, _client_pid
    if _client is not None and _client_pid == os.getpid():
        return _client
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            _client = Client()
            _client_pid = os.getpid()
        return _client


def reset_client() -> None:
    """Forget the shared client (the next use connects again, e.g. after changing env)."""
    global _client
    with _client_lock:
        if _client is not None:
            _client.close()
        _client = None

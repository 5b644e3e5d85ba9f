"""The worker process: take jobs from the control plane, run them, stream output, report.

A reader thread receives frames (jobs, cancels, exit) while the main thread runs jobs, so
a cancel lands while a job is busy: it arrives as SIGINT, which interrupts ``time.sleep``
and pure-Python loops alike. Results of back-to-back tiny jobs are sent together.
The worker never imports the server: it speaks the wire and nothing else.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
import time
import types
from collections import OrderedDict
from typing import Any

from .. import envvars, shm, wire
from ..errors import VersionMismatch
from ..protocol import SyncConnection
from .capture import FdCapture, OutputCapture

BATCH_MAX = 64
FN_CACHE = 256


class Cancelled(BaseException):
    pass


class Worker:
    def __init__(self, conn: SyncConnection, spec: dict[str, Any]):
        self.conn = conn
        self.spec = spec
        root = spec.get("spool")
        self.spool = None
        if root and os.path.isdir(root):
            self.spool = shm.Spool(root, f"w-{spec['id']}-{spec['incarnation']}")
        self.releaser = shm.Releaser(
            lambda paths: self.conn.send({"op": "release", "paths": paths})
        )
        self.inbox: queue.SimpleQueue[tuple[dict[str, Any], list[Any]] | None] = queue.SimpleQueue()
        self.fns: OrderedDict[str, Any] = OrderedDict()
        self.instances: dict[tuple[str, str], Any] = {}
        self.cancelled: set[str] = set()
        self.cells: Any = None  # notebook namespaces, made for the first %%flash cell
        self._cell_session: str | None = None
        self._paths_seen: set[tuple[str, ...]] = set()
        self.current: str | None = None  # job running on the main thread
        self.code_loaded = False  # said "started" (once per process: ends the cold start)
        self.lock = threading.Lock()
        self.pending: list[tuple[dict[str, Any], list[Any]]] = []
        self.capture = OutputCapture(self._send_output)
        self.fds: FdCapture | None = None
        self.loop: Any = None  # an asyncio loop, made for the first async job
        conc = int(spec.get("max_concurrency") or 1)
        self.pool = None
        if conc > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(conc, thread_name_prefix="job")

    # -- frames in
    def reader(self) -> None:
        try:
            while True:
                meta, bufs = self.conn.recv()
                op = meta.get("op")
                if op == "run":
                    self.inbox.put((meta, bufs))
                elif op == "cancel":
                    self._cancel(meta["id"])
                elif op == "release":
                    if self.spool is not None:
                        self.spool.release(meta["paths"])
                elif op == "forget":  # notebooks whose kernel ended: free their names
                    self.inbox.put((meta, bufs))
                elif op == "exit":
                    self.inbox.put(None)
                    return
        except (ConnectionError, OSError):
            pass
        # The control plane is gone: nothing may run unsupervised.
        os._exit(0)

    def _cancel(self, job_id: str) -> None:
        with self.lock:
            self.cancelled.add(job_id)
            running = self.current == job_id
        if running:
            os.kill(os.getpid(), signal.SIGINT)

    # -- frames out
    def _send_output(self, job_id: str, stream: str, text: str) -> None:
        self.conn.send({"op": "out", "id": job_id, "stream": stream, "text": text})

    def _queue_done(self, meta: dict[str, Any], bufs: list[Any], flush: bool) -> None:
        self.pending.append((meta, bufs))
        if flush or len(self.pending) >= BATCH_MAX:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        if len(self.pending) == 1:
            meta, bufs = self.pending[0]
            self.conn.send(meta, bufs)
        else:
            items, allbufs = [], []
            for meta, bufs in self.pending:
                base = len(allbufs)
                if "refs" in meta:
                    meta["refs"] = [r + base if isinstance(r, int) else r for r in meta["refs"]]
                allbufs.extend(bufs)
                items.append(meta)
            self.conn.send({"op": "dones", "items": items}, allbufs)
        self.pending = []

    # -- the job loop
    def run(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        threading.Thread(target=self.reader, name="wire-reader", daemon=True).start()
        self.capture.install()
        self.fds = FdCapture(self._send_output, lambda: self.current)
        while True:
            try:
                item = self.inbox.get(timeout=None) if not self.pending else self._poll()
            except Cancelled:
                continue
            if item is None:
                break
            meta, bufs = item
            if meta.get("op") == "forget":
                if self.cells is not None:  # between jobs, in order with them
                    for session in meta.get("sessions") or ():
                        self.cells.forget(session)
                continue
            if self.pool is not None:
                self.pool.submit(self._run_one_threaded, meta, bufs)
                continue
            self._run_one(meta, bufs)
        self.flush()
        self.capture.flush_all()
        sys.stdout.flush()
        os._exit(0)

    def _poll(self) -> tuple[dict[str, Any], list[Any]] | None:
        try:
            return self.inbox.get_nowait()
        except queue.Empty:
            self.flush()
            return self.inbox.get()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        with self.lock:
            cur = self.current
            hit = cur is not None and cur in self.cancelled
        if hit:
            raise Cancelled()

    def _run_one_threaded(self, meta: dict[str, Any], bufs: list[Any]) -> None:
        out_meta, out_bufs = self._execute(meta, bufs)
        self.conn.send(out_meta, out_bufs)

    def _run_one(self, meta: dict[str, Any], bufs: list[Any]) -> None:
        jid = meta["id"]
        with self.lock:
            if jid in self.cancelled:
                self.cancelled.discard(jid)
                self._queue_done({"op": "done", "id": jid, "ok": False, "cancelled": True,
                                  "error": {"message": "cancelled"}}, [], flush=True)  # fmt: skip
                return
            self.current = jid
        try:
            out_meta, out_bufs = self._execute(meta, bufs)
        except Cancelled:
            out_meta, out_bufs = {"op": "done", "id": jid, "ok": False, "cancelled": True,
                                  "error": {"message": "cancelled while running"}}, []  # fmt: skip
        finally:
            with self.lock:
                self.current = None
                self.cancelled.discard(jid)
        more = not self.inbox.empty()
        self._queue_done(out_meta, out_bufs, flush=not more)

    # -- execution
    def _publish_display(
        self, data: dict[str, Any], metadata: dict[str, Any], **extra: Any
    ) -> None:
        """A display message for the running job (extra: transient, update, clear)."""
        jid = self.capture.job_id() or self.current
        if jid is not None:
            sys.stdout.flush()  # what was printed before the display comes first
            meta = {"op": "display", "id": jid, "data": data, "metadata": metadata}
            meta.update((k, v) for k, v in extra.items() if v not in (None, {}, False))
            self.conn.send(meta)

    def _function(self, meta: dict[str, Any], bufs: list[Any]) -> Any:
        if "fnrefs" not in meta and meta.get("fn") is None:
            return None  # a cell: no function
        h = meta.get("fn")
        if h is not None and h in self.fns:
            self.fns.move_to_end(h)
            return self.fns[h]
        refs = meta["fnrefs"]
        blobs = [shm.open_blob(r, bufs, self.releaser) for r in refs]
        fn = wire.loads(blobs[0], blobs[1:], meta.get("fnc", "cloudpickle"))
        if h is not None:
            self.fns[h] = fn
            if len(self.fns) > FN_CACHE:
                self.fns.popitem(last=False)
        return fn

    def _execute(self, meta: dict[str, Any], bufs: list[Any]) -> tuple[dict[str, Any], list[Any]]:
        jid = meta["id"]
        kind = meta.get("kind", "py")
        self.capture.begin(jid)
        try:
            if kind == "py" and meta.get("stamp"):
                wire.check_stamp(meta["stamp"])
            if meta.get("paths"):
                self._add_paths(meta["paths"])
            fn = self._function(meta, bufs)
            if kind == "json":
                if not self.code_loaded:
                    self._started(jid)
                value = fn(**(meta.get("input") or {}))
                value = self._settle(value, jid, stream=True)
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as e:
                    raise TypeError(
                        f"the handler returned a {type(value).__name__}, which is not JSON "
                        f"({e}); return dicts, lists, strings and numbers to HTTP callers"
                    ) from None
                return {"op": "done", "id": jid, "ok": True, "output": value}, []
            blobs = [shm.open_blob(r, bufs, self.releaser) for r in meta["refs"]]
            call = wire.loads_call(blobs[0], blobs[1:], meta.get("c", "cloudpickle"))
            if not self.code_loaded:
                self._started(jid)
            value = self._settle(self._invoke(fn, meta.get("fn"), call), jid, stream=False)
            payload = wire.dumps(value, what="the return value")
            out_bufs: list[Any] = []
            spool = None if meta.get("noshm") else self.spool  # a caller on another host
            refs = shm.to_refs(shm.blobs_for(payload.data, payload.buffers, spool), out_bufs)
            done = {"op": "done", "id": jid, "ok": True, "c": payload.codec, "refs": refs}
            if type(call) is wire.CellCall and self.cells is not None:
                done["state"] = {call.session: self.cells.state(call.session)}
            return done, out_bufs
        except Cancelled:
            raise
        except KeyboardInterrupt:
            raise Cancelled() from None
        except BaseException as e:
            info = wire.capture_exception(e, skip_frames=_own_frames(e))
            if isinstance(e, VersionMismatch):
                info["frames"], info["traceback"] = [], f"VersionMismatch: {e}\n"
            return {"op": "done", "id": jid, "ok": False, "error": info}, []
        finally:
            self.capture.end()
            if self.fds is not None:
                self.fds.drain(jid)

    def _started(self, jid: str) -> None:
        """The first job's code is loaded and about to run: the control plane ends this
        worker's cold start ("code" phase) there. Once per process, never for warm jobs."""
        self.code_loaded = True
        self.conn.send({"op": "started", "id": jid})

    def _add_paths(self, paths: list[str]) -> None:
        key = tuple(paths)
        if key in self._paths_seen:
            return
        self._paths_seen.add(key)
        for p in paths:
            if p not in sys.path:
                sys.path.append(p)  # after installed packages: never shadow them

    def _invoke(self, fn: Any, h: str | None, call: wire.JobCall) -> Any:
        kind = type(call)
        if kind is wire.Call:
            return fn(*call.args, **call.kwargs)
        if kind is wire.MethodCall:  # class endpoints: one instance per key here
            inst_key = (h or repr(id(fn)), call.key)
            inst = self.instances.get(inst_key)
            if inst is None:
                inst = fn(*call.init_args, **call.init_kwargs)
                self.instances[inst_key] = inst
            return getattr(inst, call.method)(*call.args, **call.kwargs)
        if kind is wire.CellCall:  # a %%flash cell, in its notebook's namespace here
            if self.cells is None:
                from .cells import Cells

                self.cells = Cells(self._publish_display)
            self._cell_session = call.session
            return self.cells.run(call.session, call.code, call.inputs, call.opts)
        raise TypeError(f"not a job payload: {kind.__module__}.{kind.__qualname__}")

    def _settle(self, value: Any, jid: str, stream: bool) -> Any:
        if hasattr(value, "__await__"):
            if self.loop is None:
                import asyncio

                self.loop = asyncio.new_event_loop()
            value = self.loop.run_until_complete(_await(value))
        if isinstance(value, types.GeneratorType):
            out = []
            for chunk in value:
                out.append(chunk)
                if stream:
                    self.conn.send({"op": "chunk", "id": jid, "output": chunk})
            value = out
        return value


async def _await(aw: Any) -> Any:
    return await aw


def _own_frames(e: BaseException) -> int:
    """How many leading traceback frames belong to the worker (hidden from the user)."""
    n = 0
    tb = e.__traceback__
    here = os.path.dirname(__file__) + os.sep
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(here):
        n += 1
        tb = tb.tb_next
    return n


def main() -> None:
    raw = envvars.take("FLASH_JUPYTER_WORKER")
    if raw is None:
        raise SystemExit("flash-jupyter worker: FLASH_JUPYTER_WORKER is not set (the control "
                         "plane starts workers)")  # fmt: skip
    spec = json.loads(raw)
    token = envvars.take("FLASH_JUPYTER_WORKER_TOKEN") or ""
    conn = SyncConnection.open(spec["host"], int(spec["port"]))
    if spec.get("spare"):
        # A spare: connected and imported, waiting to be given an endpoint.
        conn.send({"role": "spare", "token": token, "nonce": spec.get("nonce"), "pid": os.getpid()},
                  hello=True)  # fmt: skip
        try:
            meta, _ = conn.recv()
        except (ConnectionError, OSError):
            os._exit(0)
        if meta.get("op") != "assign":
            os._exit(0)
        os.environ.update(meta["env"])
        spec = meta["spec"]
        conn.send({"op": "worker_hello", "id": spec["id"], "incarnation": spec["incarnation"],
                   "pid": os.getpid()})  # fmt: skip
    else:
        conn.send(
            {"role": "worker", "token": token, "id": spec["id"],
             "incarnation": spec["incarnation"], "pid": os.getpid(), "stamp": wire.stamp(),
             "time": time.time()},
            hello=True,
        )  # fmt: skip
    Worker(conn, spec).run()

"""The worker process: take jobs from the control plane, run them, stream output, report.

A reader thread receives frames (jobs, cancels, exit) while the main thread runs jobs, so
a cancel lands while a job is busy: it arrives as SIGINT, which interrupts ``time.sleep``
and pure-Python loops alike. Results of back-to-back tiny jobs are sent together.
The worker never imports the server: it speaks the wire and nothing else.

A spare (a worker process started before any endpoint needs it) imports what its
environment's workers imported last time (``preload``) before it says hello, so a cold start
that adopts it skips those imports. Modules that drive GPUs (torch, jax, tensorflow) are
only imported there, never initialised: torch, for one, reads ``CUDA_VISIBLE_DEVICES`` at
its first CUDA call, not at import, and the spare is given that variable when it is assigned.
"""

from __future__ import annotations

import builtins
import importlib
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
from .gpu_memory import note as note_gpu_memory

BATCH_MAX = 64
FN_CACHE = 256


class Cancelled(BaseException):
    pass


_HOOK_CODES: set[Any] = set()  # ImportLog's __import__ wrapper: not the user's frame


def _hide_import_hook(exc: BaseException | None, depth: int = 0) -> None:
    """Take ImportLog's wrapper out of an exception's traceback (and of those it chains to),
    so a failed ``import`` reads as it does without flash-jupyter."""
    if exc is None or not _HOOK_CODES or depth > 8:
        return
    tb, prev = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code in _HOOK_CODES:
            if prev is None:
                exc.__traceback__ = tb.tb_next
            else:
                prev.tb_next = tb.tb_next
        else:
            prev = tb
        tb = tb.tb_next
    _hide_import_hook(exc.__cause__ or exc.__context__, depth + 1)


class ImportLog:
    """The top-level modules this worker's jobs import, written to ``path`` (JSON) when the
    set grows, after the job's result is sent. The next spare of the environment imports
    them (``preload``). Known through ``builtins.__import__`` (every ``import`` statement and
    unpickling go through it): modules a job imports that a spare had already loaded count
    too, so the list follows what the code imports now and forgets what it stopped using;
    and from ``sys.modules`` for what ``importlib.import_module`` loads.
    The standard library, flash-jupyter and what the worker itself loaded are left out."""

    def __init__(self, path: str, baseline: set[str]):
        self.path = path
        skip = {n.partition(".")[0] for n in baseline}
        skip.update(sys.stdlib_module_names, ("flash_jupyter", "__main__", "__mp_main__"))
        self.skip = skip
        self.seen: set[str] = set()
        self.written: set[str] = set()
        self.loaded = set(sys.modules)  # ... and what importlib.import_module loads anew
        self.n_loaded = len(self.loaded)
        original = builtins.__import__

        def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
            module = original(name, globals, locals, fromlist, level)
            if level == 0:
                self.seen.add(name.partition(".")[0])
            return module

        builtins.__import__ = recording_import
        _HOOK_CODES.add(recording_import.__code__)

    def note(self, paths: list[str]) -> None:
        """Write the list if it grew (cheap when it did not: two length comparisons)."""
        if len(sys.modules) != self.n_loaded:  # loaded without ``import`` (importlib)
            now = list(sys.modules)
            self.seen.update(n.partition(".")[0] for n in now if n not in self.loaded)
            self.loaded.update(now)
            self.n_loaded = len(sys.modules)
        if len(self.seen) == len(self.written) or not self.path:
            return
        seen = set(self.seen)  # one C-level copy: job threads may be adding to it
        self.written = seen
        names = {n for n in seen if n not in self.skip and not n.startswith("_")}
        names = {n for n in names if n in sys.modules}  # imports that failed do not count
        if not names:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"modules": sorted(names), "paths": paths, "time": time.time()}, f)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a spare without a preload list is still a spare


def preload(names: list[str], paths: list[str] = ()) -> tuple[list[str], list[str]]:
    """Import ``names`` (after adding ``paths`` to sys.path); return (imported, failed). A
    module that fails is reported in the worker's log, not raised: the job imports it again
    and shows the error where it belongs."""
    for p in paths:
        if p not in sys.path:
            sys.path.append(p)  # after installed packages, as jobs add them
    done, failed = [], []
    for name in names:
        try:
            importlib.import_module(name)
            done.append(name)
        except (Exception, SystemExit) as e:
            failed.append(name)
            print(f"flash-jupyter worker: preloading {name} failed: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return done, failed


def _cuda_initialized() -> bool:
    """Whether something preloaded already initialised CUDA (then this process's devices
    are fixed, and it must not become a worker given other ones)."""
    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False


class JobIO:
    """A running job's channel to the control plane, for a handler that takes the whole job
    (``takes_job``: a Runpod worker file's, called as ``run_job({"id", "input"}, io)``):
    ``chunk`` streams one item (``/stream``), ``progress`` sets what ``/status`` shows as the
    job's output while it runs. Both may be called from any thread."""

    __slots__ = ("conn", "job_id", "worker_id")

    def __init__(self, conn: SyncConnection, job_id: str, worker_id: str):
        self.conn, self.job_id, self.worker_id = conn, job_id, worker_id

    def chunk(self, output: Any) -> None:
        self.conn.send({"op": "chunk", "id": self.job_id, "output": output})

    def progress(self, output: Any) -> None:
        self.conn.send({"op": "progress", "id": self.job_id, "output": output})


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
        # Jobs running at once (max_concurrency > 1): a function arrives with the first job
        # that needs it; the others wait here while that job's thread loads it.
        self.fns_ready = threading.Condition()
        self.fns_loading: dict[str, int] = {}  # function hash -> its jobs in the pool
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
        self._thread_loops = threading.local()  # pool threads' own loops (_event_loop)
        self.imports: ImportLog | None = None
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
                self._loading(meta, +1)  # before any later job can look for its function
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
        try:
            out_meta, out_bufs = self._execute(meta, bufs)
        finally:
            self._loading(meta, -1)
        self.conn.send(note_gpu_memory(out_meta), out_bufs)
        if self.imports is not None:
            with self.lock:
                self.imports.note(sorted(self._paths()))

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
        self._queue_done(note_gpu_memory(out_meta), out_bufs, flush=not more)
        if not more and self.imports is not None:
            self.imports.note(sorted(self._paths()))

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

    def _open(self, ref: Any, bufs: list[Any]) -> Any:
        """One blob of a frame. A worker without the spool (on another host) must get every
        buffer inline: a spool path would name a file of another machine."""
        if self.spool is None and not isinstance(ref, int):
            raise RuntimeError(
                "the control plane sent a shared-memory spool file to a worker that does not "
                "share its spool (on another host); it must send buffers inline"
            )
        return shm.open_blob(ref, bufs, self.releaser)

    def _function(self, meta: dict[str, Any], bufs: list[Any]) -> Any:
        if "fnrefs" not in meta and meta.get("fn") is None:
            return None  # a cell: no function
        h = meta.get("fn")
        if h is not None and h in self.fns:
            self.fns.move_to_end(h)
            return self.fns[h]
        if "fnrefs" not in meta:  # it came with another job: wait while that one loads it
            with self.fns_ready:
                self.fns_ready.wait_for(lambda: h in self.fns or h not in self.fns_loading)
                fn = self.fns.get(h)
            if fn is None:
                raise RuntimeError("this worker does not hold the endpoint's function (the "
                                   "job that brought it failed to load it)")  # fmt: skip
            return fn
        refs = meta["fnrefs"]
        blobs = [self._open(r, bufs) for r in refs]
        fn = wire.loads(blobs[0], blobs[1:], meta.get("fnc", "cloudpickle"))
        if h is not None:
            with self.fns_ready:
                self.fns[h] = fn
                if len(self.fns) > FN_CACHE:
                    self.fns.popitem(last=False)
                self.fns_ready.notify_all()
        return fn

    def _loading(self, meta: dict[str, Any], delta: int) -> None:
        """A pool job bringing its function starts (+1) or ends (-1): jobs needing that
        function wait until it is loaded or its job is over."""
        h = meta.get("fn")
        if h is None or "fnrefs" not in meta:
            return
        with self.fns_ready:
            n = self.fns_loading.get(h, 0) + delta
            if n > 0:
                self.fns_loading[h] = n
            else:
                self.fns_loading.pop(h, None)
                self.fns_ready.notify_all()

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
                if getattr(fn, "takes_job", False):  # a Runpod worker file's handler
                    io = JobIO(self.conn, jid, str(self.spec.get("id", "")))
                    value = fn.run_job({"id": jid, "input": meta.get("input")}, io)
                else:
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
            blobs = [self._open(r, bufs) for r in meta["refs"]]
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
            _hide_import_hook(e)
            info = getattr(e, "job_error", None)  # the handler's own record (Runpod's error)
            if not isinstance(info, dict):
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

    def _paths(self) -> set[str]:
        return {p for key in self._paths_seen for p in key}

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
            value = self._event_loop().run_until_complete(_await(value))
        if isinstance(value, types.GeneratorType):
            out = []
            for chunk in value:
                out.append(chunk)
                if stream:
                    self.conn.send({"op": "chunk", "id": jid, "output": chunk})
            value = out
        return value

    def _event_loop(self) -> Any:
        """The event loop async jobs run on in this thread: one for the main thread, kept
        for the process (state an async function keeps between calls stays usable), and
        one per pool thread, since jobs run side by side (``max_concurrency``) cannot
        share a loop that is running."""
        import asyncio

        if threading.current_thread() is threading.main_thread():
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
            return self.loop
        loop = getattr(self._thread_loops, "loop", None)
        if loop is None:
            loop = self._thread_loops.loop = asyncio.new_event_loop()
        return loop


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
    baseline = set(sys.modules)  # before any preload: what every worker has anyway
    raw = envvars.take("FLASH_JUPYTER_WORKER")
    if raw is None:
        raise SystemExit("flash-jupyter worker: FLASH_JUPYTER_WORKER is not set (the control "
                         "plane starts workers)")  # fmt: skip
    spec = json.loads(raw)
    token = envvars.take("FLASH_JUPYTER_WORKER_TOKEN") or ""
    if spec.get("spare"):
        # A spare: imports done first (what its environment's workers imported last time),
        # then connected, waiting to be given an endpoint.
        done, failed = preload(spec.get("preload") or [], spec.get("paths") or [])
        conn = SyncConnection.open(spec["host"], int(spec["port"]))
        conn.send({"role": "spare", "token": token, "nonce": spec.get("nonce"), "pid": os.getpid(),
                   "preloaded": done, "failed": failed, "cuda": _cuda_initialized()},
                  hello=True)  # fmt: skip
        try:
            meta, _ = conn.recv()
        except (ConnectionError, OSError):
            os._exit(0)
        if meta.get("op") != "assign":
            os._exit(0)
        os.environ.update(meta["env"])
        spec = meta["spec"]
        preload(spec.get("preload") or [], spec.get("paths") or [])  # its preload= setting
        conn.send({"op": "worker_hello", "id": spec["id"], "incarnation": spec["incarnation"],
                   "pid": os.getpid()})  # fmt: skip
    else:
        preload(spec.get("preload") or [], spec.get("paths") or [])
        conn = SyncConnection.open(spec["host"], int(spec["port"]))
        conn.send(
            {"role": "worker", "token": token, "id": spec["id"],
             "incarnation": spec["incarnation"], "pid": os.getpid(), "stamp": wire.stamp(),
             "time": time.time()},
            hello=True,
        )  # fmt: skip
    worker = Worker(conn, spec)
    if spec.get("imports"):
        worker.imports = ImportLog(spec["imports"], baseline)
    worker.run()

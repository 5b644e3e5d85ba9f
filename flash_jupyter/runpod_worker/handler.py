"""A Runpod serverless worker file as an endpoint's job handler, on the worker.

On Runpod the file runs as ``python handler.py``: it imports ``runpod``, defines its handler
and calls ``runpod.serverless.start(config)``, which starts Runpod's worker loop (it polls
Runpod's job queue and never returns). Here the worker runs the file the same way (as
``__main__``, from its own folder), with the real ``runpod`` package, after replacing
``runpod.serverless.start`` with a function that keeps the config and stops the file there
(nothing after ``start()`` runs on Runpod either). Each job is then run with Runpod's own job
code, as its worker loop would run it:

- ``rp_handler.is_generator`` decides between ``rp_job.run_job`` (the handler's return value,
  awaited if it is a coroutine; a returned ``{"error": ...}`` fails the job; an exception
  becomes Runpod's error JSON: ``error_type``, ``error_message``, ``error_traceback``,
  ``hostname``, ``worker_id``, ``runpod_version``) and ``rp_job.run_job_generator`` (each
  item is a chunk on ``/stream`` as it comes; the output is the list of chunks with
  ``return_aggregate_stream``, else ``[]``, as Runpod's ``handle_job`` sends it);
- ``concurrency_modifier`` is asked, as Runpod's ``JobScaler`` asks it (from 1, with the
  value it returned last), before each job starts: at most that many run at once here;
- ``runpod.serverless.progress_update(job, value)`` sends ``value`` to the control plane,
  where ``/status`` shows it as the running job's ``output`` (Runpod's worker posts it as
  ``{"status": "IN_PROGRESS", "output": value}``).

Async handlers (coroutines and async generators) share one event loop per worker process,
on its own thread, as they share Runpod's; sync handlers run in the job's own thread.

Only the standard library is imported here: ``runpod`` is imported on the worker, at the
first job.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any


class _Started(BaseException):
    """Raised by the stand-in for ``runpod.serverless.start`` once it has the config: the
    rest of the file does not run, as on Runpod (where ``start`` never returns)."""


class RunpodJobError(Exception):
    """A job the Runpod code reported as failed. ``job_error`` is the worker's error record
    for it; ``runpod_error`` in it is the error exactly as Runpod's worker reports it."""

    def __init__(self, error: Any):
        text = error if isinstance(error, str) else json.dumps(error, default=repr)
        kind, message, tb = "RunpodError", text, ""
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and "error_message" in parsed:  # run_job's shape
            kind = _type_name(str(parsed.get("error_type", kind)))
            message = str(parsed.get("error_message", ""))
            tb = str(parsed.get("error_traceback", ""))
        elif text.startswith("handler: ") and "\ntraceback: " in text:  # run_job_generator's
            message, _, tb = text[len("handler: ") :].partition("\ntraceback: ")
            message = message.rstrip()
            last = tb.strip().rsplit("\n", 1)[-1]
            if ":" in last and " " not in last.partition(":")[0]:
                kind = last.partition(":")[0]
        super().__init__(message)
        self.job_error = {
            "type": kind,
            "message": message,
            "traceback": tb,
            "exc_text": f"{kind}: {message}\n",
            "frames": [],
            "exc": None,
            "runpod_error": text,
        }


def _type_name(error_type: str) -> str:
    """``"<class 'ValueError'>"`` (how Runpod writes it) as ``ValueError``."""
    if error_type.startswith("<class '") and error_type.endswith("'>"):
        name = error_type[len("<class '") : -2]
        return name.removeprefix("builtins.")
    return error_type


# Per worker process: the file's config by (file, digest); the running jobs' channels by
# job id (progress_update finds its job there); the concurrency gate of each config.
_configs: dict[tuple[str, str], dict[str, Any]] = {}
_running: dict[str, Any] = {}
_gates: dict[int, _Gate] = {}
_load_lock = threading.Lock()
_captured: list[dict[str, Any]] = []
_shared_loop: asyncio.AbstractEventLoop | None = None
_thread_loops = threading.local()


class RunpodHandler:
    """What deploy registers for a Runpod worker file: where the file is (``file``;
    ``module_name`` inside a package), its text as deployed (``code``) and a fingerprint
    (``digest``). The worker calls ``run_job({"id": ..., "input": ...}, io)`` (``takes_job``)
    instead of calling it with the input as keyword arguments."""

    kind = "runpod"
    takes_job = True

    def __init__(
        self,
        file: str | Path,
        module_name: str | None = None,
        code: str | None = None,
        digest: str = "",
    ):
        self.file = str(file)
        self.module_name = module_name
        self.code = code
        self.digest = digest

    def __repr__(self) -> str:
        return f"<RunpodHandler {self.module_name or Path(self.file).name}>"

    # -- the file
    def config(self, worker_id: str = "") -> dict[str, Any]:
        """The config the file passes to ``runpod.serverless.start``, the file run once per
        worker process (again when a deploy brings new code)."""
        key = (self.file, self.digest)
        cfg = _configs.get(key)
        if cfg is not None:
            return cfg
        with _load_lock:
            cfg = _configs.get(key)
            if cfg is None:
                cfg = _configs[key] = self._run_file(worker_id)
        return cfg

    def _run_file(self, worker_id: str) -> dict[str, Any]:
        _prepare_runpod(worker_id)
        code = self.code
        if code is None:
            code = Path(self.file).read_text(encoding="utf-8")
        folder = Path(self.file).parent
        mod = types.ModuleType("__main__")
        mod.__file__ = self.file
        if self.module_name:  # inside a package: imported from the package's parent
            p = Path(self.file)
            p = p.parent if p.name == "__init__.py" else p
            _put_on_path(str(p.parents[self.module_name.count(".")]))
            mod.__package__ = self.module_name.rpartition(".")[0] or None
        _put_on_path(str(folder))
        # As `python handler.py` in the file's folder (Runpod's Dockerfiles set WORKDIR
        # there): the file is __main__, sys.argv[0] is the file, relative paths are its own.
        sys.modules["__main__"] = mod
        sys.argv = [self.file]
        os.chdir(folder)
        del _captured[:]
        try:
            exec(compile(code, self.file, "exec"), mod.__dict__)
        except _Started:
            pass
        if not _captured:
            raise RuntimeError(
                f"{self.file} ran to its end without calling runpod.serverless.start(config): "
                f"call it at the top level of the file (or under if __name__ == '__main__':), "
                f"as Runpod runs it"
            )
        return _captured[-1]

    # -- a job
    def run_job(self, job: dict[str, Any], io: Any) -> Any:
        """Run one job as Runpod's worker would; its output, or ``RunpodJobError``."""
        config = self.config(getattr(io, "worker_id", ""))
        handler = config["handler"]
        gate = _gates.get(id(config))
        if gate is None:
            gate = _gates.setdefault(id(config), _Gate(config.get("concurrency_modifier")))
        gate.enter()
        _running[job["id"]] = io
        try:
            coro = _run(config, job, io)
            if inspect.iscoroutinefunction(handler) or inspect.isasyncgenfunction(handler):
                result = _on_shared_loop(coro)
            else:
                result = _on_thread_loop(coro)
        finally:
            _running.pop(job["id"], None)
            gate.leave()
        if result.get("stopPod"):
            print(
                "flash-jupyter: refresh_worker asks Runpod for a fresh worker after this job; "
                "here the worker stays (stop it with `flash-jupyter stop ENDPOINT` if it must "
                "go)",
                file=sys.stderr,
            )
        if "error" in result:
            raise RunpodJobError(result["error"])
        return result.get("output")


async def _run(config: dict[str, Any], job: dict[str, Any], io: Any) -> dict[str, Any]:
    """What Runpod's ``rp_job.handle_job`` sends as the job's result, without the sending:
    ``{"output": ...}`` or ``{"error": ...}`` (``stopPod`` when the worker should go)."""
    from runpod.serverless.modules import rp_handler, rp_job

    handler = config["handler"]
    if not rp_handler.is_generator(handler):
        result = await rp_job.run_job(handler, job)
    else:
        result = {"output": []}
        aggregate = config.get("return_aggregate_stream", False)
        async for part in rp_job.run_job_generator(handler, job):
            out = part.get("output")
            if isinstance(out, dict) and out.get("error"):  # as handle_job reads a chunk
                part = {"error": str(out["error"])}
            if part.get("error"):
                result = part
                break
            if aggregate:
                result["output"].append(out)
            io.chunk(_checked(out, "a chunk the handler yielded"))
    if config.get("refresh_worker", False):
        result["stopPod"] = True
    return result


def _checked(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"{what} is a {type(value).__name__}, which is not JSON ({e}); Runpod's worker "
            f"could not send it either: yield dicts, lists, strings and numbers"
        ) from None
    return value


# ------------------------------------------------------------------ runpod, patched
def _prepare_runpod(worker_id: str) -> None:
    """Import the real runpod package and put this worker's stand-ins in place of
    ``runpod.serverless.start`` and ``progress_update``, before the file imports them."""
    # What Runpod's workers have in their environment, for its error reports (rp_job).
    if worker_id:
        os.environ.setdefault("RUNPOD_POD_ID", worker_id)
    os.environ.setdefault("RUNPOD_POD_HOSTNAME", socket.gethostname())
    try:
        import runpod.serverless as serverless
        from runpod.serverless.modules import rp_logger, rp_progress
    except ImportError as e:
        raise ImportError(
            f"{e}: a Runpod worker file runs with the runpod package, which this worker's "
            f"environment lacks: add runpod to the requirements.txt beside the file (or "
            f"--set NAME.deps=runpod) and deploy again"
        ) from e
    serverless.start = start
    serverless.progress_update = progress_update
    rp_progress.progress_update = progress_update
    # Runpod's logger reads its level once, at import: a spare worker may have imported
    # runpod before this endpoint's environment variables (RUNPOD_LOG_LEVEL) were set.
    level = os.environ.get("RUNPOD_LOG_LEVEL", os.environ.get("RUNPOD_DEBUG_LEVEL"))
    if level:
        try:
            rp_logger.RunPodLogger.level = rp_logger._validate_log_level(level)
        except (AttributeError, ValueError):
            pass


def start(config: dict[str, Any]) -> None:
    """``runpod.serverless.start`` on a flash-jupyter worker: keep ``config`` (its handler
    answers this endpoint's jobs) and stop running the file."""
    if not isinstance(config, dict) or not callable(config.get("handler")):
        raise TypeError(
            f"runpod.serverless.start needs a dict with a callable 'handler', not {config!r}"
        )
    _captured.append(config)
    raise _Started()


def progress_update(job: dict[str, Any], progress: Any) -> None:
    """``runpod.serverless.progress_update`` on a flash-jupyter worker: ``progress`` becomes
    the running job's ``output`` on ``/status`` until it ends. An update for a job that is
    not running here, or that is not JSON, is left out with a line in the job's output
    (Runpod's worker logs it and goes on)."""
    jid = job.get("id") if isinstance(job, dict) else None
    io = _running.get(jid) if isinstance(jid, str) else None
    if io is None:
        print(f"progress_update: job {jid!r} is not running on this worker; update left out",
              file=sys.stderr)  # fmt: skip
        return
    try:
        json.dumps(progress)
    except (TypeError, ValueError) as e:
        print(f"progress_update: {type(progress).__name__} is not JSON ({e}); update left out",
              file=sys.stderr)  # fmt: skip
        return
    io.progress(progress)


# ------------------------------------------------------------------ concurrency
class _Gate:
    """``concurrency_modifier`` on this worker: before a job starts it is asked for the
    concurrency, given the one it returned last (1 at first), as Runpod's ``JobScaler`` asks
    it; a job waits while that many run. (The control plane hands a worker at most the
    endpoint's ``max_concurrency``, read from the modifier at deploy.) Without a modifier
    the endpoint's ``max_concurrency`` alone counts."""

    def __init__(self, modifier: Any):
        self.modifier = modifier if callable(modifier) else None
        self.current = 1
        self.running = 0
        self.cond = threading.Condition()

    def enter(self) -> None:
        if self.modifier is None:
            return
        with self.cond:
            while True:
                n = self.modifier(self.current)
                if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                    raise TypeError(
                        f"concurrency_modifier returned {n!r}: it must return the number of "
                        f"jobs a worker may run at once (1 or more)"
                    )
                self.current = n
                if self.running < n:
                    break
                self.cond.wait(1.0)  # asked again when a job ends, or in a second
            self.running += 1

    def leave(self) -> None:
        if self.modifier is None:
            return
        with self.cond:
            self.running -= 1
            self.cond.notify()


# ------------------------------------------------------------------ event loops
def _on_shared_loop(coro: Any) -> Any:
    """Run ``coro`` on the process's one loop for async handlers; wait for it here. A cancel
    that interrupts the wait (the worker's SIGINT) cancels the task too."""
    global _shared_loop
    with _load_lock:
        if _shared_loop is None:
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="runpod-loop", daemon=True).start()
            _shared_loop = loop
    fut = asyncio.run_coroutine_threadsafe(coro, _shared_loop)
    try:
        return fut.result()
    except BaseException:
        fut.cancel()
        raise


def _on_thread_loop(coro: Any) -> Any:
    """Run ``coro`` (a sync handler inside Runpod's coroutine) on this thread's own loop."""
    loop = getattr(_thread_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = _thread_loops.loop = asyncio.new_event_loop()
    return loop.run_until_complete(coro)


def _put_on_path(folder: str) -> None:
    if folder not in sys.path:
        sys.path.insert(0, folder)

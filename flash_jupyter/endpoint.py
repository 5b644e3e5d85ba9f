"""``Endpoint``: run a function or a class on a remote GPU/CPU worker.

    @Endpoint(gpu="A100", workers=(0, 3), idle_timeout=30)
    def train(x): ...

    train(4)                   # blocks, returns the value (also inside a notebook's loop)
    job = train.submit(4)      # a Job: .id .status() .result(timeout) .cancel()
    train.map(range(100))      # results in order

The configuration is validated when the decorator is applied; the control plane is only
contacted at the first call. The function is pickled at every call, so it sees the
notebook's globals as they are now, not as they were when it was decorated.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from . import errors, wire
from .client import Client, get_client
from .config import EndpointConfig
from .job import Job
from .jupyter import receipts, usage

_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE, without importing inspect
_by_value_done: set[str] = set()


def _ship_module_by_value(obj: Any) -> None:
    """Code of the user's own modules travels by value; installed packages by reference.

    A worker does not share the caller's working directory or sys.path, so a function
    defined in ``mylib.py`` next to the notebook would not import there.
    """
    mod_name = getattr(obj, "__module__", None)
    if not mod_name or mod_name in _by_value_done or mod_name == "__main__":
        return
    _by_value_done.add(mod_name)
    mod = sys.modules.get(mod_name)
    path = getattr(mod, "__file__", None)
    if mod is None or path is None:
        return
    path = os.path.realpath(path)
    installed = {
        os.path.realpath(p)
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
    installed.update(os.path.realpath(p) for p in sys.path if "site-packages" in p)
    if any(path.startswith(p + os.sep) for p in installed):
        return
    if mod_name.split(".")[0] == "flash_jupyter":
        return
    try:
        cloudpickle.register_pickle_by_value(mod)
    except (ValueError, TypeError):
        pass


class _Remote:
    """What the function, async function and class forms share."""

    def __init__(self, target: Any, config: EndpointConfig):
        self._target = target
        self.config = config
        self.name = config.name
        self._deployed_by: tuple[int, str] | None = None

    def _client(self) -> Client:
        client = get_client()
        if self._deployed_by != (id(client), self.config.config_hash):
            self._deploy(client)
        return client

    def _deploy(self, client: Client) -> dict[str, Any]:
        handler, serves = None, "class"
        if isinstance(self._target, types.FunctionType):
            handler, serves = self._fn_payload(), "function"
        answer = client.deploy(self.config.to_dict(), handler, serves=serves)
        self._deployed_by = (id(client), self.config.config_hash)
        return answer

    def deploy(self) -> dict[str, Any]:
        """Create or update the endpoint now; a function's endpoint also becomes callable
        over HTTP (``/v2/NAME/run``). A class's cannot be yet: call its methods from Python."""
        self._deployed_by = None
        return self._deploy(get_client())

    def status(self) -> dict[str, Any]:
        """The endpoint as the control plane sees it: workers, states, health, cost."""
        return self._client().endpoint(self.name)

    def _fn_payload(self) -> wire.Payload:
        """The function (or class) pickled; what cannot be is named by the function's own
        name, and the endpoint's."""
        _ship_module_by_value(self._target)
        kind = "class" if isinstance(self._target, type) else "function"
        qualname = getattr(self._target, "__qualname__", None) or repr(self._target)
        try:
            return wire.dumps(self._target, what=f"{kind} {qualname!r} of endpoint {self.name!r}")
        except errors.SerializationError as e:
            raise e from None  # the message quotes the pickler's own complaint

    def _submit_call(
        self, fn: wire.Payload, call: wire.Call | wire.MethodCall, progress: bool = False
    ) -> Job:
        """Send one call. ``progress``: ask for progress frames (a notebook's receipt)."""
        client = self._client()
        try:
            payload = wire.dumps_call(call, what="argument")
        except errors.SerializationError as e:
            raise errors.SerializationError(_name_argument(str(e), call)) from None
        usage.note(self.config)
        state = client.submit(self.name, fn, payload, progress=progress)
        return Job(state, client, f"endpoint {self.name}")

    def _call(self, fn: wire.Payload, call: wire.Call | wire.MethodCall) -> Any:
        """A blocking call; in a notebook, with its live receipt when it is not fast."""
        __tracebackhide__ = True
        live = receipts.live_for(self.name)
        return self._submit_call(fn, call, live is not None).result(live=live)


# The call's fields that hold the caller's arguments, and how a message names them.
_ARGUMENT_FIELDS = {
    "args": "argument",
    "kwargs": "keyword argument",
    "init_args": "constructor argument",
    "init_kwargs": "constructor keyword argument",
}


def _name_argument(msg: str, call: wire.Call | wire.MethodCall) -> str:
    # wire.dumps_call names the culprit by its place in the pickled call: for a Call,
    # "argument[1][0]" -> "argument 0" and "argument[2]['k']" -> "keyword argument 'k'".
    import re

    m = re.match(r"cannot send argument\[(\d+)\]\[([^\]]+)\]", msg)
    if not m:
        return msg
    pos, idx = m.groups()
    label = _ARGUMENT_FIELDS.get(wire.call_field(call, int(pos)) or "")
    if label is None:
        return msg
    return msg.replace(f"argument[{pos}][{idx}]", f"{label} {idx}", 1)


class RemoteFunction(_Remote):
    """A function that runs on the endpoint's workers."""

    def __init__(self, fn: Callable[..., Any], config: EndpointConfig):
        super().__init__(fn, config)
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<RemoteFunction {self.name} ({self.config.hardware.name})>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        return self._call(self._fn_payload(), wire.Call(args, kwargs))

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        return self._submit_call(self._fn_payload(), wire.Call(args, kwargs))

    def map(
        self, iterable: Iterable[Any], *, timeout: float | None = None, progress: bool = False
    ) -> list[Any]:
        """Call the function on every item; results in order. In a notebook, a map that
        takes over a second shows one progress bar (unless receipts are off); elsewhere
        ``progress`` writes a counter to stderr. An item's error is raised as it is, with a
        note saying which item it was; the other jobs are then cancelled."""
        fn = self._fn_payload()
        label = getattr(self._target, "__qualname__", self.name)
        counter = self.name if progress else None
        bar = receipts.wanted()
        return _map(lambda x: self._submit_call(fn, wire.Call((x,), {}), bar), iterable,
                    timeout, f"{label}.map", counter, bar)  # fmt: skip

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Run the undecorated function here, in this process."""
        return self._target(*args, **kwargs)


class RemoteAsyncFunction(RemoteFunction):
    """An ``async def`` endpoint: calling it returns an awaitable."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._acall(args, kwargs)

    async def _acall(self, args: tuple, kwargs: dict) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, lambda: self.submit(*args, **kwargs))
        return await job.result_async()


class RemoteClass(_Remote):
    """A class whose instances live on a worker: constructed once per worker, methods remote."""

    def __init__(self, cls: type, config: EndpointConfig):
        super().__init__(cls, config)
        functools.update_wrapper(self, cls, updated=())

    def __repr__(self) -> str:
        return f"<RemoteClass {self.name} ({self.config.hardware.name})>"

    def __call__(self, *args: Any, **kwargs: Any) -> RemoteInstance:
        try:
            init = wire.dumps((args, kwargs), what="constructor argument")
        except errors.SerializationError:
            raise
        key = hashlib.blake2b(init.data, digest_size=12).hexdigest()
        return RemoteInstance(self, key, args, kwargs)


class RemoteInstance:
    """The caller's view of a remote object; attribute access gives remote methods."""

    def __init__(self, rc: RemoteClass, key: str, args: tuple, kwargs: dict):
        self._rc, self._key, self._args, self._kwargs = rc, key, args, kwargs

    def __repr__(self) -> str:
        return f"<remote {self._rc._target.__name__} on endpoint {self._rc.name}>"

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._rc._target, name, None)
        if attr is None or not callable(attr):
            raise AttributeError(f"{self._rc._target.__name__} has no method {name!r}")
        return RemoteMethod(self, name)


class RemoteMethod:
    def __init__(self, inst: RemoteInstance, name: str):
        self._inst, self._name = inst, name

    def _method_call(self, args: tuple, kwargs: dict) -> wire.MethodCall:
        i = self._inst
        return wire.MethodCall(i._key, i._args, i._kwargs, self._name, args, kwargs)

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        rc = self._inst._rc
        return rc._submit_call(rc._fn_payload(), self._method_call(args, kwargs))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        rc = self._inst._rc
        return rc._call(rc._fn_payload(), self._method_call(args, kwargs))

    def map(self, iterable: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Call the method on every item; results in order (errors as for a function's;
        a progress bar in a notebook as for a function's)."""
        label = f"{self._inst._rc._target.__name__}.{self._name}.map"
        rc, bar = self._inst._rc, receipts.wanted()
        fn = rc._fn_payload()
        return _map(lambda x: rc._submit_call(fn, self._method_call((x,), {}), bar), iterable,
                    timeout, label, None, bar)  # fmt: skip


def _map(
    submit: Callable[[Any], Job],
    iterable: Iterable[Any],
    timeout: float | None,
    label: str,
    counter: str | None,
    bar: bool = False,
) -> list[Any]:
    """Submit one job per item, then collect the results in order. An error is raised as
    it is (its type kept) with a note naming the item; the other jobs are cancelled.
    ``bar``: show a notebook progress bar (receipts.MapProgress) if it takes a while."""
    jobs: list[Job] = []
    out: list[Any] = []
    live = receipts.MapProgress(label, jobs) if bar else None
    try:
        for x in iterable:
            try:
                jobs.append(submit(x))
            except Exception as e:
                sent = f"; the {len(jobs)} sent before it were cancelled" if jobs else ""
                _note(e, f"(raised by item {len(jobs)} in {label}, counting from 0{sent})")
                raise
        n = len(jobs)
        for i, j in enumerate(jobs):
            try:
                out.append(j.result(timeout, live))
            except KeyboardInterrupt as e:
                _note(e, f"(in {label}: its other unfinished jobs were cancelled too)")
                if live is not None:
                    live.end("interrupted: the unfinished jobs were cancelled")
                raise
            except BaseException as e:
                _note(e, f"(raised by item {i} of {n} in {label}, counting from 0)")
                if live is not None:
                    live.end(f"stopped: item {i} raised; the unfinished jobs were cancelled")
                raise
            if counter and live is None:
                sys.stderr.write(f"\r{counter}: {i + 1}/{n} done")
        if live is not None:
            live.end()
        elif counter:
            sys.stderr.write("\n")
    except BaseException:
        for j in jobs:
            j.cancel()
        raise
    return out


def _note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11 and later
        exc.add_note(note)


class Endpoint:
    """Mark a function or class to run on remote workers.

    Args:
        name: the endpoint's name (defaults to the function's or class's name). Same name
            and config: the endpoint is reused; same name, new config: it is updated.
        gpu: a GPU type or alias ("A100", "H100", "RTX4090", "L4", ...) or a list of
            acceptable ones. cpu: a CPU instance type instead (e.g. "cpu3c-2-4").
        gpu_count: GPUs per worker.
        workers: n (= (0, n)) or (min, max) workers.
        idle_timeout: seconds a worker stays warm after its last job (1..3600).
        dependencies: pip requirements installed in the workers' environment.
        system_dependencies: commands that must exist on the worker host.
        env: environment variables of the workers.
        execution_timeout: seconds a job may run before it is TIMED_OUT.
        max_concurrency: jobs one worker runs at once.
        preload: modules imported before a job arrives, by each worker as it starts and by
            the spare worker kept for the endpoint's environment (e.g. ``["torch"]``).
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        gpu: str | list[str] | None = None,
        cpu: str | None = None,
        gpu_count: int = 1,
        workers: int | tuple[int, int] = (0, 1),
        idle_timeout: float = 60,
        dependencies: Iterable[str] = (),
        system_dependencies: Iterable[str] = (),
        env: dict[str, str] | None = None,
        execution_timeout: float | None = None,
        max_concurrency: int = 1,
        preload: Iterable[str] = (),
    ):
        self._kw = dict(
            gpu=gpu,
            cpu=cpu,
            gpu_count=gpu_count,
            workers=workers,
            idle_timeout=idle_timeout,
            dependencies=tuple(dependencies) if not isinstance(dependencies, str) else dependencies,
            system_dependencies=tuple(system_dependencies)
            if not isinstance(system_dependencies, str)
            else system_dependencies,
            env=env,
            execution_timeout=execution_timeout,
            max_concurrency=max_concurrency,
            preload=tuple(preload) if not isinstance(preload, str) else preload,
        )
        self.name = name
        # Validate now, so a typo fails where it was written.
        self.config = EndpointConfig.build(name or "unnamed", **self._kw)

    def __call__(self, target: Any) -> Any:
        name = self.name or getattr(target, "__name__", None)
        if not name or name == "<lambda>":
            raise errors.ConfigError("give the endpoint a name= (lambdas have none)")
        config = EndpointConfig.build(name, **self._kw)
        if isinstance(target, type):
            return RemoteClass(target, config)
        if getattr(getattr(target, "__code__", None), "co_flags", 0) & _CO_COROUTINE:
            return RemoteAsyncFunction(target, config)
        if callable(target):
            return RemoteFunction(target, config)
        raise TypeError(f"@Endpoint decorates a function or a class, not {type(target).__name__}")

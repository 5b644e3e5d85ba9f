"""Serialization of user code and data: what travels between a notebook and a worker.

cloudpickle, protocol 5: code defined in ``__main__`` or a notebook travels by value with
the globals and closures it uses; importable modules travel by reference. Buffers larger
than ``OOB_THRESHOLD`` (numpy arrays, bytes) are taken out-of-band and travel as raw frames
or shared-memory files, never copied into the pickle. dill is the fallback for objects
cloudpickle refuses. Anything neither can take fails *before* anything is sent, naming the
variable and its type.

The control plane never unpickles these payloads: it stores and forwards bytes.
"""

from __future__ import annotations

import functools
import io
import linecache
import os
import pickle
import sys
import traceback
import types
from collections import ChainMap
from typing import Any, NamedTuple

import cloudpickle

from . import errors

OOB_THRESHOLD = 64 * 1024
PY_VERSION = f"{sys.version_info[0]}.{sys.version_info[1]}"
SERIALIZER = f"cloudpickle {cloudpickle.__version__}"
# Pickles made with a newer cloudpickle major version may not load with an older one.
SERIALIZER_MAJOR = cloudpickle.__version__.split(".")[0]


class Payload:
    """A pickled object: the pickle stream plus its out-of-band buffers."""

    __slots__ = ("buffers", "codec", "data")

    def __init__(self, data: bytes, buffers: list[memoryview] | None = None,
                 codec: str = "cloudpickle"):  # fmt: skip
        self.data = data
        self.buffers = buffers or []
        self.codec = codec  # or "dill"

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(b.nbytes for b in self.buffers)


# ---------------------------------------------------------------- job payloads
# What a caller sends for one job: one of these, read by the worker and dispatched by type.
# Pickled (dumps_call), one travels as the plain tuple (tag, *fields): cloudpickle takes a
# tuple in its C fast path, where a class found by reference costs it several microseconds
# a call. Only the worker unpickles it (the control plane forwards the bytes).


class Call(NamedTuple):
    """A function endpoint's call: ``fn(*args, **kwargs)``."""

    args: tuple
    kwargs: dict[str, Any]


class MethodCall(NamedTuple):
    """A class endpoint's method call, on the instance built from ``init_args`` and
    ``init_kwargs`` (``key`` identifies it: one instance per key and worker)."""

    key: str
    init_args: tuple
    init_kwargs: dict[str, Any]
    method: str
    args: tuple
    kwargs: dict[str, Any]


class CellCall(NamedTuple):
    """A ``%%flash`` cell, run in its notebook's namespace on the worker (``session``)
    with the notebook variables it reads (``inputs``)."""

    session: str
    code: str
    inputs: dict[str, Any]
    opts: dict[str, Any]


JobCall = Call | MethodCall | CellCall
_TAG_OF: dict[type, str] = {Call: "call", MethodCall: "method", CellCall: "cell"}
_TYPE_OF: dict[str, Any] = {tag: t for t, tag in _TAG_OF.items()}


def dumps_call(call: JobCall, *, what: str) -> Payload:
    """Pickle a job's call as ``(tag, *fields)``. What cannot be pickled is named by its
    place there: ``what[1][0]`` is item 0 of the first field (see ``call_field``)."""
    return dumps((_TAG_OF[type(call)], *call), what=what)


def loads_call(data: bytes | memoryview, buffers: list[Any] = (),
               codec: str = "cloudpickle") -> JobCall:  # fmt: skip
    """The call ``dumps_call`` pickled."""
    t = loads(data, buffers, codec)
    kind = _TYPE_OF.get(t[0]) if type(t) is tuple and t and type(t[0]) is str else None
    if kind is None or len(t) != len(kind._fields) + 1:
        raise TypeError("the job's payload is not a call this worker knows")
    return kind._make(t[1:])


def call_field(call: JobCall, index: int) -> str | None:
    """The name of the field at ``index`` of the tuple ``dumps_call`` pickles (0: the tag)."""
    fields = type(call)._fields
    return fields[index - 1] if 1 <= index <= len(fields) else None


def stamp() -> dict[str, str]:
    """What a reader needs to know it can load our payloads."""
    return {"py": PY_VERSION, "ser": SERIALIZER_MAJOR}


def check_stamp(theirs: dict[str, str], who: str = "the caller") -> None:
    """Raise VersionMismatch with one plain sentence if a payload cannot be read here."""
    if theirs.get("py") != PY_VERSION:
        raise errors.VersionMismatch(
            f"{who} runs Python {theirs.get('py')} but this worker runs Python {PY_VERSION}; "
            f"pickled code only loads on the same minor version: run the notebook kernel with "
            f"Python {PY_VERSION} or give the endpoint an environment built with Python "
            f"{theirs.get('py')}."
        )
    if theirs.get("ser") != SERIALIZER_MAJOR:
        raise errors.VersionMismatch(
            f"{who} pickles with cloudpickle {theirs.get('ser')}.x but this worker has "
            f"{SERIALIZER}; install the same cloudpickle major version on both sides."
        )


def _code_reduce_keep_filename(obj: types.CodeType) -> tuple:
    # cloudpickle 3.1 writes "<dynamic-code>" as every by-value function's file name;
    # remote tracebacks need the real one (the caller fills in source lines from it).
    fn, args = _cp_code_reduce(obj)
    return fn, tuple(obj.co_filename if a == "<dynamic-code>" else a for a in args)


_cp_code_reduce = getattr(cloudpickle.cloudpickle, "_code_reduce", None)


class _Pickler(cloudpickle.Pickler):
    if _cp_code_reduce is not None:
        dispatch_table = ChainMap(
            {types.CodeType: _code_reduce_keep_filename}, cloudpickle.Pickler.dispatch_table
        )


def _cp_dumps(obj: Any, buffer_callback: Any) -> bytes:
    with io.BytesIO() as f:
        _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()


def _buffer_callback(out: list[memoryview]):
    def cb(buf: pickle.PickleBuffer) -> bool:
        raw = buf.raw()
        if raw.nbytes < OOB_THRESHOLD:
            return True  # small: keep in-band, a separate frame costs more than a copy
        out.append(raw)
        return False

    return cb


def dumps(obj: Any, *, what: str = "value") -> Payload:
    """Pickle ``obj``; on failure raise SerializationError naming the culprit."""
    bufs: list[memoryview] = []
    try:
        data = _cp_dumps(obj, _buffer_callback(bufs))
        return Payload(data, bufs)
    except Exception as first:
        try:
            import dill

            bufs = []
            f = io.BytesIO()
            dill.Pickler(f, protocol=5, buffer_callback=_buffer_callback(bufs), recurse=True).dump(
                obj
            )
            return Payload(f.getvalue(), bufs, codec="dill")
        except Exception:
            raise errors.SerializationError(describe_unpicklable(obj, what, first)) from first


def loads(data: bytes | memoryview, buffers: list[Any] = (), codec: str = "cloudpickle") -> Any:
    if codec == "dill":
        import dill  # noqa: F401 - registers dill's reconstructors

    return pickle.loads(data, buffers=buffers)


def _picklable(obj: Any) -> bool:
    try:
        _cp_dumps(obj, lambda b: False)
        return True
    except Exception:
        try:
            import dill

            dill.dumps(obj, protocol=5, recurse=True)
            return True
        except Exception:
            return False


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _globals_of(fn: Any) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    g = getattr(fn, "__globals__", None)
    if code is None or g is None:
        return {}
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if hasattr(k, "co_names"))
    found = {n: g[n] for n in sorted(names) if n in g}
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        try:
            found[name] = cell.cell_contents
        except ValueError:
            pass
    return found


def find_unpicklable(obj: Any, path: str, depth: int = 0) -> tuple[str, Any] | None:
    """Return (path, object) of the innermost thing that cannot be pickled, if any."""
    if depth > 6 or _picklable(obj):
        return None
    children: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        children = [(f"{path}[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
    elif callable(obj) and hasattr(obj, "__code__"):
        children = [(f"global {n!r} used by {path}", v) for n, v in _globals_of(obj).items()]
    elif isinstance(obj, type):
        children = [
            (f"{path}.{n}", v)
            for n, v in vars(obj).items()
            if callable(v) and hasattr(v, "__code__")
        ]
    elif hasattr(obj, "__dict__"):
        children = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    for p, child in children:
        inner = find_unpicklable(child, p, depth + 1)
        if inner is not None:
            return inner
    return path, obj


def describe_unpicklable(obj: Any, what: str, exc: BaseException) -> str:
    found = find_unpicklable(obj, what)
    path, culprit = found if found else (what, obj)
    if what.startswith("the return value"):
        return (
            f"cannot return {path} (type {_type_name(culprit)}) from the worker: it cannot "
            f"be pickled ({type(exc).__name__}: {exc}). Return something picklable, or keep "
            f"it on the worker (a class endpoint can hold it between calls)."
        )
    return (
        f"cannot send {path} (type {_type_name(culprit)}) to the worker: it cannot be pickled "
        f"({type(exc).__name__}: {exc}). Create it inside the remote function instead, or "
        f"pass something picklable."
    )


# ---------------------------------------------------------------- exceptions


def capture_exception(exc: BaseException, skip_frames: int = 0) -> dict[str, Any]:
    """Turn a worker-side exception into something the caller can rebuild.

    The exception object itself travels when it pickles (its type is then importable or
    defined in the notebook); its type name, message and traceback always do. Each frame
    also carries what the caller needs to rebuild it as the same code would look there:
    the function's qualified name, its first line and its parameters (no values).
    The first ``skip_frames`` frames, and the machinery that leads from them to the user's
    first frame (flash-jupyter's, asyncio's running a coroutine), are left out.
    """
    entries = []
    t = exc.__traceback__
    while t is not None:
        entries.append(t)
        t = t.tb_next
    skip, machinery = skip_frames, _machinery()
    while skip < len(entries) - 1 and entries[skip].tb_frame.f_code.co_filename.startswith(
        machinery
    ):
        skip += 1
    tb = traceback.extract_tb(exc.__traceback__)[skip:]
    frames = [
        {"filename": f.filename, "lineno": f.lineno or 0, "name": f.name, "line": f.line or "",
         **_code_shape(e.tb_frame.f_code)}
        for f, e in zip(tb, entries[skip:], strict=False)
    ]  # fmt: skip
    text = "".join(traceback.format_list(tb)) + "".join(
        traceback.format_exception_only(type(exc), exc)
    )
    t = type(exc)
    info: dict[str, Any] = {
        "exc_text": "".join(traceback.format_exception_only(type(exc), exc)),
        "type": f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__name__,
        "message": str(exc),
        "traceback": text,
        "frames": frames,
        "exc": None,
    }
    try:
        exc.__traceback__ = None
        blob = _cp_dumps(exc, None)
        pickle.loads(blob)  # must round-trip here, or it will not on the caller either
        info["exc"] = blob
    except Exception:
        pass
    return info


_CO_VARARGS, _CO_VARKEYWORDS = 0x04, 0x08


def _machinery() -> tuple[str, ...]:
    """Where the frames between the worker's job loop and the user's code live: ours, and
    asyncio's when it runs a coroutine (not imported here: workers start fast)."""
    mods = (errors, sys.modules.get("asyncio"))
    return tuple(
        os.path.dirname(os.path.abspath(m.__file__)) + os.sep
        for m in mods
        if getattr(m, "__file__", None)
    )


def _code_shape(code: types.CodeType) -> dict[str, Any]:
    """What a frame's code looks like from outside: name, first line, parameters."""
    if code.co_name == "<module>":
        return {}
    n = code.co_argcount + code.co_kwonlyargcount
    varargs, varkw = bool(code.co_flags & _CO_VARARGS), bool(code.co_flags & _CO_VARKEYWORDS)
    return {
        "qualname": getattr(code, "co_qualname", code.co_name),
        "first": code.co_firstlineno,
        "args": [code.co_posonlyargcount, code.co_argcount, code.co_kwonlyargcount,
                 int(varargs), int(varkw)],
        "varnames": list(code.co_varnames[: n + varargs + varkw]),
    }  # fmt: skip


def rebuild_exception(info: dict[str, Any], where: str = "") -> BaseException:
    """The caller's side of capture_exception: same type where possible, else RemoteError.

    The remote frames become the exception's own traceback, shown like a local one (with
    source lines from this process's linecache: notebook cells live there); in IPython,
    without the caller's frames of flash-jupyter. ``where`` (endpoint, worker) is a note.
    """
    exc: BaseException | None = None
    if info.get("exc") is not None:
        try:
            exc = pickle.loads(info["exc"])
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = errors.RemoteError(info["type"], info["message"], render_traceback(info))
    text = render_traceback(info)
    frames = info.get("frames") or []
    try:
        exc.remote_traceback = text  # type: ignore[attr-defined]
        exc.remote_frames = frames  # type: ignore[attr-defined]
    except AttributeError:
        pass
    tb = fake_traceback(frames) if frames else None
    if tb is not None:
        exc = exc.with_traceback(tb)
    elif frames:  # frames that could not be rebuilt: their text, quietly
        _add_note(exc, "remote traceback:\n" + text.rstrip())
    if where:
        _add_note(exc, f"(raised remotely: {where})")
    return errors.user_frames_only(exc)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11 and later
        try:
            exc.add_note(note)
        except (TypeError, AttributeError):  # __notes__ replaced by something odd
            pass


def fake_traceback(frames: list[dict[str, Any]]) -> types.TracebackType | None:
    """A real traceback object whose entries are the remote frames.

    Each entry is the frame of a stub compiled under the remote file name with the remote
    function's name, first line and parameters, stopped at the remote line: tools that
    render tracebacks (IPython's, stack_data's) then show it as they would show the same
    code failing here: ``in compute()``, ``in helper(a, b)``, the function's lines and
    the arrow at the failing one, from this process's linecache. Parameters are bound to
    a placeholder (the remote values stay remote).
    """
    tb = None
    try:
        for f in reversed(frames):
            lineno = max(1, int(f["lineno"]))
            entry = _stub_frame(f, lineno)
            tb = types.TracebackType(tb, entry.tb_frame, entry.tb_lasti, lineno)
    except Exception:  # a frame that cannot be faked: keep the text form instead
        return None
    return tb


def _stub_frame(f: dict[str, Any], lineno: int) -> types.TracebackType:
    """The traceback entry of a stub's frame standing for the remote frame ``f``."""
    g = {"__flash__": _FakeFrame(), "__builtins__": {}}
    filename, name = str(f["filename"]), str(f["name"])
    call: Any = None
    if f.get("args") is not None:
        try:
            args = tuple(int(a) for a in f["args"])
            varnames = tuple(str(v) for v in f["varnames"])
            qualname = str(f.get("qualname") or name)
            code = _function_stub(filename, lineno, name, qualname, int(f["first"]), args,
                                  varnames)  # fmt: skip
            argcount, kwonly = args[1], args[2]
            call = types.FunctionType(code, g, name, (_REMOTE,) * argcount)
            call.__kwdefaults__ = {v: _REMOTE for v in varnames[argcount : argcount + kwonly]}
        except Exception:  # a shape that does not compile: a plain frame of that name
            call = None
    if call is None:
        call = functools.partial(exec, _raise_at(filename, name, lineno), g)
    try:
        call()
    except _FakeFrame as e:
        return e.__traceback__.tb_next  # the stub's frame, not this one
    raise RuntimeError("the stub did not raise")


class _Remote:
    """What a remote frame's parameters hold here."""

    def __repr__(self) -> str:
        return "<remote>"


_REMOTE = _Remote()


@functools.lru_cache(maxsize=1024)
def _function_stub(
    filename: str, lineno: int, name: str, qualname: str, first: int,
    args: tuple[int, ...], varnames: tuple[str, ...],
) -> types.CodeType:  # fmt: skip
    """A function's code: ``def name(<its parameters>)`` at line ``first`` of
    ``filename``, raising at line ``lineno``, no column information."""
    posonly, argcount, kwonly, varargs, varkw = args
    if len(varnames) != argcount + kwonly + varargs + varkw or lineno < first or first < 1:
        raise ValueError("frame shape does not add up")
    ph = [f"_{i}" for i in range(len(varnames))]  # the real names may not be identifiers
    params = ph[:posonly] + (["/"] if posonly else []) + ph[posonly:argcount]
    rest = ph[argcount + kwonly :]
    if varargs:
        params.append("*" + rest.pop(0))
    elif kwonly:
        params.append("*")
    params += ph[argcount : argcount + kwonly]
    if varkw:
        params.append("**" + rest.pop(0))
    head = "\n" * (first - 1) + f"def _stub({', '.join(params)}):"
    body = " raise __flash__" if lineno == first else "\n" * (lineno - first) + " raise __flash__"
    module = compile(head + body, filename, "exec")
    code = next(c for c in module.co_consts if isinstance(c, types.CodeType))
    if sys.version_info >= (3, 11):
        code = code.replace(co_name=name, co_qualname=qualname, co_varnames=varnames)
        return _no_columns(code)
    return code.replace(co_name=name, co_varnames=varnames)


@functools.lru_cache(maxsize=1024)
def _raise_at(filename: str, name: str, lineno: int) -> types.CodeType:
    code = compile("\n" * (lineno - 1) + "raise __flash__", filename, "exec")
    code = code.replace(co_name=name)
    return _no_columns(code) if sys.version_info >= (3, 11) else code


def _no_columns(code: types.CodeType) -> types.CodeType:
    """``code`` with its lines but no column information: renderers then show the real
    source line without pointing into it (the columns would be the stub's)."""
    lines = [p[0] for p in code.co_positions()]
    table = bytearray()
    prev = code.co_firstlineno
    i = 0
    while i < len(lines):
        line, n = lines[i], 1
        while n < 8 and i + n < len(lines) and lines[i + n] == line:
            n += 1
        if line is None:
            table.append(0x80 | (15 << 3) | (n - 1))  # 15: no location
        else:
            table.append(0x80 | (13 << 3) | (n - 1))  # 13: line only, no columns
            table += _svarint(line - prev)
            prev = line
        i += n
    return code.replace(co_linetable=bytes(table))


def _svarint(v: int) -> bytes:
    v = (-v << 1) | 1 if v < 0 else v << 1
    out = bytearray()
    while v >= 64:
        out.append(64 | (v & 63))
        v >>= 6
    out.append(v)
    return bytes(out)


class _FakeFrame(Exception):
    pass


def render_traceback(info: dict[str, Any]) -> str:
    """The remote traceback, with source lines the worker could not read (code defined in
    a notebook cell lives in the caller's linecache) filled in from here."""
    frames = info.get("frames")
    if not frames:
        return info.get("traceback", "")
    summary = traceback.StackSummary.from_list(
        [
            (f["filename"], f["lineno"], f["name"],
             f["line"] or linecache.getline(f["filename"], f["lineno"]).strip())
            for f in frames
        ]
    )  # fmt: skip
    tail = info["traceback"].splitlines(keepends=True)
    exc_text = info.get("exc_text") or (tail[-1] if tail else "")
    return "".join(summary.format()) + exc_text

"""Exceptions a user of flash-jupyter can meet and catch, and how IPython shows them.

A user error must look like the user's own code's error: in IPython (a notebook, a kernel,
the terminal) flash-jupyter's errors, the remote exceptions it re-raises and the interrupts
of its waits are shown with the user's frames only (``_render_traceback_``, IPython's hook
for exceptions that render themselves): none of flash-jupyter's or IPython's own frames,
and not the ``get_ipython().run_cell_magic(...)`` line IPython makes of a ``%%flash`` cell.
"""

from __future__ import annotations

import os
import types


class _UserFramesOnly:
    """Mixin: IPython shows the exception with the user's frames only."""

    def _render_traceback_(self) -> list[str]:
        return ipython_traceback(self)  # type: ignore[arg-type]


class FlashError(_UserFramesOnly, Exception):
    """Base class of flash-jupyter's own errors."""


class ConfigError(FlashError, ValueError):
    """An Endpoint or setting was given a value it cannot take."""


class SerializationError(FlashError, TypeError):
    """Something the call needs cannot be pickled; the message names it and its type."""


class VersionMismatch(FlashError):
    """The worker cannot read the caller's payload (Python or serializer version differ)."""


class ControlPlaneError(FlashError):
    """The control plane refused a request or could not be reached."""


class AuthError(ControlPlaneError):
    """The control plane rejected the token (HTTP 401)."""


class BudgetExceeded(FlashError):
    """The spending guard refused new work: the session's budget (or the endpoint's) is
    reached. Raise the limit (``flash-jupyter budget N``, ``%flash budget N``) to go on."""

    def __init__(self, message: str, endpoint: str | None = None):
        super().__init__(message)
        self.endpoint = endpoint

    def __reduce__(self):
        return (type(self), (str(self), self.endpoint))

    def _render_traceback_(self) -> list[str]:
        # A refusal, not a bug: IPython shows the one line, wherever it was raised.
        return [f"{type(self).__name__}: {self}"]


class JobFailed(FlashError):
    """A job ended without a result and without a user exception to re-raise."""

    def __init__(self, job_id: str, status: str, reason: str):
        super().__init__(f"job {job_id} {status}: {reason}")
        self.job_id = job_id
        self.status = status
        self.reason = reason


class JobCancelled(JobFailed):
    """The job was cancelled before it produced a result."""


class JobTimedOut(JobFailed, TimeoutError):
    """The job ran past the endpoint's execution_timeout."""


class RemoteError(FlashError):
    """A remote exception whose type cannot be imported here; carries the type's name."""

    def __init__(self, type_name: str, message: str, traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class RemoteTraceback(Exception):
    """The text of a remote traceback. No longer chained to re-raised remote exceptions
    (their ``remote_traceback`` attribute holds the text); kept for code that imports it."""

    def __init__(self, text: str, where: str = ""):
        super().__init__(text)
        self.text = text
        self.where = where

    def __str__(self) -> str:
        head = f"Remote traceback ({self.where}):" if self.where else "Remote traceback:"
        return f'{head}\n"""\n{self.text.rstrip()}\n"""'


class RemoteStateLost(FlashError):
    """A cell needs names that lived on a worker which is gone (scaled down or crashed)."""

    def __init__(self, message: str, names: list[str] | tuple[str, ...] = ()):
        super().__init__(message)
        self.names = list(names)

    def __reduce__(self):
        return (type(self), (str(self), self.names))


# ---------------------------------------------------------------- how IPython shows them

_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep
MAGICS = frozenset({"flash"})  # the magics whose call line IPython would show


def user_frames_only(exc: BaseException) -> BaseException:
    """Have IPython show ``exc`` (of any type: a remote ValueError, a KeyboardInterrupt) with
    the user's frames only, as for flash-jupyter's own errors. Returns ``exc``."""
    if not hasattr(type(exc), "_render_traceback_"):
        try:
            exc._render_traceback_ = _Render(exc)  # type: ignore[attr-defined]
        except (AttributeError, TypeError):  # no __dict__: shown as IPython would anyway
            pass
    return exc


def at_boundary(exc: BaseException) -> BaseException:
    """For any exception leaving flash-jupyter's code for the user's: shown with the user's
    frames only (``user_frames_only``), unless it has none and is not one of ours or an
    interrupt: that is a bug of ours, and its frames say where. Returns ``exc``."""
    if isinstance(exc, KeyboardInterrupt) or _trim(exc.__traceback__) is not None:
        user_frames_only(exc)
    return exc


class _Render:
    """An exception's ``_render_traceback_`` (IPython calls it without arguments). It
    pickles with its exception, so the exception still pickles."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self) -> list[str]:
        return ipython_traceback(self.exc)

    def __reduce__(self) -> tuple:
        return (_Render, (self.exc,))


def ipython_traceback(exc: BaseException) -> list[str]:
    """IPython's own rendering of ``exc`` (its colours, its ``%xmode``) without the frames
    of flash-jupyter and IPython, in ``exc`` and in the exceptions chained to it; only the
    message when no frame of the user's is left."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    chain = _chain(exc)
    saved = [(e, e.__traceback__) for e in chain]
    try:
        for e in chain:
            e.__traceback__ = _trim(e.__traceback__)
        if shell is None:  # called outside IPython: plain text, the same frames
            import traceback

            return "".join(traceback.format_exception(exc)).splitlines()
        itb = shell.InteractiveTB
        if exc.__traceback__ is None and len(chain) == 1:
            return itb.get_exception_only(type(exc), exc)
        return itb.structured_traceback(type(exc), exc, exc.__traceback__, tb_offset=0)
    finally:
        for e, tb in saved:
            e.__traceback__ = tb


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions a traceback shows with it (causes, contexts)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ if e.__cause__ is not None else (
            None if e.__suppress_context__ else e.__context__
        )  # fmt: skip
    return out


def _ipython_dir() -> str:
    try:
        import IPython
    except ImportError:
        return "\0"  # no file name starts with NUL
    return os.path.dirname(os.path.abspath(IPython.__file__)) + os.sep


def _ours(frame: types.FrameType, ipython: str) -> bool:
    filename = frame.f_code.co_filename
    return filename.startswith(_HERE) or filename.startswith(ipython)


def _calls_our_magic(frame: types.FrameType) -> bool:
    """IPython running one of our magics (what a ``%%flash`` cell becomes)."""
    return frame.f_code.co_name in ("run_cell_magic", "run_line_magic") and (
        frame.f_locals.get("magic_name") in MAGICS
    )


def _trim(tb: types.TracebackType | None) -> types.TracebackType | None:
    """A new traceback of the user's entries of ``tb``."""
    entries: list[types.TracebackType] = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    ipython = _ipython_dir()
    kept = []
    for i, t in enumerate(entries):
        f = t.tb_frame
        if _ours(f, ipython):
            continue
        nxt = entries[i + 1].tb_frame if i + 1 < len(entries) else None
        if f.f_code.co_name == "<module>" and nxt is not None and _calls_our_magic(nxt):
            continue  # the line `get_ipython().run_cell_magic('flash', ...)`
        kept.append(t)
    out = None
    for t in reversed(kept):
        out = types.TracebackType(out, t.tb_frame, t.tb_lasti, t.tb_lineno)
    return out

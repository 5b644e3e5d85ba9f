"""Exceptions a user of flash-jupyter can meet and catch."""

from __future__ import annotations


class FlashError(Exception):
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
    """Set as ``__cause__`` of a re-raised remote exception so the remote frames show."""

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

"""Bad input and remote failures: clear errors, original types, nothing sent by mistake."""

from __future__ import annotations

import socket
import threading

import pytest

from flash_jupyter import (
    ConfigError,
    Endpoint,
    RemoteError,
    SerializationError,
    VersionMismatch,
    wire,
)


class NotebookError(Exception):
    """An exception type defined by the user (here: in this module)."""


def test_remote_exception_keeps_type_and_traceback(client, name):
    @Endpoint(name=name)
    def boom(x):
        if x > 1:
            raise ValueError(f"x too big: {x}")
        return x

    with pytest.raises(ValueError, match="x too big: 5") as ei:
        boom(5)
    exc = ei.value
    tb = exc.remote_traceback
    assert 'raise ValueError(f"x too big: {x}")' in tb  # the source line
    assert "test_errors.py" in tb and "in boom" in tb  # file and function
    assert "flash_jupyter/worker" not in tb  # the worker's own frames are hidden
    # The remote frames are the exception's own traceback, rendered like local ones.
    import traceback

    shown = "".join(traceback.format_exception(exc))
    assert shown.index("in boom") > shown.index("test_errors.py")
    assert 'raise ValueError(f"x too big: {x}")' in shown
    assert any(f"endpoint {name}" in n for n in exc.__notes__)


def test_user_defined_exception_type_round_trips(client, name):
    @Endpoint(name=name)
    def fail():
        raise NotebookError("custom")

    with pytest.raises(NotebookError, match="custom"):
        fail()


def test_unpicklable_exception_becomes_remote_error(client, name):
    @Endpoint(name=name)
    def fail():
        import threading

        class Odd(Exception):
            def __init__(self, msg):
                super().__init__(msg)
                self.lock = threading.Lock()  # makes the instance unpicklable

            def __reduce__(self):
                raise TypeError("no")

        raise Odd("strange")

    with pytest.raises(RemoteError) as ei:
        fail()
    assert "Odd" in ei.value.type_name and ei.value.message == "strange"
    assert "raise Odd" in ei.value.traceback


def _health(client, name):
    return client.health(name)["jobs"]


def test_unpicklable_argument_named_before_sending(client, name):
    @Endpoint(name=name)
    def take(a, b=None):
        return 1

    assert take(1) == 1
    before = _health(client, name)
    gen = (i for i in range(3))
    with pytest.raises(SerializationError) as ei:
        take(1, b=gen)
    msg = str(ei.value)
    assert "keyword argument 'b'" in msg and "generator" in msg
    with pytest.raises(SerializationError, match=r"argument 0 .*generator"):
        take(gen)
    after = _health(client, name)
    assert after == before  # nothing was queued


SOCK = socket.socket()


def test_unpicklable_global_named(client, name):
    """The global and its type are named, and so is the function itself (by its own name,
    not the endpoint's) with its endpoint."""

    @Endpoint(name=name)
    def uses_the_socket():
        return SOCK.fileno()

    with pytest.raises(SerializationError) as ei:
        uses_the_socket()
    msg = str(ei.value)
    assert "'SOCK'" in msg and "socket" in msg
    assert "function 'test_unpicklable_global_named.<locals>" in msg
    assert "uses_the_socket'" in msg and f"endpoint {name!r}" in msg, msg
    assert ei.value.__cause__ is None and ei.value.__suppress_context__, "one error, not two"


def test_version_mismatch_is_one_plain_sentence(client, name, monkeypatch):
    @Endpoint(name=name)
    def f():
        return 1

    assert f() == 1
    # This caller claims another Python minor version: the worker must refuse plainly.
    monkeypatch.setattr(wire, "PY_VERSION", "3.99")
    with pytest.raises(VersionMismatch) as ei:
        f()
    msg = str(ei.value)
    assert "Python 3.99" in msg and "same minor version" in msg


def test_serializer_mismatch(client, name, monkeypatch):
    @Endpoint(name=name)
    def f():
        return 1

    monkeypatch.setattr(wire, "SERIALIZER_MAJOR", "0")
    with pytest.raises(VersionMismatch, match=r"cloudpickle 0\.x"):
        f()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"idle_timeout": 0}, "between 1 and 3600"),
        ({"idle_timeout": 4000}, "between 1 and 3600"),
        ({"workers": (3, 1)}, "must not exceed max"),
        ({"workers": (-1, 2)}, "0 <= min"),
        ({"gpu": "A1000"}, "known: .*A100.*H100"),
        ({"gpu": "A100", "cpu": "cpu3c-2-4"}, "not both"),
        ({"cpu": "big"}, "unknown CPU"),
        ({"gpu_count": 0}, "gpu_count"),
        ({"execution_timeout": -1}, "execution_timeout"),
        ({"env": {"K": 1}}, "env must map"),
    ],
)
def test_bad_config_fails_at_decoration(kw, message):
    with pytest.raises(ConfigError, match=message):
        Endpoint(name="x", **kw)


def test_bad_name_fails_at_decoration():
    with pytest.raises(ConfigError, match="not valid"):
        Endpoint(name="no spaces allowed")
    with pytest.raises(ConfigError, match="name="):
        Endpoint()(lambda: 1)


def test_wrong_token_on_the_wire(server, monkeypatch):
    from flash_jupyter import AuthError
    from flash_jupyter import client as fj_client

    monkeypatch.setenv("FLASH_JUPYTER_URL", server.url)
    monkeypatch.setenv("FLASH_JUPYTER_TOKEN", "wrong")
    fj_client.reset_client()
    with pytest.raises(AuthError):
        fj_client.get_client()
    fj_client.reset_client()


def test_interrupting_the_wait_cancels_the_remote_job(client, name):
    import os
    import signal
    import time

    @Endpoint(name=name)
    def long():
        import time

        time.sleep(30)

    long.deploy()
    job = long.submit()
    # What a kernel interrupt (the stop button) does: SIGINT to this process. Python's own
    # handler, whatever this run inherited (a shell running pytest in the background without
    # job control makes it SIG_IGN, and then the signal would never arrive).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt) as ei:
            job.result(timeout=20)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t < 5
    assert job.status() == "CANCELLED"
    # It says what happened, and where.
    worker = job.info()["workerId"]
    assert str(ei.value) == f"cancelled job {job.id[:8]} on endpoint {name} (worker {worker})"
    assert (ei.value.job_id, ei.value.endpoint, ei.value.worker) == (job.id, name, worker)


def test_remote_frames_are_the_functions_own(client, name):
    """Each remote frame is rebuilt with the function's name, first line and parameters,
    so a traceback shows ``in add(a, b, *rest, scale)`` as for the same code failing here."""
    import inspect

    def inner(v):
        return 1 / v

    @Endpoint(name=name)
    def add(a, b, *rest, scale=1, **options):
        return inner(a - b)

    with pytest.raises(ZeroDivisionError) as ei:
        add(2, 2)
    frames = []
    tb = ei.value.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    *_, outer, last = frames
    assert last.tb_frame.f_code.co_qualname == inner.__qualname__
    assert last.tb_frame.f_code.co_firstlineno == inner.__code__.co_firstlineno
    assert last.tb_lineno == inner.__code__.co_firstlineno + 1
    assert outer.tb_frame.f_code.co_qualname == add.__qualname__
    assert outer.tb_frame.f_code.co_firstlineno == add._target.__code__.co_firstlineno
    spec = inspect.getargvalues(outer.tb_frame)
    assert (spec.args, spec.varargs, spec.keywords) == (["a", "b", "scale"], "rest", "options")
    assert inspect.formatargvalues(*spec, formatvalue=lambda v: "") == (
        "(a, b, scale, *rest, **options)"
    )


def test_a_remote_error_chains_nothing_of_ours(client, name, monkeypatch):
    """No ``RemoteTraceback`` the user did not raise: a remote error without frames (here
    the worker refusing the payload) is the error alone, with a note saying where."""
    import traceback

    @Endpoint(name=name)
    def f():
        return 1

    monkeypatch.setattr(wire, "PY_VERSION", "3.99")
    with pytest.raises(VersionMismatch) as ei:
        f()
    exc = ei.value
    assert exc.__cause__ is None
    shown = "".join(traceback.format_exception(exc))
    assert "RemoteTraceback" not in shown and "Remote traceback" not in shown, shown
    assert any(f"endpoint {name}" in n for n in exc.__notes__), exc.__notes__


def test_a_failed_map_item_is_named(client, name):
    import pickle

    @Endpoint(name=name)
    def check(x):
        if x == 3:
            raise ValueError(f"bad {x}")
        return x

    with pytest.raises(ValueError, match="bad 3") as ei:
        check.map(range(10))
    assert "(raised by item 3 of 10 in " in ei.value.__notes__[-1], ei.value.__notes__
    # The exception is still the user's own, and still pickles (notes and all).
    again = pickle.loads(pickle.dumps(ei.value))
    assert type(again) is ValueError and again.__notes__ == ei.value.__notes__

    @Endpoint(name=name + "-cls")
    class Checker:
        def check(self, x):
            if x == 1:
                raise KeyError(x)
            return x

    with pytest.raises(KeyError) as ei:
        Checker().check.map([0, 1, 2])
    assert "(raised by item 1 of 3 in Checker.check.map" in ei.value.__notes__[-1]

    gen = (i for i in range(3))
    with pytest.raises(SerializationError) as ei:
        check.map([1, 2, gen])
    assert "(raised by item 2 in " in ei.value.__notes__[-1], ei.value.__notes__


def test_a_remote_coroutine_fails_with_its_own_frames_only(client, name):
    """Not the frames of the worker's event loop running it."""
    import asyncio

    @Endpoint(name=name)
    async def refuse(x):
        raise ValueError(f"no {x}")

    with pytest.raises(ValueError, match="no 1") as ei:
        asyncio.run(refuse(1))
    assert [f["name"] for f in ei.value.remote_frames] == ["refuse"], ei.value.remote_frames

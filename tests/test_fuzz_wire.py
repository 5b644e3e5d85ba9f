"""hypothesis fuzzes the binary wire of a real control plane (docs/ARCHITECTURE.md, "Frame
layout"): bytes before the hello, hellos, garbage and truncated frames after it, absurd
lengths, unknown operations, bad pickles and malformed operations from a peer that holds the
token, operations naming a real endpoint with garbage for arguments.

Each connection gets error frames, replies or a closed connection: never a crash of the
control plane or of its worker (the same worker process answers a real call afterwards),
never a welcome without the token, and the control plane's resident memory stays within
``RSS_BOUND`` of what it was before (tests/test_wire_security.py has the targeted attacks).

CI runs ``FUZZ_EXAMPLES`` connections per test (default 60); a long run:
``FLASH_JUPYTER_FUZZ_EXAMPLES=5000 pytest -p no:cacheprovider tests/test_fuzz_wire.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flash_jupyter import protocol

FUZZ_EXAMPLES = int(os.environ.get("FLASH_JUPYTER_FUZZ_EXAMPLES", "60"))
RSS_BOUND = 64 << 20  # bytes the control plane may grow by over a whole fuzz run
ANSWER_LIMIT = 20.0  # seconds: a connection not answered and closed by then is a hang
HEAD = struct.Struct("<II")
LEN = struct.Struct("<Q")
ECHO = "wire-fuzz-echo"
CLIENT_OPS = ["deploy", "submit", "cancel", "status", "watch", "release"]
SERVER_OPS = {"error", "reply", "done", "need_fn", "unknown", "welcome", "out", "progress"}

fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _pid(**kw):
    import os

    return os.getpid()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Wire:
    """The control plane under test, what it was at the start, and ways to talk to it."""

    def __init__(self, srv):
        self.srv = srv
        self.pid = srv.info()["pid"]
        self.worker_pid = 0
        self.rss0 = 0

    def exchange(self, data: bytes) -> list[dict]:
        """Send ``data`` on a new connection, close our side, and read every frame the
        control plane answers until it closes: their metadata (a hang fails)."""
        s = socket.create_connection(("127.0.0.1", self.srv.wire_port), timeout=ANSWER_LIMIT)
        try:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                pass  # it closed on us mid-way: allowed
            got = b""
            while True:
                try:
                    chunk = s.recv(1 << 16)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    pytest.fail(f"no close within {ANSWER_LIMIT} s after {data[:200]!r}")
                if not chunk:
                    break
                got += chunk
        finally:
            s.close()
        return parse_frames(got)

    def check_alive(self) -> None:
        assert self.srv.proc.poll() is None, "the control plane died: " + self.srv.log()
        c = protocol.SyncConnection.open("127.0.0.1", self.srv.wire_port)
        try:
            c.send({"role": "client", "token": self.srv.token}, hello=True)
            assert c.recv()[0]["op"] == "welcome"
            c.send({"op": "status", "rid": 1, "id": "no-such-job"})
            assert c.recv()[0] == {"op": "reply", "rid": 1, "ok": False,
                                   "error": "no job 'no-such-job'"}  # fmt: skip
        finally:
            c.close()
        grown = rss(self.pid) - self.rss0
        assert grown < RSS_BOUND, f"the control plane grew by {grown >> 20} MiB"


def parse_frames(data: bytes) -> list[dict]:
    """The control plane's frames in ``data`` (it never sends a partial one, then closes)."""
    out, pos = [], 0
    while pos < len(data):
        mlen, nb = HEAD.unpack_from(data, pos)
        lens = [LEN.unpack_from(data, pos + HEAD.size + 8 * i)[0] for i in range(nb)]
        start = pos + HEAD.size + 8 * nb
        out.append(protocol.decode_meta(data[start : start + mlen]))
        pos = start + mlen + sum(lens)
        assert pos <= len(data), "a frame was cut short"
    for meta in out:
        assert meta.get("op") in SERVER_OPS, meta
    return out


@pytest.fixture(scope="module")
def wire(tmp_path_factory) -> Iterator[Wire]:
    """A control plane of its own with one endpoint whose worker is up: one worker slot, no
    spare, no package index."""
    from flash_jupyter import Endpoint
    from flash_jupyter import client as fj_client

    srv = make_server(
        tmp_path_factory.mktemp("wirefuzz"),
        FLASH_JUPYTER_MAX_WORKERS="1",
        FLASH_JUPYTER_SPARE_WORKERS="0",
        PIP_NO_INDEX="1",
        UV_OFFLINE="1",
    ).start()
    w = Wire(srv)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FLASH_JUPYTER_URL", srv.url)
            mp.setenv("FLASH_JUPYTER_TOKEN", srv.token)
            fj_client.reset_client()
            who = Endpoint(name=ECHO, cpu="cpu3c-1-2", workers=(0, 1), idle_timeout=900)(_pid)
            w.worker_pid = who()
            w.check_alive()
            w.rss0 = rss(w.pid)
            yield w
            # After everything: the same worker process still answers a real call.
            assert who() == w.worker_pid, "the worker was replaced during fuzzing"
            fj_client.reset_client()
    finally:
        srv.stop()


# ---------------------------------------------------------------- strategies

plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
    ),
    max_leaves=12,
)
u32 = st.sampled_from([0, 1, 7, 4096, 8192, 1 << 20, protocol.MAX_META, 2**31, 2**32 - 1])
u64 = st.sampled_from([0, 1, 100, 1 << 18, 1 << 30, 4 << 30, 2**63, 2**64 - 1]) | st.integers(
    0, 2**64 - 1
)


def frame(meta: bytes, bufs: list[bytes] = ()) -> bytes:
    return (
        HEAD.pack(len(meta), len(bufs))
        + b"".join(LEN.pack(len(b)) for b in bufs)
        + meta
        + (b"".join(bufs))
    )


def hello(w: Wire, **extra) -> bytes:
    return frame(json.dumps({"role": "client", "token": w.srv.token, **extra}).encode())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/flash-fuzz-pwned",))


meta_bytes = st.one_of(
    st.binary(max_size=300),  # garbage
    plain.map(lambda v: pickle.dumps(v, protocol=5)),  # plain data, maybe not a dict
    st.just(pickle.dumps({"op": "status", "x": Evil()})),  # a global: refused
    st.integers(1, 5000).map(lambda n: b"(" * n + b"t" * n + b"."),  # deep tuples
    st.integers(1, 200).map(lambda n: pickle.dumps({"op": "x", "d": [[]] * n})[: n % 30 + 2]),
)


@st.composite
def after_hello(draw) -> bytes:
    """One or more frames after a good hello, each well formed or not, maybe cut short."""
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["frame", "head", "garbage"]))
        if kind == "frame":
            bufs = draw(st.lists(st.binary(max_size=50), max_size=3))
            parts.append(frame(draw(meta_bytes), bufs))
        elif kind == "head":  # absurd declared lengths, little or nothing after them
            nb = draw(st.integers(0, 4))
            head = HEAD.pack(draw(u32), draw(u32) if draw(st.booleans()) else nb)
            parts.append(head + b"".join(LEN.pack(draw(u64)) for _ in range(nb)))
            parts.append(draw(st.binary(max_size=64)))
        else:
            parts.append(draw(st.binary(min_size=1, max_size=400)))
    data = b"".join(parts)
    cut = draw(st.integers(0, len(data)))
    return data[:cut] if draw(st.booleans()) else data


@st.composite
def operation(draw) -> dict:
    """A client operation with fields of the right names and any plain values: a known op
    (or not), often naming the real endpoint."""
    meta = {"op": draw(st.sampled_from(CLIENT_OPS) | st.text(max_size=10) | plain)}
    fields = {
        "rid": plain,
        "id": st.text(max_size=140) | plain,
        "ep": st.just(ECHO) | st.text(max_size=20) | plain,
        "refs": st.lists(st.integers(-2, 3) | plain, max_size=3) | plain,
        "fn": st.text(max_size=10) | plain,
        "fnrefs": st.lists(st.integers(0, 2), max_size=2) | plain,
        "fnc": st.sampled_from(["cloudpickle", "dill", "pickle", "?"]) | plain,
        "c": st.sampled_from(["cloudpickle", "dill", "?"]) | plain,
        "stamp": plain,
        "paths": st.lists(st.text(max_size=20), max_size=2) | plain,
        "affinity": plain,
        "progress": plain,
        "ids": st.lists(st.text(max_size=10), max_size=3) | plain,
        "config": st.fixed_dictionaries({"name": st.text(max_size=12)}) | plain,
        "changes": plain,
        "serves": st.sampled_from(["function", "class", "cells"]) | plain,
        "handler": plain,
    }
    for k in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=7)):
        meta[k] = draw(fields[k])
    return meta


# ---------------------------------------------------------------- tests


@fuzz
@given(data=st.binary(max_size=protocol.HELLO_MAX + 64))
def test_bytes_before_the_hello(wire, data):
    for meta in wire.exchange(data):
        assert meta["op"] == "error", meta  # never a welcome
    wire.check_alive()


@fuzz
@given(
    meta=st.dictionaries(
        st.sampled_from(["role", "token", "id", "incarnation", "nonce", "writer", "x"]),
        st.sampled_from(["client", "worker", "spare", "good-token"])
        | plain.filter(lambda v: not isinstance(v, bytes)),
        max_size=6,
    ),
    cut=st.integers(0, 64),
)
def test_hellos(wire, meta, cut):
    """A JSON hello with any fields: a welcome only with the right token as a client."""
    meta = {k: (wire.srv.token if v == "good-token" else v) for k, v in meta.items()}
    try:
        raw = json.dumps(meta).encode()
        whole = not 0 < cut < 8  # else its last bytes are cut off
    except (TypeError, ValueError):  # bytes somewhere: not JSON
        raw, whole = repr(meta).encode(), False
    raw = raw if whole else raw[: len(raw) - cut]
    answers = wire.exchange(frame(raw))
    good = meta.get("token") == wire.srv.token and meta.get("role") in (None, "client")
    for a in answers:
        if a["op"] == "welcome":
            assert good and whole, meta
        else:
            assert a["op"] == "error", a
    if good and whole:
        assert answers and answers[0]["op"] == "welcome", (meta, raw)
    wire.check_alive()


@fuzz
@given(data=after_hello())
def test_garbage_truncated_frames_and_absurd_lengths_after_the_hello(wire, data):
    answers = wire.exchange(hello(wire) + data)
    assert answers and answers[0]["op"] == "welcome"
    assert not os.path.exists("/tmp/flash-fuzz-pwned")
    wire.check_alive()


@fuzz
@given(
    ops=st.lists(operation(), min_size=1, max_size=4),
    bufs=st.lists(st.binary(max_size=40), max_size=3),
)
def test_operations_with_any_fields_get_an_answer(wire, ops, bufs):
    """Well-formed frames with any plain metadata: the connection stays, and a status
    request sent after them is answered (each bad one got an error, a reply or a done)."""
    data = hello(wire, writer="c-fuzz") + b"".join(
        frame(pickle.dumps(op, protocol=5), bufs) for op in ops
    )
    data += frame(pickle.dumps({"op": "status", "rid": "last", "id": "no-such-job"}))
    answers = wire.exchange(data)
    assert answers[0]["op"] == "welcome"
    last = [a for a in answers if a.get("rid") == "last" and a["op"] == "reply"]
    assert last, f"no answer to the status after {ops!r}: {answers!r}"
    wire.check_alive()


@st.composite
def real_submit(draw) -> tuple[dict, list[bytes]]:
    """A submit that passes the control plane's checks and reaches the worker, carrying
    garbage where the worker expects a function and its arguments."""
    bufs = draw(st.lists(st.binary(max_size=60) | plain.map(pickle.dumps), min_size=1, max_size=3))
    meta = {
        "op": "submit",
        "id": "fz-" + draw(st.uuids()).hex,
        "ep": ECHO,
        "refs": draw(st.lists(st.integers(0, len(bufs) - 1), max_size=3)),
        "c": draw(st.sampled_from(["cloudpickle", "dill", "pickle", "json", "?"])),
        "stamp": draw(plain),
        "fnrefs": draw(st.lists(st.integers(0, len(bufs) - 1), max_size=2)),
        "fnc": draw(st.sampled_from(["cloudpickle", "dill", "?"])),
    }
    if draw(st.booleans()):
        meta["fn"] = "fz-" + draw(st.uuids()).hex
    return meta, bufs


@settings(max_examples=max(5, FUZZ_EXAMPLES // 4), deadline=None, database=None,
          suppress_health_check=list(HealthCheck))  # fmt: skip
@given(sub=real_submit())
def test_garbage_jobs_fail_on_the_worker_which_serves_on(wire, sub):
    """Jobs whose function and arguments are garbage reach the worker and end (FAILED, or
    COMPLETED if the garbage happened to be callable), with an answer; the worker lives
    (the module's fixture calls it at the end and checks it is the same process)."""
    meta, bufs = sub
    c = protocol.SyncConnection.open("127.0.0.1", wire.srv.wire_port, timeout=ANSWER_LIMIT)
    try:
        c.sock.settimeout(ANSWER_LIMIT)
        c.send({"role": "client", "token": wire.srv.token, "writer": "c-fuzz2"}, hello=True)
        assert c.recv()[0]["op"] == "welcome"
        c.send(meta, bufs)
        while True:
            try:
                got, _ = c.recv()
            except TimeoutError:
                pytest.fail(f"no answer within {ANSWER_LIMIT} s to {meta!r}")
            if got.get("id") == meta["id"] and got["op"] == "done":
                assert got["status"] in ("FAILED", "COMPLETED"), got
                break
    finally:
        c.close()
    wire.check_alive()


@pytest.mark.parametrize("stamp", [["3.11"], "3.11", {"py": 3}], ids=["list", "str", "int"])
def test_a_submit_with_a_malformed_stamp_is_refused_at_the_door(wire, stamp):
    """Found by fuzzing: a stamp that is not {str: str} reached the worker, which failed the
    job with "AttributeError: 'list' object has no attribute 'get'"."""
    c = protocol.SyncConnection.open("127.0.0.1", wire.srv.wire_port)
    try:
        c.send({"role": "client", "token": wire.srv.token}, hello=True)
        assert c.recv()[0]["op"] == "welcome"
        jid = f"stamp-{type(stamp).__name__}"
        c.send({"op": "submit", "id": jid, "ep": ECHO, "refs": [], "stamp": stamp})
        got, _ = c.recv()
    finally:
        c.close()
    assert got["op"] == "done" and got["id"] == jid and got["status"] == "FAILED", got
    assert got["error"]["type"] == "SubmitError", got
    assert "version stamp" in got["error"]["message"], got


@pytest.mark.parametrize("cred", ["derived-from-a-wrong-token", "the-token", "none"])
def test_a_worker_cannot_join_without_its_credential(wire, cred):
    """A worker's hello must carry the HMAC of the token for that worker id and incarnation:
    one derived from another token, the token itself, or none at all is refused (401) and
    the connection closed."""
    from flash_jupyter import credentials

    wid, inc = "intruder-1", 1
    given = {
        "derived-from-a-wrong-token": credentials.worker_credential("wrong", wid, inc),
        "the-token": wire.srv.token,
        "none": None,
    }[cred]
    hello = {"role": "worker", "id": wid, "incarnation": inc, "token": given, "pid": 1}
    answers = wire.exchange(frame(json.dumps(hello).encode()))
    assert [a["op"] for a in answers] == ["error"] and answers[0]["status"] == 401, answers
    wire.check_alive()


def test_the_control_plane_and_its_worker_survived(wire):
    """Last: after every connection above (the fixture then calls the same worker)."""
    wire.check_alive()
    grown = rss(wire.pid) - wire.rss0
    print(f"control plane RSS: {wire.rss0 >> 20} MiB before, grown by {grown / 2**20:.1f} MiB")

"""Attacks on the wire port of a real control plane: what a peer without the token (or with
only a worker's credential) can make it do. Each test is a defect found by attacking it."""

from __future__ import annotations

import json
import pickle
import socket
import struct
from pathlib import Path

import pytest
from conftest import wait_for

from flash_jupyter import Endpoint, protocol

HEAD = struct.Struct("<II")


class Exec:
    """A pickle that runs code when loaded: creates ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def raw_frame(meta_bytes: bytes, bufs: list[bytes] = ()) -> bytes:
    head = HEAD.pack(len(meta_bytes), len(bufs)) + b"".join(struct.pack("<Q", len(b)) for b in bufs)
    return head + meta_bytes + b"".join(bufs)


def hello_bytes(meta: dict) -> bytes:
    return raw_frame(json.dumps(meta).encode())


def evil_frame(marker: Path) -> bytes:
    return raw_frame(pickle.dumps({"op": "submit", "x": Exec(marker)}, protocol=5))


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.wire_port), timeout=30)
    return s


def read_until_closed(s: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    s.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def authed_roundtrip(server) -> dict:
    """A client with the token asks something: the server is alive and answers."""
    c = protocol.SyncConnection.open("127.0.0.1", server.wire_port)
    try:
        c.send({"role": "client", "token": server.token}, hello=True)
        meta, _ = c.recv()
        assert meta["op"] == "welcome", meta
        c.send({"op": "status", "rid": 1, "id": "no-such-job"})
        meta, _ = c.recv()
        return meta
    finally:
        c.close()


@pytest.mark.parametrize("hello", [{"role": "client", "token": "wrong"}, {"role": "client"}])
def test_frames_after_a_refused_hello_are_never_unpickled(server, tmp_path, hello):
    marker = tmp_path / "pwned"
    s = connect(server)
    s.sendall(hello_bytes(hello) + evil_frame(marker) + evil_frame(marker))
    answer = read_until_closed(s)
    s.close()
    assert b"401" in answer
    assert authed_roundtrip(server)["ok"] is False
    assert not marker.exists(), "code ran in the control plane without the token"


def test_a_pickle_as_first_frame_is_refused_unread(server, tmp_path):
    marker = tmp_path / "pwned"
    s = connect(server)
    s.sendall(evil_frame(marker))
    read_until_closed(s)
    s.close()
    authed_roundtrip(server)
    assert not marker.exists()


def test_metadata_never_unpickles_objects_even_with_the_token(server, tmp_path):
    # With the token a peer may run code on workers, but never inside the control plane:
    # frame metadata is plain data, and anything else is refused.
    marker = tmp_path / "pwned"
    s = connect(server)
    s.sendall(hello_bytes({"role": "client", "token": server.token}) + evil_frame(marker))
    read_until_closed(s)
    s.close()
    authed_roundtrip(server)
    assert not marker.exists()


@pytest.mark.parametrize(
    "head",
    [
        HEAD.pack(protocol.MAX_META, 0),  # a huge hello
        HEAD.pack(100, 1) + struct.pack("<Q", 256 << 20),  # a hello with a 256 MiB buffer
        HEAD.pack(100, 0xFFFFFFFF),  # 4 billion buffer lengths
    ],
    ids=["meta", "buffer", "nbufs"],
)
def test_a_big_hello_is_refused_before_any_allocation(own_server, head):
    srv = own_server()
    pid = srv.info()["pid"]
    before = rss_kb(pid)
    socks = []
    for _ in range(8):
        s = connect(srv)
        s.sendall(head + b"{")
        socks.append(s)
    for s in socks:  # closed at once, not kept waiting for the rest
        read_until_closed(s, timeout=10)
        s.close()
    authed_roundtrip(srv)
    assert rss_kb(pid) - before < 32 << 10, "declared lengths were allocated before the hello"


def test_a_silent_connection_is_closed(own_server):
    srv = own_server(FLASH_JUPYTER_HELLO_TIMEOUT="0.5")
    s = connect(srv)
    assert read_until_closed(s, timeout=20) == b""
    s.close()


def test_frames_over_the_limit_close_the_connection(own_server):
    srv = own_server(FLASH_JUPYTER_MAX_FRAME_BYTES=str(8 << 20))
    s = connect(srv)
    s.sendall(hello_bytes({"role": "client", "token": srv.token}))
    s.sendall(HEAD.pack(10, 1) + struct.pack("<Q", 16 << 20))  # one 16 MiB buffer
    answer = read_until_closed(s, timeout=20)
    s.close()
    assert b"too large" in answer
    authed_roundtrip(srv)


def _peek_worker_env() -> dict:
    import os

    env = open("/proc/self/environ", "rb").read().split(b"\0")
    return {
        "environ": [e.decode(errors="replace") for e in env],
        "os_environ": dict(os.environ),
    }


def test_workers_hold_no_full_access_token(client, server, name):
    peek = Endpoint(name=name, cpu="cpu3c-1-2")(_peek_worker_env)
    got = peek()
    text = "\n".join(got["environ"]) + json.dumps(got["os_environ"])
    assert server.token not in text


def _try_credentials(wire_port: int, url: str) -> dict:
    """On a worker: whatever credential this process can find, try it as a client, over
    HTTP, and as this very worker a second time."""
    import json
    import os
    import urllib.error
    import urllib.request

    from flash_jupyter import protocol

    env = dict(e.split("=", 1) for e in open("/proc/self/environ").read().split("\0") if "=" in e)
    cred = env.get("FLASH_JUPYTER_WORKER_TOKEN", "")
    spec = json.loads(env.get("FLASH_JUPYTER_WORKER", "{}"))
    out: dict = {"found": bool(cred)}

    def hello(meta):
        c = protocol.SyncConnection.open("127.0.0.1", wire_port)
        try:
            c.send(meta, hello=True)
            try:
                m, _ = c.recv()
            except ConnectionError:
                return "closed"
            return m.get("op")
        finally:
            c.close()

    out["as_client"] = hello({"role": "client", "token": cred})
    out["as_self_again"] = hello(
        {
            "role": "worker",
            "token": cred,
            "id": spec.get("id"),
            "incarnation": spec.get("incarnation"),
        }
    )
    req = urllib.request.Request(url + "/v1/endpoints", headers={"Authorization": f"Bearer {cred}"})
    try:
        urllib.request.urlopen(req, timeout=10)
        out["http"] = 200
    except urllib.error.HTTPError as e:
        out["http"] = e.code
    out["pid"] = os.getpid()
    return out


def test_a_worker_credential_acts_only_as_that_worker(client, server, name):
    # Fresh process (no spare adoption): its credential comes through the environment.
    f = Endpoint(name=name, cpu="cpu3c-1-2", env={"PYTHONFLASHTEST": "1"})(_try_credentials)
    got = f(server.wire_port, server.url)
    assert got["found"]
    assert got["as_client"] in ("error", "closed")
    assert got["as_self_again"] in ("error", "exit", "closed")
    assert got["http"] == 401
    # The worker itself still works.
    assert f(server.wire_port, server.url)["pid"] == got["pid"]


def test_release_of_a_path_outside_the_spool_removes_nothing(server, tmp_path):
    victim = tmp_path / "w-victim" / "precious"
    victim.parent.mkdir()
    victim.write_text("keep me")
    c = protocol.SyncConnection.open("127.0.0.1", server.wire_port)
    try:
        c.send({"role": "client", "token": server.token}, hello=True)
        c.recv()
        c.send({"op": "release", "paths": [str(victim), "../../" + str(victim)]})
        c.send({"op": "status", "rid": 1, "id": "x"})
        c.recv()
    finally:
        c.close()
    authed_roundtrip(server)
    assert victim.read_text() == "keep me"


def test_spool_refs_outside_the_writers_folder_are_refused(client, server, name, tmp_path):
    # A submit whose argument claims to be a spool file elsewhere: refused at the door, and
    # the file is neither read by a worker nor removed after the job.
    victim = tmp_path / "secret"
    victim.write_text("not yours")
    Endpoint(name=name, cpu="cpu3c-1-2")(lambda x: x).deploy()
    c = protocol.SyncConnection.open("127.0.0.1", server.wire_port)
    try:
        c.send({"role": "client", "token": server.token, "writer": "c-test1"}, hello=True)
        c.recv()
        c.send({"op": "submit", "id": "j-" + name, "ep": name, "refs": [["shm", str(victim), 9]]})
        meta, _ = c.recv()
    finally:
        c.close()
    assert meta["op"] == "done" and meta["status"] == "FAILED", meta
    assert "spool" in meta["error"]["message"]
    authed_roundtrip(server)
    assert victim.read_text() == "not yours"


def test_a_large_frame_is_released_when_its_connection_ends(own_server):
    srv = own_server()
    pid = srv.info()["pid"]
    authed_roundtrip(srv)
    before = rss_kb(pid)
    s = connect(srv)
    s.sendall(hello_bytes({"role": "client", "token": srv.token}))
    meta = pickle.dumps({"op": "x"})
    s.sendall(HEAD.pack(len(meta), 1) + struct.pack("<Q", 256 << 20) + meta)
    chunk = b"\1" * (1 << 20)
    for _ in range(160):  # 160 of the 256 MiB declared, then the peer goes away
        s.sendall(chunk)
    authed_roundtrip(srv)
    assert rss_kb(pid) - before > 100 << 10, "the partial frame should be in memory now"
    s.close()
    wait_for(lambda: rss_kb(pid) - before < 32 << 10, what="the partial frame to be freed")


def test_a_call_over_the_frame_limit_fails_before_sending(own_server, monkeypatch, name):
    from conftest import use_server

    from flash_jupyter import errors

    srv = own_server(FLASH_JUPYTER_MAX_FRAME_BYTES=str(1 << 20))
    use_server(srv, monkeypatch)
    echo = Endpoint(name=name, cpu="cpu3c-1-2")(lambda s: len(s))
    assert echo("x" * 1000) == 1000
    with pytest.raises(errors.SerializationError, match="FLASH_JUPYTER_MAX_FRAME_BYTES"):
        echo("x" * (2 << 20))
    assert echo("y") == 1  # the connection is fine


@pytest.mark.parametrize(
    "bad",
    [{"affinity": "w"}, {"affinity": {"worker": 1}}, {"id": ["x"]}, {"paths": "/"}],
    ids=["affinity-str", "affinity-shape", "id-list", "paths-str"],
)
def test_a_malformed_submit_is_refused_and_the_endpoint_serves_on(client, server, name, bad):
    f = Endpoint(name=name, cpu="cpu3c-1-2")(lambda x: x * 2)
    f.deploy()
    c = protocol.SyncConnection.open("127.0.0.1", server.wire_port)
    try:
        c.send({"role": "client", "token": server.token}, hello=True)
        c.recv()
        c.send({"op": "submit", "id": "j-" + name, "ep": name, "refs": [], **bad, "rid": 7})
        meta, _ = c.recv()
    finally:
        c.close()
    assert meta.get("ok") is False or meta.get("status") == "FAILED", meta
    assert f(21) == 42

"""The wire framing, byte by byte: frames split anywhere, large buffers, bad input."""

from __future__ import annotations

import asyncio
import random
import socket
import threading

import numpy as np
import pytest

from flash_jupyter import protocol, wire
from flash_jupyter.server.frames import FrameProtocol


def _serve_once(frames_in: list, sender, accept: bool = True) -> list:
    """Run a FrameProtocol server; `sender(sock)` writes to it; return the frames parsed.
    The first frame is accepted as a good hello unless ``accept`` is false."""
    got: list = []

    async def main():
        done = asyncio.Event()
        closed = asyncio.Event()

        def make():
            def on_frame(meta, bufs):
                if not got and accept:
                    proto.accept()  # the hello: as the server does after checking the token
                got.append((meta, [bytes(b) for b in bufs]))
                if len(got) == len(frames_in):
                    done.set()

            proto = FrameProtocol(on_frame, closed.set)
            return proto

        loop = asyncio.get_running_loop()
        server = await loop.create_server(make, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        t = threading.Thread(target=sender, args=(port,))
        t.start()
        await asyncio.wait_for(done.wait() if frames_in and accept else closed.wait(), 20)
        t.join()
        server.close()

    asyncio.run(main())
    return got


def test_frames_survive_any_split():
    rng = random.Random(7)
    frames = [
        ({"op": "hello", "token": "t"}, []),
        ({"op": "a", "n": 1}, [b"x" * 10, b""]),
        ({"op": "b"}, [bytes(rng.randrange(256) for _ in range(5000))]),
        ({"op": "big"}, [b"y" * (3 << 20)]),  # larger than the parser's small buffer
        ({"op": "c", "list": [1, 2, 3]}, []),
    ]
    raw = b"".join(
        b"".join(bytes(memoryview(p).cast("B")) for p in protocol.encode(m, b, hello=(i == 0)))
        for i, (m, b) in enumerate(frames)
    )

    def sender(port):
        s = socket.create_connection(("127.0.0.1", port))
        pos = 0
        while pos < len(raw):
            n = rng.choice([1, 2, 7, 100, 4096, 70000, 1 << 20])
            s.sendall(raw[pos : pos + n])
            pos += n
        s.close()

    got = _serve_once(frames, sender)
    assert [m for m, _ in got] == [m for m, _ in frames]
    assert [b for _, b in got] == [[bytes(x) for x in b] for _, b in frames]


def test_sync_connection_round_trip_with_large_buffer():
    a, b = socket.socketpair()
    ca, cb = protocol.SyncConnection(a), protocol.SyncConnection(b)
    arr = np.arange(2_000_000, dtype=np.int64)
    payload = wire.dumps(arr)
    assert payload.buffers, "a 16 MB array must travel out-of-band"
    t = threading.Thread(target=ca.send, args=({"op": "x"}, [payload.data, *payload.buffers]))
    t.start()
    meta, bufs = cb.recv()
    t.join()
    assert meta == {"op": "x"}
    back = wire.loads(bufs[0], bufs[1:])
    assert np.array_equal(back, arr)
    ca.close()
    cb.close()


def test_garbage_closes_the_connection_not_the_server():
    def sender(port):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"\xff" * 64)  # claims an absurd metadata length
        try:
            s.recv(1)
        except OSError:
            pass
        s.close()

    assert _serve_once([], sender) == []


def test_first_frame_is_json_not_pickle():
    # A pickle in the hello frame must not be unpickled (it could run code).
    evil = protocol.encode({"op": "x"}, [])  # pickled metadata
    with pytest.raises(ValueError):
        protocol.decode_meta(bytes(evil[1]), hello=True)


def test_nothing_after_an_unaccepted_hello_is_parsed():
    frames = [({"role": "client", "token": "bad"}, []), ({"op": "a"}, [b"x"])]
    raw = b"".join(
        b"".join(bytes(memoryview(p).cast("B")) for p in protocol.encode(m, b, hello=(i == 0)))
        for i, (m, b) in enumerate(frames)
    )

    def sender(port):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        try:
            s.recv(1)
        except OSError:
            pass
        s.close()

    got = _serve_once(frames, sender, accept=False)
    assert [m for m, _ in got] == [frames[0][0]]


def test_metadata_is_plain_data_only():
    import pickle

    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    for evil in (pickle.dumps({"x": Boom()}), pickle.dumps([1])):
        with pytest.raises((pickle.UnpicklingError, ValueError)):
            protocol.decode_meta(evil)
    plain = {"op": "x", "refs": [0, ("shm", "/p", 3)], "b": b"\0", "f": 1.5, "n": None}
    assert protocol.decode_meta(pickle.dumps(plain, protocol=5)) == plain
    # {"x": [[[...]]]} 2,000 levels deep, in 4 KiB (pushes 2,000 lists, then appends each
    # to the one below): harmless to load, but it would break any recursive walk later.
    n = 2000
    deep = b"\x80\x05}\x8c\x01x" + b"]" * n + b"a" * (n - 1) + b"s."
    with pytest.raises(ValueError, match="deeper"):
        protocol.decode_meta(deep)

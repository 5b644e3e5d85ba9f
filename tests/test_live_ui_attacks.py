"""The live UI attacked: the Jupyter server extension (``flash_jupyter.labserver``), the
control plane's warm, budget and ``changes`` routes, the spending guard and the kernel's
event feed, probed as an attacker and as a careless user would.

Every server here is real: the session's control plane (or a test's own), ``jupyter server``
subprocesses with the package's own config file, real worker processes. Where the attack is
a hostile or garbled control plane, a small HTTP server in the test plays it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from conftest import Server, free_port, make_server, use_server, wait_for
from jupyter_app import JupyterApp, start_jupyter

pytest.importorskip("jupyter_server")
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

import flash_jupyter
from flash_jupyter import Endpoint
from flash_jupyter.event_feed import MAX_EVENT_BYTES, EventFeed, LineSplitter
from flash_jupyter.labserver.handlers import MAX_BODY

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jupyter-config" / "server-config" / "flash_jupyter.json"
API = "/flash-jupyter/api"
TINY = 0.00001  # a worker's first billed second costs more than this


def start_lab(tmp: Path, env: dict[str, str]) -> JupyterApp:
    """``jupyter server`` with the package's config file as its only Jupyter config."""
    server_d = tmp / "config" / "jupyter_server_config.d"
    server_d.mkdir(parents=True)
    shutil.copy(CONFIG, server_d / "flash_jupyter.json")
    return start_jupyter("jupyter_server", tmp, env=env)


def call(app: JupyterApp, method: str, path: str, **kw) -> httpx.Response:
    headers = {"Authorization": f"token {app.token}", **kw.pop("headers", {})}
    return httpx.request(method, app.url + API + path, headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def lab(server, tmp_path_factory) -> Iterator[JupyterApp]:
    """A Jupyter server relaying the session's control plane; at the end, its log must not
    hold the control plane's token."""
    tmp = tmp_path_factory.mktemp("attack-lab")
    app = start_lab(tmp, {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token})
    yield app
    app.stop()
    assert server.token not in app.log_path.read_text(errors="replace")


@pytest.fixture
def cp(server, name) -> Iterator[httpx.Client]:
    with server.http() as h:
        yield h
        h.delete(f"/v1/endpoints/{name}")


class Socket:
    """A tornado WebSocket client of ``/events`` on its own loop."""

    def __init__(self, app: JupyterApp, headers: dict | None = None, token: bool = True):
        self.loop = asyncio.new_event_loop()
        q = f"?token={app.token}" if token else ""
        request = HTTPRequest(f"ws://127.0.0.1:{app.port}{API}/events{q}", headers=headers)

        async def connect():  # made inside the loop: tornado binds it to the running one
            return await websocket_connect(request)

        self.conn = self.loop.run_until_complete(connect())
        self.raw: list[str] = []

    def until(self, pred: Callable[[dict], bool], timeout: float = 30) -> dict:
        async def read() -> dict:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    text = await asyncio.wait_for(self.conn.read_message(), 1)
                except asyncio.TimeoutError:
                    continue
                assert text is not None, f"the socket closed; got {self.raw}"
                self.raw.append(text)
                if pred(json.loads(text)):
                    return json.loads(text)
            raise AssertionError(f"timed out; got {[r[:200] for r in self.raw]}")

        return self.loop.run_until_complete(read())

    def read_in_background(self) -> None:
        """Keep reading (into ``raw``) on a thread until closed: a browser that keeps up."""

        async def read_all() -> None:
            while (text := await self.conn.read_message()) is not None:
                self.raw.append(text)

        self._reader = threading.Thread(target=self.loop.run_until_complete, args=(read_all(),))
        self._reader.start()

    def close(self) -> None:
        reader = getattr(self, "_reader", None)
        if reader is not None:
            self.loop.call_soon_threadsafe(self.conn.close)
            reader.join(30)
        else:

            async def close() -> None:
                self.conn.close()

            self.loop.run_until_complete(close())
        self.loop.close()


def running(flag: bool) -> Callable[[dict], bool]:
    return lambda m: m.get("type") == "control_plane" and m.get("running") is flag


def is_snapshot(m: dict) -> bool:
    return m.get("type") == "snapshot"


def refused(app: JupyterApp, headers: dict, token: bool) -> int | None:
    """The HTTP status a WebSocket upgrade is refused with (None: it opened)."""
    try:
        Socket(app, headers, token).close()
    except HTTPClientError as e:
        return e.code
    return None


# ------------------------------------------------------------------ Jupyter's own checks


def test_jupyters_checks_hold_cookie_without_xsrf_cross_origin_and_foreign_host(lab):
    """Held: Jupyter's own checks guard every route. A login cookie alone cannot POST (no
    XSRF token), a page of another origin cannot use the cookie (HTTP or WebSocket), a
    foreign Host header (DNS rebinding) is refused, and nothing opens without auth."""
    with httpx.Client() as browser:
        browser.get(f"{lab.url}/api/status?token={lab.token}")  # sets the login cookie
        cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
        assert cookie
    url = lab.url + API + "/endpoints/nobody-here/stop"
    r = httpx.post(url, headers={"Cookie": cookie})
    assert r.status_code == 403 and "_xsrf" in r.text
    with_xsrf = {"Cookie": f"{cookie}; _xsrf=abc", "X-XSRFToken": "abc"}
    r = httpx.post(url, headers=with_xsrf)  # the control: the same request with XSRF passes
    assert r.status_code == 404 and "no endpoint named" in r.json()["error"]
    r = httpx.post(url, headers={**with_xsrf, "Origin": "http://evil.example"})
    assert r.status_code in (403, 404) and "no endpoint named" not in r.text
    r = httpx.get(lab.url + API + "/status", headers={"Host": "evil.example"})
    assert r.status_code == 403
    for method, path in [("GET", "/status"), ("PUT", "/budget"), ("POST", "/prewarm")]:
        assert httpx.request(method, lab.url + API + path).status_code in (401, 403)

    same_origin = {"Cookie": cookie, "Origin": f"http://127.0.0.1:{lab.port}"}
    assert refused(lab, same_origin, token=False) is None  # the control
    assert refused(lab, {**same_origin, "Origin": "http://evil.example"}, token=False) == 403
    assert refused(lab, {}, token=False) == 403


# ------------------------------------------------------------------ inputs


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/endpoints/%2e%2e"),
        ("DELETE", "/endpoints/..%2Fbudget"),
        ("POST", "/endpoints/..%2F..%2Fv1%2Fbudget/warm"),
        ("POST", "/endpoints/x%2F..%2F..%2Fbudget/stop"),
        ("POST", "/endpoints/%2e%2e/purge"),
        ("GET", "/endpoints/" + "a" * 65),
        ("GET", "/endpoints/a%00b"),
        ("GET", "/endpoints/a%20b"),
    ],
)
def test_odd_names_never_reach_another_route(lab, server, method, path):
    """Held: a name is checked (after URL decoding) before anything is relayed, so no name
    turns a relayed call into another control-plane route."""
    with server.http() as api:
        before = api.get("/v1/budget").json()["limit"]
        r = call(lab, method, path, json={} if method == "POST" else None)
        assert r.status_code == 400, r.text
        assert "is not valid" in r.json()["error"]
        assert api.get("/v1/budget").json()["limit"] == before


def test_bodies_are_bounded_and_deep_json_is_a_400(lab):
    """Found and fixed: the extension read any body Jupyter accepts (512 MiB) and parsed it
    on the server's loop; JSON nested deeper than Python's recursion limit was a bare 500.
    Now a body past MAX_BODY is a 413 (declared, or counted as a chunked body streams in),
    and deep nesting is a 400."""
    big = json.dumps({"line": "%%flash " + "x" * (MAX_BODY + 1000)}).encode()
    r = call(lab, "POST", "/prewarm", content=big)
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["error"] and str(MAX_BODY) in r.json()["error"]

    def chunks():
        for _ in range(3):
            yield b" " * (MAX_BODY // 2)

    r = call(lab, "PUT", "/budget", content=chunks())  # no Content-Length: chunked
    assert r.status_code == 413, r.text

    deep = b"[" * 20_000 + b"]" * 20_000
    assert len(deep) <= MAX_BODY
    for path, method in [("/budget", "PUT"), ("/prewarm", "POST")]:
        r = call(lab, method, path, content=deep)
        assert r.status_code == 400, r.text
        assert "nested too deeply" in r.json()["error"]
    assert call(lab, "GET", "/status").json()["running"] is True


def test_a_limit_too_big_for_a_float_is_a_400_everywhere(lab, server):
    """Found and fixed: a whole-number limit of 400 digits (valid JSON) overflowed
    float(): a 500 from the extension and a plain-text 500 from the control plane."""
    body = b'{"limit": ' + b"9" * 400 + b"}"
    r = call(lab, "PUT", "/budget", content=body)
    assert r.status_code == 400, r.text
    assert '"limit" must be an amount' in r.json()["error"]
    assert len(r.json()["error"]) < 200  # the number is not echoed whole
    with server.http() as api:
        r = api.put("/v1/budget", content=body)
        assert r.status_code == 400, r.text
        assert "finite number of US dollars" in r.json()["error"]
        assert len(r.json()["error"]) < 200
        assert api.get("/v1/budget").json()["limit"] is None


@pytest.mark.parametrize(
    "line, words",
    [
        ("%%flash name={n} gpu=NOPE", "unknown GPU type"),
        ("%%flash name={n} workers=0,999", "workers max must be at most"),
        ("%%flash name={n} idle_timeout=nan", "idle_timeout"),
        ("%%flash name={n} --bogus", "unrecognized arguments"),
        ("%%flash name=../{n}", "is not valid"),
        ("%%flash name={n}/../x", "is not valid"),
        ('%%flash name={n} "unclosed', "No closing quotation"),
        ("%%flash name={n} gpu=NOPE\nprint(1)", "unknown GPU type"),
        ("%%flash name={n}\rgpu=NOPE", "unknown GPU type"),
        ("%%flash name={n} " + "env=A=1 " * 9000, "request body too large"),
    ],
)
def test_bad_prewarm_lines_deploy_nothing(lab, server, line, words):
    """Held, and the huge line found and fixed (bounded): a line the magic would refuse
    is a 400 (a too long one a 413) and no endpoint appears."""
    name = f"prewarm-{secrets.token_hex(4)}"
    r = call(lab, "POST", "/prewarm", json={"line": line.format(n=name)})
    assert r.status_code in (400, 413), r.text
    assert words in r.json()["error"]
    with server.http() as api:
        assert api.get(f"/v1/endpoints/{name}").status_code == 404


def test_only_the_first_line_of_a_prewarm_counts(lab, cp, name):
    """Held: what follows the first line (another %%flash line) is never read."""
    line = f"%%flash name={name} workers=0,1\n%%flash name={name} workers=5,5"
    r = call(lab, "POST", "/prewarm", json={"line": line})
    assert r.status_code == 200, r.text
    view = cp.get(f"/v1/endpoints/{name}").json()
    assert (view["config"]["workers_min"], view["config"]["workers_max"]) == (0, 1)


# ------------------------------------------------------------------ the events socket


class RawSocket:
    """A WebSocket client that reads only when told to, with a small receive buffer: a
    browser tab that stopped reading (asleep, hung, on a slow link)."""

    def __init__(self, app: JupyterApp):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", app.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {API}/events?token={app.token} HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def _need(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def message(self) -> str:
        """The next text message (server frames are not masked; no fragments are sent)."""
        b0, b1 = self._need(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(self._need(2), "big")
        elif n == 127:
            n = int.from_bytes(self._need(8), "big")
        payload = self._need(n)
        return payload.decode() if b0 & 0x0F == 1 else ""

    def closed_within(self, timeout: float) -> bool:
        """Read (and throw away) until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(1 << 20):
                    return True
            except TimeoutError:
                continue
            except ConnectionError:
                return True
        return False


def test_a_socket_that_never_reads_is_dropped(lab, server, cp, name, monkeypatch):
    """Found and fixed: events for a socket whose browser stopped reading piled up in the
    Jupyter server's memory without bound. Now the socket is closed once MAX_UNSENT waits
    for it (the control: a socket that reads keeps working)."""
    use_server(server, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def chatty(n: int) -> int:
        for _ in range(n):
            print("x" * 1_000_000, flush=True)
        return n

    chatty.deploy()
    stalled = RawSocket(lab)
    while '"snapshot"' not in stalled.message():
        pass  # it is live; from now on it reads nothing
    reader = Socket(lab)
    try:
        reader.until(is_snapshot)
        reader.read_in_background()
        r = cp.post(f"/v2/{name}/runsync", json={"input": {"n": 40}}, timeout=120)
        assert r.json()["status"] == "COMPLETED", r.text
        # Once the reader has every event, the relay has offered each one to the stalled
        # socket too (far more than the socket buffers and MAX_UNSENT hold).
        done = f'"id": "{r.json()["id"]}", "status": "COMPLETED"'
        wait_for(lambda: any(done in t for t in reader.raw), what="the reader to see the job end")
        outputs = [json.loads(t) for t in reader.raw if '"type": "output"' in t and name in t]
        # Forty 1 MB lines (a line may come in more than one output event).
        assert sum(ev["text"].count("\n") for ev in outputs) == 40
        assert stalled.closed_within(60), "the server kept the stalled socket open"
        again = Socket(lab)
        again.until(is_snapshot)
        again.close()
    finally:
        reader.close()
        stalled.sock.close()


def test_many_sockets_opening_and_closing(lab):
    """Held: sockets opened and closed at once (some before their snapshot) leave the
    relay working; the next socket gets its snapshot."""
    for _ in range(5):
        socks = [Socket(lab) for _ in range(8)]
        for s in socks[::2]:
            s.close()
        socks[1].until(is_snapshot)
        for s in socks[1::2]:
            s.close()
    last = Socket(lab)
    try:
        last.until(running(True))
        last.until(is_snapshot)
    finally:
        last.close()
    assert call(lab, "GET", "/status").json()["running"] is True


def test_the_control_plane_going_away_mid_stream(tmp_path):
    """Held: a socket hears the control plane go (running: false, with what to do) and
    come back on the same address (running: true and a fresh snapshot); no message
    carries the token."""
    cp = make_server(tmp_path / "cp").start()
    app = start_lab(tmp_path / "lab", {"FLASH_JUPYTER_URL": cp.url,
                                       "FLASH_JUPYTER_TOKEN": cp.token})  # fmt: skip
    sock = None
    try:
        sock = Socket(app)
        sock.until(is_snapshot)
        cp.stop()
        sock.until(running(False))  # the stream is lost; then a retry says what to do
        sock.until(lambda m: running(False)(m) and "start it there" in m["message"])
        assert call(app, "GET", "/endpoints").status_code == 503
        cp = Server(cp.data_dir, cp.token, cp.port, cp.wire_port).start()
        sock.until(running(True), timeout=60)
        sock.until(is_snapshot)
        assert all(cp.token not in text for text in sock.raw)
    finally:
        if sock is not None:
            sock.close()
        app.stop()
        cp.stop()
    assert cp.token not in app.log_path.read_text(errors="replace")


# ------------------------------------------------------------------ the token


def test_a_token_with_a_stray_carriage_return_never_leaks(tmp_path, server, monkeypatch):
    """Found and fixed: FLASH_JUPYTER_TOKEN ending in "\\r" (a CRLF .env file) made
    urllib and h11 raise "Invalid header value b'Bearer <token>\\r'". The extension let it
    escape (a 500, the token in its log); the kernel's feed showed it in its message (a
    dashboard's output, saved in the notebook). Now both say what is wrong, without it."""
    token = server.token + "\r"
    app = start_lab(tmp_path, {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": token})
    seen = []
    try:
        r = call(app, "GET", "/status")
        seen.append(r.text)
        assert r.status_code == 200 and r.json()["running"] is False, r.text
        assert "FLASH_JUPYTER_TOKEN" in r.json()["message"]
        r = call(app, "GET", "/endpoints")
        seen.append(r.text)
        assert r.status_code == 503 and "FLASH_JUPYTER_TOKEN" in r.json()["message"]
        sock = Socket(app)
        try:
            msg = sock.until(running(False))
            assert "FLASH_JUPYTER_TOKEN" in msg["message"]
            seen += sock.raw
        finally:
            sock.close()
    finally:
        app.stop()
    for text in [*seen, app.log_path.read_text(errors="replace")]:
        assert server.token not in text

    monkeypatch.setenv("FLASH_JUPYTER_URL", server.url)
    monkeypatch.setenv("FLASH_JUPYTER_TOKEN", token)
    feed = EventFeed(linger=0.1)
    messages: list[str] = []
    feed.add_listener(lambda ev: messages.append(ev.get("message") or ""))
    try:
        wait_for(lambda: messages and messages[0], what="the feed to say why it is not live")
        assert all(server.token not in m for m in [*messages, feed.message]), messages
    finally:
        feed.stop()


def test_a_token_with_a_stray_carriage_return_is_refused_by_the_client(server):
    """The Python client (a cell, a script) says what is wrong with such a token before any
    request, and its message does not hold the token (a traceback is saved in a notebook)."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "FLASH_JUPYTER_URL": server.url,
        "FLASH_JUPYTER_TOKEN": server.token + "\r",
    }
    code = "from flash_jupyter import Endpoint\nEndpoint(name='t')(lambda: 1)()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode != 0
    assert "cannot be sent in an HTTP header" in r.stderr, r.stderr
    assert server.token not in r.stderr + r.stdout


# ------------------------------------------------------------------ garbled streams


class Hostile:
    """A control plane that answers ``/v1/info`` and ``/v1/endpoints`` but streams garbage
    on ``/v1/events``: the lines in ``lines`` (bytes, each sent as given), then it holds
    the stream open. ``views`` answers ``/v1/endpoints/{name}`` in turn."""

    def __init__(self, lines: list[bytes], views: list[bytes] | None = None):
        self.lines, self.views = lines, list(views or [])
        self.streams = 0
        self.views_served = 0
        self.done = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def answer(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v1/events":
                    hostile.streams += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    try:
                        for line in hostile.lines:
                            self.wfile.write(line)
                            self.wfile.flush()
                    except OSError:
                        return
                    hostile.done.wait(60)
                    self.close_connection = True
                elif self.path == "/v1/info":
                    self.answer(b'{"version": "0", "wire_port": 1}')
                elif self.path == "/v1/endpoints":
                    self.answer(b"[]")
                elif self.path == "/v1/budget":
                    self.answer(b"[1, 2]")
                else:
                    hostile.views_served += 1
                    self.answer(hostile.views.pop(0) if hostile.views else b"{")

        self.http = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.http.daemon_threads = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.done.set()
        self.http.shutdown()
        self.http.server_close()


def sse(event: dict) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def view(name: str, **extra) -> dict:
    return {"name": name, "workers": [{"id": f"{name}-1", "state": "Idle"}], **extra}


def test_line_splitter_never_holds_more_than_its_limit():
    lines = LineSplitter(limit=1000)
    assert lines.feed(b"a\r\nb\n") == ["a", "b"]
    for _ in range(50):
        assert lines.feed(b"x" * 999) == []
        assert len(lines._buf) <= 1000
    assert lines.feed(b"tail\nok\npart") == ["ok"]
    assert lines.dropped == 1
    assert lines.feed(b"ial\n") == ["partial"]
    assert lines.feed(b"\xff\xfe\n") == ["\ufffd\ufffd"]


def test_event_feed_survives_a_garbled_stream(monkeypatch):
    """Found and fixed: one line that was not JSON dropped the kernel's stream (and with it
    the live view) and a line with no end was held whole; a garbled endpoint view killed
    the refetch thread for good. Now each costs its own event: the feed stays on one
    stream, keeps the good events, and refetches on."""
    garbage_views = [view("good"), 7, {"name": 3}, {"x": 1}, view("bad", workers=[5])]
    lines = [
        b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n",  # too long: dropped unread
        sse({"type": "snapshot", "endpoints": garbage_views}),
        b"data: {not json\n\n",
        b"data: [1, 2, 3]\n\n",
        b"data: \xff\xfe\n\n",
        sse({"type": "worker", "endpoint": "good"}),  # no worker id
        sse({"type": "endpoint", "name": ["list"], "action": "created"}),
        sse({"type": "endpoint", "name": "good", "action": "updated"}),  # refetch: garbage
    ]
    hostile = Hostile(lines, views=[b"{", b"[]", json.dumps(view("good", marker=1)).encode()])
    monkeypatch.setenv("FLASH_JUPYTER_URL", hostile.url)
    monkeypatch.setenv("FLASH_JUPYTER_TOKEN", "t0ken-for-the-hostile-server")
    feed = EventFeed(linger=0.1)
    seen: list[dict] = []
    feed.add_listener(seen.append)
    try:
        assert feed.wait_synced(30), feed.message
        assert sorted(feed.endpoints) == ["good"]
        wait_for(lambda: feed.skipped >= 6, what="the garbled events to be skipped")
        # The refetch thread lives through two garbled answers and fetches on.
        for served in (1, 2):
            wait_for(lambda: hostile.views_served >= served, what=f"fetch {served} of good")
            feed._schedule("good")
        wait_for(lambda: feed.endpoints["good"].get("marker") == 1, what="the good view")
        assert feed.connected and hostile.streams == 1
        assert [e for e in seen if e.get("type") == "connection"][-1]["connected"] is True
    finally:
        feed.stop()
        hostile.close()


def test_relay_drops_an_overlong_upstream_line(tmp_path):
    """Found and fixed: the extension read upstream lines whole (httpx's aiter_lines), and
    sent the first data line to every socket as the snapshot. Now a line past
    MAX_EVENT_BYTES is dropped as it streams in; the real snapshot comes first."""
    lines = [
        b"data: " + b"x" * (MAX_EVENT_BYTES + 10) + b"\n\n",
        sse({"type": "snapshot", "endpoints": [view("real")]}),
    ]
    hostile = Hostile(lines)
    app = start_lab(tmp_path, {"FLASH_JUPYTER_URL": hostile.url,
                               "FLASH_JUPYTER_TOKEN": "t0ken-for-the-hostile-server"})  # fmt: skip
    sock = None
    try:
        sock = Socket(app)
        sock.until(running(True))
        first = sock.until(lambda m: True)
        assert first["type"] == "snapshot" and first["endpoints"][0]["name"] == "real"
        assert all(len(text) < MAX_EVENT_BYTES for text in sock.raw)
    finally:
        if sock is not None:
            sock.close()
        app.stop()
        hostile.close()


# ------------------------------------------------------------------ the spending guard


def test_no_way_around_a_reached_budget(own_server, monkeypatch, name, tmp_path):
    """Held: with the budget reached, a call, a submit (as a --noblock cell does), a .map,
    a warm (HTTP and through the extension) are all refused before anything is recorded."""
    s = own_server()
    c = use_server(s, monkeypatch)

    @Endpoint(name=name, workers=(0, 1), idle_timeout=300)
    def double(x):
        return 2 * x

    assert double(1) == 2
    c.set_budget(TINY)
    for attempt in (lambda: double(2), lambda: double.submit(3).result(timeout=30),
                    lambda: double.map([1, 2, 3])):  # fmt: skip
        with pytest.raises(flash_jupyter.BudgetExceeded):
            attempt()
    with s.http() as api:
        assert api.post(f"/v1/endpoints/{name}/warm", json={"workers": 1}).status_code == 402
        jobs = api.get("/v1/jobs", params={"endpoint": name}).json()
        assert [j["status"] for j in jobs] == ["COMPLETED"]
    app = start_lab(tmp_path / "lab", {"FLASH_JUPYTER_URL": s.url, "FLASH_JUPYTER_TOKEN": s.token})
    try:
        r = call(app, "POST", f"/endpoints/{name}/warm", json={})
        assert r.status_code == 402 and "budget" in r.json()["error"]
    finally:
        app.stop()
    wait_for(lambda: all(w["pid"] is None for w in c.endpoint(name)["workers"]),
             what="the idle worker to stop")  # fmt: skip


def edit_budget_row(s: Server, value: str) -> None:
    with sqlite3.connect(s.data_dir / "flash.db") as db:
        db.execute("INSERT OR REPLACE INTO settings(key, value) VALUES ('budget', ?)", (value,))


@pytest.mark.parametrize(
    "row, limit, endpoint_limit",
    [
        ('{"limit": 2.5, "endpoints": {"NAME": "lots"}}', 2.5, None),
        ('{"limit": 2.5, "endpoints": {"NAME": -1, "other": 1}}', 2.5, None),
        ('{"limit": "2.5", "endpoints": {"NAME": 1}}', None, 1.0),
        ('{"limit": 1e999, "endpoints": [1]}', None, None),
        ('{"limit": ' + "9" * 400 + "}", None, None),
        ("not json {", None, None),
        ("[1, 2]", None, None),
    ],
    ids=["bad-entry", "negative-entry", "string-limit", "infinite", "huge-int", "not-json", "list"],
)
def test_a_hand_edited_budget_row(own_server, monkeypatch, name, row, limit, endpoint_limit):
    """Found and fixed: a row that is not JSON (or holds a number too big for a float)
    stopped the control plane from starting; one bad endpoint entry lifted every limit,
    the session's too. Now it starts, keeps every limit that reads, and says in its log
    what it dropped."""
    s = own_server()
    with s.http() as api:
        api.put(f"/v1/endpoints/{name}", json={"changes": {"workers": [0, 1]}})
    s.stop()
    edit_budget_row(s, row.replace("NAME", name))
    again = Server(s.data_dir, s.token, free_port(), free_port()).start()
    try:
        with again.http() as api:
            view = api.get("/v1/budget").json()
            assert view["limit"] == limit
            assert view["endpoints"][name]["limit"] == endpoint_limit
            # And the guard still works once set again.
            assert api.put("/v1/budget", json={"limit": 3}).json()["limit"] == 3.0
        assert "flash-jupyter: budget:" in again.log()
    finally:
        again.stop()

"""The Jupyter server extension (``flash_jupyter.labserver``) in a real ``jupyter server``.

Each test server is a subprocess on 127.0.0.1 whose Jupyter config folder holds only the
package's own ``jupyter-config/server-config/flash_jupyter.json`` (what the wheel installs
into ``etc/jupyter/jupyter_server_config.d``): the extension is on because of that file,
with no ``--ServerApp.jpserver_extensions`` flag. The routes relay a real control plane
(the session's ``server`` fixture, named by ``FLASH_JUPYTER_URL``), or, for the tests
without one, the machine-local control plane of an empty ``FLASH_JUPYTER_HOME``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from conftest import wait_for
from jupyter_app import JupyterApp, start_jupyter

pytest.importorskip("jupyter_server")
from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import websocket_connect

from flash_jupyter.config import default_endpoint_name, settings_from_tokens

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "jupyter-config" / "server-config" / "flash_jupyter.json"
CLI = str(Path(sys.executable).with_name("flash-jupyter"))
API = "/flash-jupyter/api"


@dataclass
class Lab:
    """A ``jupyter server`` subprocess and what its routes have answered (to check that
    the control plane's token is in none of it)."""

    app: JupyterApp
    seen: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def token(self) -> str:
        return self.app.token

    def call(self, method: str, path: str, auth: bool = True, **kw) -> httpx.Response:
        headers = {"Authorization": f"token {self.token}"} if auth else {}
        headers.update(kw.pop("headers", {}))
        r = httpx.request(method, self.app.url + API + path, headers=headers, timeout=60, **kw)
        self.seen.append(r.text)
        return r

    def ok(self, method: str, path: str, **kw):
        r = self.call(method, path, **kw)
        assert r.status_code == 200, (method, path, r.status_code, r.text)
        return r.json()

    def stop(self) -> None:
        self.app.stop()


def start_lab(tmp: Path, env: dict[str, str]) -> Lab:
    """``jupyter server`` with the package's config file as its only Jupyter config (no
    ``jpserver_extensions`` flag: the file alone must turn the extension on)."""
    server_d = tmp / "config" / "jupyter_server_config.d"
    server_d.mkdir(parents=True)
    shutil.copy(CONFIG, server_d / "flash_jupyter.json")
    return Lab(start_jupyter("jupyter_server", tmp, env=env))


@pytest.fixture(scope="module")
def lab(server, tmp_path_factory) -> Iterator[Lab]:
    """A Jupyter server relaying the session's control plane."""
    tmp = tmp_path_factory.mktemp("lab")
    lab = start_lab(tmp, {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token,
                          "FLASH_JUPYTER_HOME": str(tmp / "home")})  # fmt: skip
    yield lab
    lab.stop()
    for text in lab.seen:
        assert server.token not in text


@pytest.fixture
def cp(server, name) -> Iterator[httpx.Client]:
    """The control plane's own HTTP API (made endpoints there; ``name`` deleted after)."""
    with server.http() as h:
        yield h
        h.delete(f"/v1/endpoints/{name}")


def make_endpoint(cp: httpx.Client, name: str, **settings) -> dict:
    body = {"workers_min": 0, "workers_max": 2, "idle_timeout": 5, **settings}
    r = cp.put(f"/v1/endpoints/{name}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def live_workers(lab: Lab, name: str) -> list[dict]:
    view = lab.ok("GET", f"/endpoints/{name}")
    return [w for w in view["workers"] if w["state"] in ("Initializing", "Running")]


# ---------------------------------------------------------------- websocket helpers


async def connect(url: str):
    return await websocket_connect(HTTPRequest(url))


class Socket:
    """A client of ``/events`` (tornado's websocket client) on its own event loop."""

    def __init__(self, lab: Lab, token: str | None = None):
        self.lab = lab
        self.loop = asyncio.new_event_loop()
        self.messages: list[dict] = []
        self.raw: list[str] = []
        q = f"?token={token}" if token else ""
        url = f"ws://127.0.0.1:{lab.port}{API}/events{q}"
        self.conn = self.loop.run_until_complete(connect(url))

    def until(self, pred, timeout: float = 30, what: str = "a message") -> dict:
        """Read messages until one satisfies ``pred``; that message."""

        async def read() -> dict:
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; got {self.messages}")
                try:
                    text = await asyncio.wait_for(self.conn.read_message(), left)
                except asyncio.TimeoutError:
                    continue
                assert text is not None, f"socket closed while waiting for {what}"
                self.raw.append(text)
                self.lab.seen.append(text)
                msg = json.loads(text)
                self.messages.append(msg)
                if pred(msg):
                    return msg

        return self.loop.run_until_complete(read())

    def close(self) -> None:
        async def close() -> None:  # tornado's close needs the loop current
            self.conn.close()

        self.loop.run_until_complete(close())
        self.loop.close()


def ws_refused(lab: Lab, token: str | None) -> int:
    loop = asyncio.new_event_loop()
    q = f"?token={token}" if token else ""
    try:
        loop.run_until_complete(connect(f"ws://127.0.0.1:{lab.port}{API}/events{q}"))
    except HTTPClientError as e:
        return e.code
    finally:
        loop.close()
    raise AssertionError("the websocket was accepted")


def is_cp(running: bool):
    return lambda m: m.get("type") == "control_plane" and m.get("running") is running


# ---------------------------------------------------------------- tests

ROUTES = [
    ("GET", "/status", None),
    ("POST", "/start", None),
    ("GET", "/endpoints", None),
    ("GET", "/endpoints/x", None),
    ("DELETE", "/endpoints/x", None),
    ("POST", "/endpoints/x/warm", {"workers": 1}),
    ("POST", "/endpoints/x/scale", {"min": 0, "max": 1}),
    ("POST", "/endpoints/x/stop", None),
    ("POST", "/endpoints/x/purge", None),
    ("GET", "/budget", None),
    ("PUT", "/budget", {"limit": 1}),
    ("GET", "/billing", None),
    ("POST", "/prewarm", {"line": "%%flash"}),
]


def test_config_file_names_the_extension():
    """The file the wheel installs enables the `flash_jupyter` package, whose extension
    point is the labserver module; importing flash_jupyter loads no Jupyter module."""
    assert json.loads(CONFIG.read_text()) == {
        "ServerApp": {"jpserver_extensions": {"flash_jupyter": True}}
    }
    code = (
        "import sys, flash_jupyter as f; print(f._jupyter_server_extension_points()); "
        "print(sorted(m for m in ('tornado', 'jupyter_server') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[{'module': 'flash_jupyter.labserver'}]", "[]"]


def test_every_route_needs_jupyters_token(lab):
    for method, path, body in ROUTES:
        r = lab.call(method, path, auth=False, json=body)
        assert r.status_code in (401, 403), (method, path, r.status_code)
        r = lab.call(method, path, auth=False, json=body,
                     headers={"Authorization": "token wrong"})  # fmt: skip
        assert r.status_code in (401, 403), (method, path, r.status_code)
    assert ws_refused(lab, None) in (401, 403)
    assert ws_refused(lab, "wrong") in (401, 403)


def test_status_relays_without_the_token(lab, server):
    status = lab.ok("GET", "/status")
    assert status["running"] is True
    assert status["url_host"] == f"127.0.0.1:{server.port}"
    assert status["version"] and status["message"]
    assert server.token not in json.dumps(status)
    # Already running: /start only says so.
    assert lab.ok("POST", "/start")["running"] is True


def test_endpoints_and_their_actions(lab, cp, name):
    """An endpoint made over the control plane's own API is listed, and every action acts."""
    make_endpoint(cp, name)
    assert name in [e["name"] for e in lab.ok("GET", "/endpoints")]
    assert lab.ok("GET", f"/endpoints/{name}")["config"]["workers_max"] == 2

    assert lab.ok("POST", f"/endpoints/{name}/scale", json={"min": 1, "max": 2})["name"] == name
    wait_for(lambda: live_workers(lab, name), what="the scaled-up worker")
    assert cp.get(f"/v1/endpoints/{name}").json()["config"]["workers_min"] == 1

    assert lab.ok("POST", f"/endpoints/{name}/stop")["name"] == name
    assert cp.get(f"/v1/endpoints/{name}").json()["config"]["workers_min"] == 0
    wait_for(lambda: not live_workers(lab, name), what="the workers to stop")

    assert lab.ok("POST", f"/endpoints/{name}/purge")["removed"] == 0
    assert lab.ok("DELETE", f"/endpoints/{name}") == {"deleted": name}
    assert cp.get(f"/v1/endpoints/{name}").status_code == 404

    # The control plane's errors keep their status and message.
    r = lab.call("GET", f"/endpoints/{name}")
    assert r.status_code == 404 and name in r.json()["error"]
    r = lab.call("POST", f"/endpoints/{name}/stop")
    assert r.status_code == 404 and name in r.json()["error"]


@pytest.mark.parametrize(
    "path,body,words",
    [
        ("/endpoints/x/scale", {"min": "a", "max": 2}, '"min" must be a whole number'),
        ("/endpoints/x/scale", {"min": 3, "max": 2}, "must not exceed"),
        ("/endpoints/x/scale", {"max": 2}, '"min" must be a whole number'),
        ("/endpoints/x/warm", {"workers": 0}, '"workers" must be a whole number'),
        ("/endpoints/x/warm", {"workers": 1, "extra": 1}, "unknown field(s) extra"),
        ("/endpoints/a%20b/stop", None, "is not valid"),
        ("/prewarm", {"line": "print(1)"}, "not a %%flash line"),
        ("/prewarm", {"line": "%%flash gpu=NOPE"}, "unknown GPU type 'NOPE'"),
        ("/prewarm", {"line": "%%flash --bogus"}, "unrecognized arguments: --bogus"),
        ("/prewarm", {"line": "%%flash workers=abc"}, "workers must be N or MIN,MAX"),
        ("/prewarm", {"line": 3}, '"line" must be the text'),
        ("/prewarm", {}, '"line" must be the text'),
    ],
)
def test_bad_bodies_are_400_with_a_message(lab, path, body, words):
    r = lab.call("POST", path, json=body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]


def test_bad_json_and_budget_bodies(lab):
    r = lab.call("PUT", "/budget", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    for body, words in [
        ({}, 'needs "limit"'),
        ({"limit": -1}, '"limit" must be an amount'),
        ({"limit": "lots"}, '"limit" must be an amount'),
        ({"limit": 1, "endpoint": "a b"}, "is not valid"),
    ]:
        r = lab.call("PUT", "/budget", json=body)
        assert r.status_code == 400 and words in r.json()["error"], r.text


def test_warm(lab, cp, name):
    make_endpoint(cp, name)
    view = lab.ok("POST", f"/endpoints/{name}/warm", json={"workers": 1})
    assert view["name"] == name
    wait_for(lambda: live_workers(lab, name), what="the warmed worker")
    r = lab.call("POST", "/endpoints/no-such-endpoint-x/warm", json={})
    assert r.status_code == 404 and "no-such-endpoint-x" in r.json()["error"]


def test_budget_get_and_put(lab, cp):
    try:
        view = lab.ok("PUT", "/budget", json={"limit": 2.5})
        assert view["limit"] == 2.5 and view["currency"] == "USD"
        assert cp.get("/v1/budget").json()["limit"] == 2.5
        assert lab.ok("GET", "/budget")["limit"] == 2.5
        assert lab.ok("PUT", "/budget", json={"limit": "off"})["limit"] is None
    finally:
        cp.put("/v1/budget", json={"limit": None})


def test_billing(lab, cp):
    assert lab.ok("GET", "/billing").keys() >= cp.get("/v1/billing").json().keys()


def test_prewarm_deploys_the_cells_endpoint_and_warms_it(lab, cp, name):
    line = f"%%flash name={name} workers=0,2 idle_timeout=5 --noblock -o handle"
    answer = lab.ok("POST", "/prewarm", json={"line": line, "kernel_id": "k1"})
    assert answer == {"endpoint": name, "action": "created", "warmed": True}
    view = cp.get(f"/v1/endpoints/{name}").json()
    assert (view["config"]["workers_min"], view["config"]["workers_max"]) == (0, 2)
    assert view["config"]["idle_timeout"] == 5
    wait_for(lambda: live_workers(lab, name), what="the prewarmed worker")
    # The same settings again (or a subset of them): its worker is warmed, nothing changes.
    again = lab.ok("POST", "/prewarm", json={"line": f"%%flash name={name} idle_timeout=5"})
    assert again == {"endpoint": name, "action": "reused", "warmed": True}
    # Selecting a cell never changes an endpoint: a line that would is left for the run.
    hash_before = cp.get(f"/v1/endpoints/{name}").json()["config_hash"]
    other = lab.ok("POST", "/prewarm", json={"line": f"%%flash name={name} idle_timeout=7"})
    assert other["action"] == "unchanged" and other["warmed"] is False, other
    assert "apply when it runs" in other["reason"]
    view = cp.get(f"/v1/endpoints/{name}").json()
    assert view["config_hash"] == hash_before and view["config"]["idle_timeout"] == 5


def test_prewarm_creates_nothing_when_the_budget_is_reached(lab, cp, name):
    cp.put("/v1/budget", json={"limit": 0})
    try:
        r = lab.call("POST", "/prewarm", json={"line": f"%%flash name={name}"})
        assert r.status_code == 402 and "budget" in r.json()["error"], r.text
        assert cp.get(f"/v1/endpoints/{name}").status_code == 404
    finally:
        cp.put("/v1/budget", json={"limit": None})


def test_prewarm_without_a_name_uses_the_magics_default_name(lab, server):
    env = f"LAB_TEST={secrets.token_hex(4)}"
    expected = default_endpoint_name(settings_from_tokens([f"env={env}"]))
    assert expected.startswith("notebook-")
    try:
        answer = lab.ok("POST", "/prewarm", json={"line": f"%%flash env={env} idle_timeout=2"})
        assert answer["endpoint"] == expected
    finally:
        with server.http() as h:
            h.delete(f"/v1/endpoints/{expected}")


def test_magic_line_parser_matches_the_magic():
    """The server parses without IPython: its options must stay the magic's."""
    pytest.importorskip("IPython")
    from flash_jupyter import magic_line
    from flash_jupyter.jupyter.magics import LIMIT, FlashMagics

    def options(parser):
        return sorted((tuple(a.option_strings), a.dest, a.nargs, a.default)
                      for a in parser._actions)  # fmt: skip

    assert options(magic_line.PARSER) == options(FlashMagics.flash_cell.parser)
    assert (magic_line.LIMIT.name, magic_line.LIMIT.kind) == (LIMIT.name, LIMIT.kind)


def test_websocket_snapshot_then_events(lab, cp, name):
    make_endpoint(cp, name)
    first = Socket(lab, lab.token)
    second = None
    try:
        first.until(is_cp(True), what="running: true")
        snap = first.until(lambda m: m.get("type") == "snapshot", what="the snapshot")
        assert name in [e["name"] for e in snap["endpoints"]]
        # A socket joining a live subscription gets its own snapshot.
        second = Socket(lab, lab.token)
        second.until(is_cp(True), what="running: true (second socket)")
        snap2 = second.until(lambda m: m.get("type") == "snapshot", what="the second snapshot")
        assert name in [e["name"] for e in snap2["endpoints"]]
        lab.ok("POST", f"/endpoints/{name}/scale", json={"min": 1, "max": 1})
        for sock in (first, second):
            ev = sock.until(lambda m: m.get("type") == "worker" and m.get("endpoint") == name,
                            what="a worker event")  # fmt: skip
            assert ev["state"] in ("Initializing", "Running")
    finally:
        first.close()
        if second is not None:
            second.close()


def test_without_a_control_plane(tmp_path):
    """No control plane: /status says so, the other routes are 503 with the message, the
    socket says running: false; POST /start starts the machine-local one (the socket then
    gets running: true and a snapshot), and losing it again is told too."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    lab = start_lab(tmp_path, {"FLASH_JUPYTER_HOME": str(home)})
    sock = None
    try:
        status = lab.ok("GET", "/status")
        assert status["running"] is False and status["url_host"] is None
        assert "no control plane is running" in status["message"]
        assert status["can_start"] is True
        for method, path, body in ROUTES[2:]:
            if path == "/prewarm":
                continue
            r = lab.call(method, path, json=body)
            assert r.status_code == 503, (method, path, r.text)
            assert r.json()["error"] == "no control plane is running"
            assert r.json()["running"] is False
        r = lab.call("POST", "/prewarm", json={"line": "%%flash"})
        assert r.status_code == 503 and r.json()["running"] is False
        assert not (home / "runtime.json").exists()  # nothing started by those

        sock = Socket(lab, lab.token)
        down = sock.until(is_cp(False), what="running: false")
        assert "no control plane is running" in down["message"]

        started = lab.ok("POST", "/start")
        assert started["running"] is True
        token = json.loads((home / "runtime.json").read_text())["token"]
        sock.until(is_cp(True), what="running: true after the start")
        assert sock.until(lambda m: m.get("type") == "snapshot")["endpoints"] == []
        assert lab.ok("GET", "/endpoints") == []

        subprocess.run([CLI, "shutdown"], env={**os.environ, "FLASH_JUPYTER_HOME": str(home)},
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        sock.until(is_cp(False), what="running: false after the shutdown")
        assert lab.ok("GET", "/status")["running"] is False
        for text in lab.seen:
            assert token not in text
    finally:
        if sock is not None:
            sock.close()
        subprocess.run([CLI, "shutdown"], env={**os.environ, "FLASH_JUPYTER_HOME": str(home)},
                       capture_output=True, timeout=60)  # fmt: skip
        lab.stop()

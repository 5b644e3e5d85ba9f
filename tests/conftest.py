"""Fixtures: a real control plane (a subprocess on 127.0.0.1) and clients that use it.

Each control plane runs with ``--exit-with-parent`` so it stops itself should the test run
die, and is stopped with SIGTERM at teardown.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from flash_jupyter import client as fj_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    data_dir: Path
    token: str
    port: int
    wire_port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> Server:
        ready = self.data_dir / f"ready-{secrets.token_hex(4)}.json"
        env = {**os.environ, **self.env}
        env.pop("FLASH_JUPYTER_URL", None)
        log = open(self.data_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flash_jupyter.server", "--host", "127.0.0.1",
             "--port", str(self.port), "--wire-port", str(self.wire_port), f"--token={self.token}",
             "--data-dir", str(self.data_dir), "--exit-with-parent", str(os.getpid()),
             "--ready-file", str(ready)],
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"control plane did not start: {self.log()}")
            time.sleep(0.01)
        # The HTTP stack loads just after the ready file; wait for it too.
        while True:
            try:
                if httpx.get(self.url + "/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("HTTP API did not come up")
            time.sleep(0.01)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        try:
            return (self.data_dir / "server.log").read_text()[-4000:]
        except OSError:
            return ""

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30
        )

    def info(self) -> dict:
        return json.loads((self.data_dir / "runtime.json").read_text())


def make_server(tmp: Path, **env: str) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    return Server(tmp, secrets.token_urlsafe(16), free_port(), free_port(), env=env)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = make_server(tmp_path_factory.mktemp("cp")).start()
    yield s
    s.stop()


def use_server(s: Server, monkeypatch: pytest.MonkeyPatch) -> fj_client.Client:
    monkeypatch.setenv("FLASH_JUPYTER_URL", s.url)
    monkeypatch.setenv("FLASH_JUPYTER_TOKEN", s.token)
    fj_client.reset_client()
    return fj_client.get_client()


@pytest.fixture
def client(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[fj_client.Client]:
    c = use_server(server, monkeypatch)
    yield c
    fj_client.reset_client()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[callable]:
    """A factory for control planes private to one test (restarts, special settings)."""
    made: list[Server] = []

    def factory(**env: str) -> Server:
        s = make_server(tmp_path / f"cp{len(made)}", **env)
        made.append(s)
        return s.start()

    yield factory
    fj_client.reset_client()
    for s in made:
        s.stop()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """An endpoint name unique to this test."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")
    return f"{base[:40]}-{secrets.token_hex(2)}"


def wait_for(pred, timeout: float = 15, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------- the HTTP API

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@pytest.fixture
def api(server: Server, name: str) -> Iterator[httpx.Client]:
    """An authorized HTTP client on the session control plane; deletes ``name`` afterwards."""
    with server.http() as h:
        yield h
        h.delete(f"/v1/endpoints/{name}")


@pytest.fixture
def echo(client: fj_client.Client, name: str) -> str:
    """A deployed endpoint ``name`` whose handler returns its keyword arguments."""
    from flash_jupyter import Endpoint

    @Endpoint(name=name, workers=(0, 1), idle_timeout=5)
    def echo(**kw):
        return kw

    echo.deploy()
    return name


def poll(api: httpx.Client, name: str, jid: str, timeout: float = 60) -> dict:
    """GET /status until the job is terminal; the last payload."""

    def done():
        r = api.get(f"/v2/{name}/status/{jid}")
        assert r.status_code == 200, r.text
        return r.json() if r.json()["status"] in TERMINAL else None

    return wait_for(done, timeout=timeout, what=f"job {jid} to finish")


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    """A find-links folder holding one tiny local wheel (fjtinypkg): a dependency that
    installs with no network."""
    from test_dependencies import make_wheel

    folder = tmp_path / "wheels"
    folder.mkdir()
    make_wheel(folder)
    return folder

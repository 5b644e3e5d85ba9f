"""``flash-jupyter dev PATH``: the local FastAPI app, started through the command line, with
real HTTP requests to its routes (which run on the control plane's workers) and ``--reload``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import TERMINAL, Server, free_port, wait_for
from test_deploy import CLI, assert_only_workers_imported, delete_all, write_app

pytest.importorskip("fastapi")


class Dev:
    def __init__(self, server: Server, path: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = path.parent / f"dev-{self.port}.log"
        env = {**os.environ, "FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([CLI, "dev", str(path), "--port", str(self.port), *extra],
                                         env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip

    def output(self) -> str:
        return self.log.read_text()

    def schema(self) -> dict | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"flash-jupyter dev exited:\n{self.output()}")
        try:
            r = httpx.get(self.url + "/openapi.json", timeout=5)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def dev_app(server, tmp_path, name):
    started: list[Dev] = []

    def start(path: Path, *extra: str) -> Dev:
        d = Dev(server, path, *extra)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    delete_all(server, [f"{name}-{k}" for k in ("square", "greet", "counter", "count", "cube")])


def test_dev_server_routes_models_and_reload(server, dev_app, tmp_path, name):
    app, marker = write_app(tmp_path / "proj", name)
    dev = dev_app(app, "--reload")
    schema = wait_for(dev.schema, timeout=90, what="the dev server's /openapi.json")
    sq = f"{name}-square"
    paths = schema["paths"]
    for k in ("square", "greet", "counter", "count"):
        assert f"/{name}-{k}/runsync" in paths and f"/{name}-{k}/run" in paths
        assert f"/{name}-{k}/status/{{job_id}}" in paths
    model = next(v for k, v in schema["components"]["schemas"].items() if k.endswith("SquareInput"))
    assert model["properties"]["x"]["type"] == "integer"
    assert model["properties"]["plus"]["default"] == 0
    assert model["required"] == ["x"]
    assert httpx.get(dev.url + "/docs", timeout=5).status_code == 200

    with httpx.Client(base_url=dev.url, timeout=60) as h:
        r = h.post(f"/{sq}/runsync", json={"input": {"x": 5}})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "COMPLETED" and r.json()["output"] == 25
        # the request model refuses what the signature cannot take, before any worker runs
        r = h.post(f"/{sq}/runsync", json={"input": {"x": "five"}})
        assert r.status_code == 422, r.text
        r = h.post(f"/{sq}/runsync", json={"input": {"x": 1, "typo": 2}})
        assert r.status_code == 422, r.text

        r = h.post(f"/{name}-counter/runsync",
                   json={"input": {"method": "add", "args": {"k": 3}}})  # fmt: skip
        assert r.json()["output"] == 3, r.text
        r = h.post(f"/{name}-greet/run", json={"input": {"who": "dev"}})
        assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE", r.text
        jid = r.json()["id"]

        def finished():
            s = h.get(f"/{name}-greet/status/{jid}").json()
            return s if s["status"] in TERMINAL else None

        assert wait_for(finished, timeout=60, what="the job")["output"] == "hello dev"
        assert h.get(f"/{name}-greet/status/nope").status_code == 404

        # --reload: an edit of the file changes the function and adds an endpoint
        app.write_text(app.read_text().replace("return x * x + plus", "return x * x * 10 + plus")
                       + f'\n\n@Endpoint(name="{name}-cube")\ndef cube(x: float) -> float:\n'
                       "    return x ** 3\n")  # fmt: skip

        def reloaded():
            s = dev.schema()
            return s if s and f"/{name}-cube/runsync" in s["paths"] else None

        wait_for(reloaded, timeout=90, what="the reload to add the new endpoint")
        r = h.post(f"/{name}-cube/runsync", json={"input": {"x": 2}})
        assert r.json()["output"] == 8.0, r.text
        r = h.post(f"/{sq}/runsync", json={"input": {"x": 5}})
        assert r.json()["output"] == 250, r.text  # the warm worker runs the new code
    dev.stop()
    assert "reloading" in dev.output()
    assert_only_workers_imported(marker)


def test_dev_server_bad_path_says_so(server, dev_app, tmp_path):
    dev = dev_app(tmp_path / "missing.py")
    deadline = time.monotonic() + 60
    while dev.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dev.proc.returncode == 1, dev.output()
    assert "no such file" in dev.output()

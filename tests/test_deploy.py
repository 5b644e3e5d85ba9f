"""``flash-jupyter deploy`` / ``undeploy`` through the command line, then real HTTP requests to
the control plane's ``/v2`` routes. The user's file records every process that imports it:
only workers may (the CLI reads it without running it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TERMINAL, Server, poll

CLI = str(Path(sys.executable).with_name("flash-jupyter"))

APP = '''
import os
import sys

from flash_jupyter import Endpoint

# Who imported this file: only worker processes may.
with open({marker!r}, "a") as f:
    f.write(f"{{os.getpid()}} {{'flash_jupyter.worker.main' in sys.modules}}\\n")


@Endpoint(name="{p}-square", workers=(1, 2), idle_timeout=30)
def square(x: int, plus: int = 0) -> int:
    """x squared, plus something."""
    return x * x + plus


@Endpoint(name="{p}-greet")
async def greet(who: str) -> str:
    import asyncio

    await asyncio.sleep(0)
    return f"hello {{who}}"


@Endpoint(name="{p}-counter")
class Counter:
    def __init__(self, start: int = 0):
        self.n = start

    def __call__(self, k: int = 1) -> int:
        return self.add(k)

    def add(self, k: int = 1) -> int:
        self.n += k
        return self.n

    def reset(self) -> int:
        self.n = 0
        return self.n


@Endpoint(name="{p}-count")
def count(n: int):
    for i in range(n):
        yield {{"i": i}}


if __name__ == "__main__":
    raise SystemExit("not as a script")
'''


def cli(server: Server | None, *args: str, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
    """``flash-jupyter ARGS`` against ``server``; fails the test on a non-zero exit."""
    e = {**os.environ, **(env or {})}
    if server is not None:
        e.update(FLASH_JUPYTER_URL=server.url, FLASH_JUPYTER_TOKEN=server.token)
    r = subprocess.run([CLI, *args], env=e, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (
        f"flash-jupyter {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
    )
    return r


def write_app(folder: Path, prefix: str, text: str = APP) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "imported-by.txt"
    app = folder / "app.py"
    app.write_text(text.format(p=prefix, marker=str(marker)))
    return app, marker


def assert_only_workers_imported(marker: Path) -> None:
    lines = marker.read_text().split() if marker.exists() else []
    assert lines, "no worker imported the file"
    flags = lines[1::2]
    assert set(flags) == {"True"}, f"imported outside a worker: {marker.read_text()}"


def runsync(h, name: str, inp: dict) -> dict:
    r = h.post(f"/v2/{name}/runsync", json={"input": inp})
    assert r.status_code == 200, r.text
    body = r.json()
    if body["status"] not in TERMINAL:
        body = poll(h, name, body["id"])
    return body


def action_lines(out: str) -> dict[str, str]:
    """``NAME  ACTION  KIND  WHERE`` lines of a deploy: name -> action."""
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in ("created", "updated", "reused"):
            found[parts[0]] = parts[1]
    return found


def delete_all(server: Server, names: list[str]) -> None:
    with server.http() as h:
        for n in names:
            h.delete(f"/v1/endpoints/{n}")


def test_deploy_py_functions_classes_async_over_http(server, tmp_path, name):
    app, marker = write_app(tmp_path / "proj", name)
    names = [f"{name}-{k}" for k in ("square", "greet", "counter", "count")]
    try:
        r = cli(server, "deploy", str(app))
        assert not marker.exists(), "deploy imported the user's file"
        assert action_lines(r.stdout) == dict.fromkeys(names, "created"), r.stdout
        # min workers are brought up before deploy returns
        assert f"{name}-square: 1 worker ready" in r.stdout, r.stdout
        assert f"POST {server.url}/v2/{name}-square/runsync" in r.stdout
        assert f"GET  {server.url}/v2/{name}-square/status/<job id>" in r.stdout
        assert f"GET  {server.url}/v2/{name}-square/health" in r.stdout
        start = f"curl -s -X POST {server.url}/v2/{name}-square/"
        curl = next(ln.strip() for ln in r.stdout.splitlines() if ln.strip().startswith(start))
        assert '"input": {"x": 1, "plus": 0}' in curl
        assert "Bearer $FLASH_JUPYTER_TOKEN" in curl
        with server.http() as h:
            assert h.get(f"/v2/{name}-square/health").json()["workers"]["ready"] >= 1
            out = runsync(h, f"{name}-square", {"x": 7, "plus": 1})
            assert out["status"] == "COMPLETED", out
            assert out["output"] == 50
            assert out["cold"] is False  # the min worker was up already

            assert runsync(h, f"{name}-greet", {"who": "ada"})["output"] == "hello ada"

            c = f"{name}-counter"
            inp = {"method": "add", "args": {"k": 2}, "init": {"start": 10}}
            assert runsync(h, c, inp)["output"] == 12
            assert runsync(h, c, inp)["output"] == 14  # one instance per worker and init
            assert runsync(h, c, {"args": {"k": 5}})["output"] == 5  # __call__, init {}
            bad = runsync(h, c, {"method": "nope"})
            assert bad["status"] == "FAILED"
            assert "__call__, add, reset" in bad["error"], bad
            wrong = runsync(h, c, {"k": 1})
            assert wrong["status"] == "FAILED", wrong
            assert '"args"' in json.loads(wrong["error"])["error_message"], wrong

            gen = runsync(h, f"{name}-count", {"n": 3})
            assert gen["output"] == [{"i": 0}, {"i": 1}, {"i": 2}]

            # the printed curl line works as printed
            if shutil.which("curl"):
                sh = subprocess.run(["bash", "-c", curl], capture_output=True, text=True,
                                    env={**os.environ, "FLASH_JUPYTER_TOKEN": server.token},
                                    timeout=60)  # fmt: skip
                body = json.loads(sh.stdout)
                assert body["status"] == "COMPLETED" and body["output"] == 1, sh.stdout
        assert_only_workers_imported(marker)
    finally:
        delete_all(server, names)


def notebook(path: Path, cells: list[str]) -> Path:
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": {},
                "source": src,
                "outputs": [],
                "execution_count": None,
            }
            for src in cells
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path.write_text(json.dumps(nb))
    return path


def test_deploy_notebook_cells_over_http(server, tmp_path, name):
    nb = notebook(tmp_path / "work.ipynb", [
        "%load_ext flash_jupyter",
        "base = 100  # runs in the notebook only",
        f"%%flash name={name}\nimport math\ny = x * 2\nroot = math.sqrt(y)\n"
        "square = lambda v: v * v\n",
        f"%%flash name={name}\ntotal = sum(range(y)) + offset\nroot + 1\n",
    ])  # fmt: skip
    try:
        r = cli(server, "deploy", str(nb))
        assert action_lines(r.stdout) == {name: "created"}, r.stdout
        curl = next(ln for ln in r.stdout.splitlines() if "curl" in ln and name in ln)
        assert '{"input": {"x": 1, "offset": 1}}' in curl, curl  # the names the cells read
        with server.http() as h:
            out = runsync(h, name, {"x": 8, "offset": 2})
            assert out["status"] == "COMPLETED", out
            assert out["output"] == {
                "names": {"y": 16, "root": 4.0, "total": 122},
                "skipped": {"math": "a module", "square": "a function: not JSON"},
                "last": 5.0,
            }
            # a name the cell needs and the input lacks: the cell's own NameError
            missing = runsync(h, name, {"x": 8})
            assert missing["status"] == "FAILED" and "offset" in missing["error"], missing
    finally:
        delete_all(server, [name])


def test_second_deploy_reuses_updates_creates_then_undeploy(own_server, tmp_path, name):
    s = own_server()
    folder = tmp_path / "proj"
    first = APP.replace('@Endpoint(name="{p}-square", workers=(1, 2), idle_timeout=30)',
                        '@Endpoint(name="{p}-square", idle_timeout=30)')  # fmt: skip
    app, marker = write_app(folder, name, first)
    cli(s, "deploy", str(app))
    with s.http() as h:
        assert runsync(h, f"{name}-greet", {"who": "a"})["output"] == "hello a"
    # An edit: square's settings change, greet's code changes (same settings), a new one.
    edited = (
        first.replace(
            'name="{p}-square", idle_timeout=30', 'name="{p}-square", idle_timeout=45'
        ).replace('return f"hello {{who}}"', 'return f"hi {{who}}"')
        + '\n\n@Endpoint(name="{p}-extra")\ndef extra() -> str:\n    return "new"\n'
    )
    write_app(folder, name, edited)
    r = cli(s, "deploy", str(app))
    assert action_lines(r.stdout) == {
        f"{name}-square": "updated",
        f"{name}-greet": "reused",
        f"{name}-counter": "reused",
        f"{name}-count": "reused",
        f"{name}-extra": "created",
    }, r.stdout
    with s.http() as h:
        # the warm worker of a reused endpoint runs the new code
        assert runsync(h, f"{name}-greet", {"who": "a"})["output"] == "hi a"
        assert runsync(h, f"{name}-extra", {})["output"] == "new"

        r = cli(s, "undeploy", f"{name}-extra")
        assert f"{name}-extra: deleted" in r.stdout
        assert h.get(f"/v1/endpoints/{name}-extra").status_code == 404
        r = cli(s, "undeploy", str(app))  # every endpoint of the file
        for k in ("square", "greet", "counter", "count"):
            assert h.get(f"/v1/endpoints/{name}-{k}").status_code == 404
        assert h.get("/v1/endpoints").json() == []

        cli(s, "deploy", str(app), "--no-wait")
        assert len(h.get("/v1/endpoints").json()) == 5
        r = cli(s, "undeploy", "--all")
        assert r.stdout.count(": deleted") == 5, r.stdout
        assert h.get("/v1/endpoints").json() == []
    assert_only_workers_imported(marker)


def test_cli_errors_say_what_to_do(server, tmp_path):
    e = {"FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token}

    def run(*a):
        return subprocess.run([CLI, *a], env={**os.environ, **e}, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    r = run("deploy", str(tmp_path / "nope.py"))
    assert r.returncode == 1 and "no such file" in r.stderr, r.stderr
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    r = run("deploy", str(empty))
    assert r.returncode == 1 and "no @Endpoint" in r.stderr, r.stderr
    r = run("undeploy")
    assert r.returncode == 2 and "--all" in r.stderr
    r = run("undeploy", "no-such-endpoint-xyz")
    assert r.returncode == 1 and "no endpoint named 'no-such-endpoint-xyz'" in r.stderr, r.stderr


@pytest.fixture(autouse=True)
def _no_import_here():
    """The test process itself never imports a user's app."""
    yield
    assert "app" not in sys.modules or not hasattr(sys.modules["app"], "square")


def test_deploy_builds_environments_first(own_server, tmp_path, name):
    from test_dependencies import make_wheel

    wheel = make_wheel(tmp_path)
    offline = {"PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}  # no network: the wheel alone
    s = own_server(**offline)
    text = (
        "from flash_jupyter import Endpoint\n\n\n"
        f"@Endpoint(name={name!r}, dependencies=[{str(wheel)!r}])\n"
        "def value() -> int:\n"
        "    import fjtinypkg\n\n"
        "    return fjtinypkg.VALUE\n"
    )
    app = tmp_path / "withdeps.py"
    app.write_text(text)
    r = cli(s, "deploy", str(app), env={**offline, "FLASH_JUPYTER_HOME": str(s.data_dir)})
    assert f"{name}: environment" in r.stdout, r.stdout  # the build's line, before the deploy
    assert r.stdout.index(f"{name}: environment") < r.stdout.index(f"{name}  created")
    with s.http() as h:
        out = runsync(h, name, {})
        assert out["status"] == "COMPLETED" and out["output"] == 42, out
        assert out["environment"] == "pre-installed", out

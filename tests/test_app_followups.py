"""Follow-ups of the notebook-to-app workflow: environments are byte-compiled when built, an
adopted spare counts as a use of its environment, ``envs prune --unused-for``, the spare
workers in ``%flash status --text`` and the dashboard, ``--set`` on ``deploy`` and ``dev``.
Real control planes, worker processes, kernels and the CLI; the one package is a wheel made
here, installed from its folder alone (no network)."""

from __future__ import annotations

import importlib.util
import marshal
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import use_server, wait_for
from test_build_envs import (
    CLI,
    INSTALLERS,
    cli,
    env_dirs,
    offline,
)
from test_preload import ready_spare, worker_gone

from flash_jupyter import Endpoint
from flash_jupyter.jupyter import dashboard_cards as cards
from flash_jupyter.providers import environments as envs

# ---------------------------------------------------------------- byte code


@pytest.mark.parametrize("installer", INSTALLERS)
def test_a_build_byte_compiles_the_environment(tmp_path, wheels, installer):
    home = tmp_path / "home"
    # Set in some shells: the build compiles all the same (workers inherit it and would
    # otherwise compile every module at every import).
    env = {**offline(wheels, home, installer), "PYTHONDONTWRITEBYTECODE": "1"}
    r = cli("build", "--deps", "fjtinypkg", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    [key] = env_dirs(home)
    final = home / "envs" / key
    source = next(final.glob("lib/python*/site-packages")) / "fjtinypkg" / "__init__.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    assert pyc.is_file(), sorted(p.name for p in source.parent.iterdir())
    # It names the final folder, not the temporary one it was built in.
    code = marshal.loads(pyc.read_bytes()[16:])
    assert code.co_filename == str(source)
    # A worker of the environment loads it instead of compiling the source.
    run = subprocess.run([str(final / "bin" / "python"), "-v", "-c", "import fjtinypkg"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    assert f"code object from '{pyc}'" in run.stderr, run.stderr[-2000:]
    assert (envs.list_environments(home)[0]).seconds > 0


# ---------------------------------------------------------------- last use


def test_an_adopted_spare_is_a_use_of_its_environment(own_server, monkeypatch, name, tmp_path,
                                                     wheels):  # fmt: skip
    s = own_server(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels))
    use_server(s, monkeypatch)
    http = s.http()
    env = offline(wheels, s.data_dir)
    r = cli("build", "--deps", "fjtinypkg", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    key = envs.env_key(["fjtinypkg"])

    def value():
        import fjtinypkg

        return fjtinypkg.VALUE

    ep = Endpoint(name=name, dependencies=["fjtinypkg"], idle_timeout=1)(value)
    job = ep.submit()
    assert job.result(timeout=60) == 42
    assert job.info()["environment"] == "pre-installed"
    # The worker goes; the environment's spare (which imported fjtinypkg) waits for the next.
    wait_for(lambda: worker_gone(http, name), 20, what="the idle worker to stop")
    spare = wait_for(lambda: ready_spare(http, "fjtinypkg"), 30, what="the environment's spare")
    assert spare["environment"] == key
    ready = s.data_dir / "envs" / key / ".ready"
    os.utime(ready, (time.time() - 7200,) * 2)  # last used two hours ago
    assert re.search(rf"^{key} .* 2 h ago ", cli("envs", env=env).stdout, re.M)

    job = ep.submit()
    assert job.result(timeout=60) == 42
    info = job.info()
    assert info["cold"] is True and info["spare"] == "preloaded", info
    assert info["environment"] == "pre-installed"
    out = cli("envs", env=env).stdout
    assert re.search(rf"^{key} +\S+ kB +\d+ s ago +{name} +fjtinypkg$", out, re.M), out


# ---------------------------------------------------------------- envs prune --unused-for


def test_envs_prune_unused_for(tmp_path, wheels):
    home = tmp_path / "home"
    env = offline(wheels, home)
    for deps in ("fjtinypkg", "fjtinypkg==0.1"):
        r = cli("build", "--deps", deps, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
    recent, old = envs.env_key(["fjtinypkg"]), envs.env_key(["fjtinypkg==0.1"])
    os.utime(home / "envs" / old / ".ready", (time.time() - 3 * 86400,) * 2)

    r = cli("envs", "prune", "--unused-for", "2d", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"removed {old} (") and lines[0].endswith(": fjtinypkg==0.1")
    assert lines[1].startswith("removed 1 environment, ")
    assert lines[1].endswith("; kept 1 used in the last 2d"), lines
    assert env_dirs(home) == [recent]
    r = cli("envs", "prune", "--unused-for", "30m", env=env)  # used seconds ago: kept
    assert r.returncode == 0 and env_dirs(home) == [recent], r.stdout + r.stderr

    for bad in ("7", "7x", "d"):
        r = cli("envs", "prune", "--unused-for", bad, env=env)
        assert r.returncode == 2 and f"{bad!r} is not a duration" in r.stderr, r.stderr
        assert "30m, 12h, 7d" in r.stderr
    r = cli("envs", "--unused-for", "1d", env=env)
    assert r.returncode == 2 and "go with prune" in r.stderr, r.stderr
    assert env_dirs(home) == [recent]


# ---------------------------------------------------------------- spares in the notebook

SPARES = [
    {"environment": "py311-abc", "state": "ready", "preload": ["torch"],
     "preloaded": ["torch"], "failed": []},
    {"environment": "plain", "state": "waiting: starting in a quiet moment", "preload": [],
     "preloaded": []},
]  # fmt: skip


def test_dashboard_cards_show_spares():
    text = cards.page_text([], None, spares=SPARES)
    assert "spare (environment py311-abc, preloaded: torch): ready" in text
    assert "spare (environment plain, importing: nothing): waiting: starting in a quiet" in text
    assert "billed to no endpoint until a cold start adopts one" in text
    head = cards.header_html([], None, spares=SPARES)
    assert "spare (environment py311-abc, preloaded: torch): ready" in head
    assert "billed to no endpoint" in head
    assert "spare (environment" in cards.page_html([], None, spares=SPARES)
    assert "spare" not in cards.header_html([], None) + cards.page_text([], None)


pytest.importorskip("ipykernel")
import notebook_kernel as nk  # noqa: E402

kernel = nk.kernel
_stop_endpoints = nk._stop_endpoints  # autouse


def test_flash_status_text_and_dashboard_show_the_spares(kernel):
    # The session's control plane keeps a spare of the plain interpreter (ready, starting,
    # or waiting for a quiet moment after a cold start took it).
    line = re.compile(r"^spare \(environment plain, (preloaded|importing): .*\): \w+", re.M)
    out = kernel.ok("%flash status --text").stdout
    assert line.search(out), out
    assert "billed to no endpoint until a cold start adopts one" in out
    kernel.ok("import flash_jupyter\nd = flash_jupyter.dashboard()")
    assert line.search(kernel.ok("print(d.text())").stdout)
    assert "spare (environment plain" in kernel.value("d.header.value")


# ---------------------------------------------------------------- --set on deploy and dev

APP = """\
from flash_jupyter import Endpoint

IDLE = 17


@Endpoint(name={name!r}, idle_timeout=IDLE)
def double(x: int) -> int:
    return 2 * x
"""


def test_deploy_and_dev_take_set(server, tmp_path, name):
    from test_deploy import delete_all, runsync
    from test_devserver import Dev

    app = tmp_path / "app.py"
    app.write_text(APP.format(name=name))
    e = {**os.environ, "FLASH_JUPYTER_URL": server.url, "FLASH_JUPYTER_TOKEN": server.token}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([CLI, *args], env=e, capture_output=True,
                              text=True, timeout=120)  # fmt: skip

    try:
        r = run("deploy", str(app))
        assert r.returncode == 1, r.stdout + r.stderr
        assert f"--set {name}.idle_timeout=" in r.stdout, r.stdout  # the problem says how
        r = run("deploy", str(app), "--set", f"{name}.idle_timeout=17")
        assert r.returncode == 0, r.stdout + r.stderr
        with server.http() as h:
            assert h.get(f"/v1/endpoints/{name}").json()["config"]["idle_timeout"] == 17
            assert runsync(h, name, {"x": 4})["output"] == 8
        r = run("dev", str(app), "--set", "idle_timeout=17")
        assert r.returncode != 0 and "NAME.setting=VALUE" in r.stderr, r.stderr

        dev = Dev(server, app, "--set", f"{name}.idle_timeout=23")
        try:
            wait_for(dev.schema, timeout=90, what="the dev server's /openapi.json")
            with server.http() as h:
                assert h.get(f"/v1/endpoints/{name}").json()["config"]["idle_timeout"] == 23
        finally:
            dev.stop()
    finally:
        delete_all(server, [name])

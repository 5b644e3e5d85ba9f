"""Preloaded spares: a spare worker per environment that has already imported what the
endpoint's workers imported last time (or its ``preload=`` setting), adopted by the next
cold start. Real control planes and worker processes; a module written here records, when
it is imported, which process imported it and when."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import use_server, wait_for

from flash_jupyter import Endpoint
from flash_jupyter.errors import ConfigError
from flash_jupyter.status_text import format_status


def make_module(tmp: Path) -> tuple[str, Path, Path]:
    """A module that appends "pid time" to a log file when it is imported."""
    name = f"fjpre_{secrets.token_hex(3)}"
    folder = tmp / "code"
    folder.mkdir()
    log = tmp / "imports.log"
    (folder / f"{name}.py").write_text(
        f"import os, time\nwith open({str(log)!r}, 'a') as f:\n"
        f"    f.write(f'{{os.getpid()}} {{time.time()}}\\n')\nVALUE = 7\n"
    )
    return name, folder, log


def imports(log: Path) -> list[tuple[int, float]]:
    if not log.exists():
        return []
    return [(int(p), float(t)) for p, t in (ln.split() for ln in log.read_text().splitlines())]


def spares(http) -> list[dict]:
    return http.get("/v1/info").json()["provider"]["spares"]


def ready_spare(http, module: str | None = None) -> dict | None:
    for sp in spares(http):
        if sp["state"] == "ready" and (module is None or module in sp["preloaded"]):
            return sp
    return None


def worker_gone(http, name: str) -> bool:
    return all(w["pid"] is None for w in http.get(f"/v1/endpoints/{name}").json()["workers"])


def test_next_cold_start_adopts_a_spare_that_imported_what_the_last_worker_did(
    own_server, monkeypatch, name, tmp_path
):
    mod, folder, log = make_module(tmp_path)
    monkeypatch.syspath_prepend(str(folder))  # a code folder of the caller: jobs carry it
    s = own_server()
    use_server(s, monkeypatch)
    http = s.http()

    def uses_module():
        import importlib

        importlib.import_module(mod)
        return os.getpid()

    ep = Endpoint(name=name, idle_timeout=1)(uses_module)
    t_first = time.time()
    job = ep.submit()
    pid1 = job.result(timeout=30)
    info = job.info()
    assert info["cold"] is True and info["spare"] == "plain"  # the boot spare, no imports
    [(who, when)] = imports(log)
    assert who == pid1 and when > t_first  # imported by the job, after it was submitted

    # The worker goes (idle_timeout); a spare importing the module takes its place.
    wait_for(lambda: worker_gone(http, name), 20, what="the idle worker to stop")
    spare = wait_for(lambda: ready_spare(http, mod), 20, what="a spare with the module")
    assert spare["environment"] == "plain" and spare["billed"] is False
    assert (spare["pid"], spare["preloaded"]) == (imports(log)[-1][0], [mod])
    cost = http.get("/v1/billing").json()["total"]
    text = subprocess.run(
        [sys.executable, "-m", "flash_jupyter.cli", "status"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "FLASH_JUPYTER_URL": s.url, "FLASH_JUPYTER_TOKEN": s.token},
    ).stdout  # fmt: skip
    assert f"spare (environment plain, preloaded: {mod}): ready" in text, text
    # While it waits, nobody pays for it: no endpoint's bill moves.
    wait_for(lambda: time.time() - spare["since"] > 1.0, what="the spare to be a second old")
    assert http.get("/v1/billing").json()["total"] == cost

    t_second = time.time()
    job2 = ep.submit()
    pid2 = job2.result(timeout=30)
    info2 = job2.info()
    assert info2["cold"] is True and info2["spare"] == "preloaded"
    assert pid2 == spare["pid"]
    # The worker that ran the job had imported the module before the job was submitted,
    # and did not import it again.
    assert [(p, t) for p, t in imports(log) if p == pid2] == [(pid2, imports(log)[-1][1])]
    assert imports(log)[-1][1] < t_second
    view = http.get(f"/v1/endpoints/{name}").json()["workers"][0]
    assert view["spare"] == "preloaded"
    # Billed from its cold start, not from when the spare started.
    assert view["uptime_s"] < time.time() - spare["since"] - 0.9


def test_preload_setting_imports_before_the_first_job(own_server, monkeypatch, name, tmp_path):
    mod, folder, log = make_module(tmp_path)
    s = own_server(PYTHONPATH=str(folder))  # importable by workers from their start
    use_server(s, monkeypatch)
    http = s.http()

    @Endpoint(name=name, idle_timeout=1, preload=[mod])
    def check():
        return os.getpid(), mod in sys.modules, time.time()

    pid, loaded, t_run = check.submit().result(timeout=30)
    assert loaded
    [(who, when)] = imports(log)
    assert who == pid and when < t_run  # imported at the worker's start, before the job
    # The environment's next spare imports it too.
    wait_for(lambda: worker_gone(http, name), 20, what="the idle worker to stop")
    spare = wait_for(lambda: ready_spare(http, mod), 20, what="a spare with the module")
    assert spare["pid"] == imports(log)[-1][0] != pid


def test_spares_count_against_capacity(own_server, monkeypatch, name):
    s = own_server(FLASH_JUPYTER_MAX_WORKERS="1")
    use_server(s, monkeypatch)
    http = s.http()

    def provider():
        return http.get("/v1/info").json()["provider"]

    boot = wait_for(lambda: ready_spare(http), what="the boot spare")
    assert provider()["in_use"] == 1  # the spare holds the host's only slot

    @Endpoint(name=name, idle_timeout=2)
    def pid():
        return os.getpid()

    job = pid.submit()
    assert job.result(timeout=30) == boot["pid"]  # it took the spare (and its slot)
    # With the worker up, the host is full: the spare waits for a slot instead.
    wait_for(lambda: any("at capacity" in sp["state"] for sp in spares(http)),
             what="the spare to wait for capacity")  # fmt: skip
    assert provider()["in_use"] == 1 and ready_spare(http) is None
    wait_for(lambda: worker_gone(http, name), 20, what="the idle worker to stop")
    wait_for(lambda: ready_spare(http), 20, what="the spare to come back")
    assert provider()["in_use"] == 1

    # An endpoint that needs a fresh interpreter (PYTHON* variables) on a full host: the
    # spare gives its slot up rather than throttling a worker.
    spare_pid = ready_spare(http)["pid"]
    fresh = Endpoint(name=name + "-fresh", idle_timeout=2, env={"PYTHONFJTEST": "1"})(
        lambda: os.getpid()
    )
    job = fresh.submit()
    assert job.result(timeout=30) != spare_pid and job.info()["spare"] is None
    wait_for(lambda: not os.path.exists(f"/proc/{spare_pid}") or _zombie(spare_pid),
             what="the spare to stop")  # fmt: skip
    assert provider()["in_use"] == 1


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_preload_names_are_checked():
    assert Endpoint(name="x", preload="torch,numpy.linalg").config.preload == (
        "torch",
        "numpy.linalg",
    )
    with pytest.raises(ConfigError, match="preload names modules to import"):
        Endpoint(name="x", preload=["not a module"])
    with pytest.raises(ConfigError, match="'numpy-1'"):
        Endpoint(name="x", preload=["numpy-1"])


def test_status_text_shows_spares():
    spares = [
        {"environment": "py311-abc", "state": "ready", "preload": ["numpy", "torch"],
         "preloaded": ["numpy", "torch"], "failed": []},
        {"environment": "plain", "state": "starting", "preload": ["pandas"], "preloaded": []},
    ]  # fmt: skip
    text = format_status([], None, spares)
    assert "spare (environment py311-abc, preloaded: numpy, torch): ready" in text
    assert "spare (environment plain, importing: pandas): starting" in text
    assert "billed to no endpoint" in text

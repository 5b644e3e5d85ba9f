"""The data directory and the spool folder stay private without taking over folders that
are not flash-jupyter's, and a data directory keeps its URL and token across restarts."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from conftest import free_port, make_server, use_server, wait_for

from flash_jupyter import client as fj_client
from flash_jupyter import paths

SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(
    not (SHM.is_dir() and os.access(SHM, os.W_OK)), reason="no writable /dev/shm"
)


def predictable_spool(data_dir: Path) -> Path:
    """The documented default: /dev/shm/flash-jupyter-<uid>-<hash of the data dir>."""
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return SHM / f"flash-jupyter-{os.getuid()}-{tag}"


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def assert_private_folder(p: Path) -> None:
    st = os.lstat(p)
    assert stat.S_ISDIR(st.st_mode), f"{p} is not a real folder"
    assert st.st_uid == os.getuid()
    assert stat.S_IMODE(st.st_mode) == 0o700


@pytest.fixture
def shm_cleanup() -> Iterator[list[Path]]:
    """Paths in /dev/shm this test made or planted, removed at the end (links unlinked)."""
    made: list[Path] = []
    yield made
    for p in made:
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- 1: the spool folder


@needs_shm
def test_control_plane_refuses_a_spool_folder_others_can_write(tmp_path, monkeypatch, shm_cleanup):
    s = make_server(tmp_path / "cp", FLASH_JUPYTER_SPARE_WORKERS="0")
    planted = predictable_spool(s.data_dir)
    shm_cleanup.append(planted)
    planted.mkdir()
    os.chmod(planted, 0o777)  # as another local user would leave it, to plant files in it
    try:
        s.start()
        spool = Path(s.info()["spool"])
        shm_cleanup.append(spool)
        assert spool != planted
        assert_private_folder(spool)
        assert mode(planted) == 0o777, "the planted folder was changed"
        assert not any(planted.iterdir())
        log = s.log()
        assert str(planted) in log and "0777" in log  # says which folder and why

        c = use_server(s, monkeypatch)  # a client on this host writes into the private one
        assert c.spool is not None and c.spool.root == str(spool)
        assert not any(planted.iterdir())
        fj_client.reset_client()

        s.stop()
        s.start()
        assert s.info()["spool"] == str(spool), "the spool must stay the same across restarts"
        assert mode(planted) == 0o777
    finally:
        fj_client.reset_client()
        s.stop()


@needs_shm
def test_spool_folder_that_is_a_symlink_is_refused(tmp_path, capfd, shm_cleanup):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    target = tmp_path / "elsewhere"
    target.mkdir()
    os.chmod(target, 0o755)
    planted = predictable_spool(data)
    shm_cleanup.append(planted)
    planted.symlink_to(target)

    spool = paths.spool_dir(data)
    shm_cleanup.append(spool)
    assert spool != planted
    assert_private_folder(spool)
    assert planted.is_symlink() and mode(target) == 0o755, "the link's target was changed"
    err = capfd.readouterr().err
    assert str(planted) in err and "symbolic link" in err
    # Recorded in the data dir, so later starts (and jobs queued meanwhile) keep it.
    assert paths.spool_dir(data) == spool
    assert mode(data / "server.json") == 0o600


@needs_shm
@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_spool_folder_of_another_user_is_refused(tmp_path, capfd, shm_cleanup):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    planted = predictable_spool(data)
    shm_cleanup.append(planted)
    planted.mkdir(mode=0o700)
    os.chown(planted, 65534, 65534)  # nobody's: a private folder, but not ours

    spool = paths.spool_dir(data)
    shm_cleanup.append(spool)
    assert spool != planted
    assert_private_folder(spool)
    st = os.lstat(planted)
    assert st.st_uid == 65534 and stat.S_IMODE(st.st_mode) == 0o700
    assert "uid 65534" in capfd.readouterr().err


@needs_shm
def test_a_private_spool_folder_is_used_as_named(tmp_path, capfd, shm_cleanup):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    default = predictable_spool(data)
    shm_cleanup.append(default)
    assert paths.spool_dir(data) == default  # nothing planted: the documented default
    assert_private_folder(default)
    assert paths.spool_dir(data) == default  # it exists now, and it is ours
    assert capfd.readouterr().err == ""


def test_private_dir_problem_names_what_is_wrong(tmp_path):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    assert paths.private_dir_problem(d) is None
    other = os.getuid() + 1
    assert f"uid {os.getuid()}" in paths.private_dir_problem(d, uid=other)
    os.chmod(d, 0o750)
    assert "0750" in paths.private_dir_problem(d)
    link = tmp_path / "link"
    link.symlink_to(d)
    os.chmod(d, 0o700)
    assert "symbolic link" in paths.private_dir_problem(link)


# ---------------------------------------------------------------- 2: an existing data dir


def test_existing_data_dir_keeps_its_mode_and_gets_a_warning(tmp_path):
    s = make_server(tmp_path / "shared", FLASH_JUPYTER_SPARE_WORKERS="0")
    os.chmod(s.data_dir, 0o755)
    try:
        s.start()
        assert mode(s.data_dir) == 0o755, "the control plane changed a folder it did not make"
        assert mode(s.data_dir / "runtime.json") == 0o600
        assert mode(s.data_dir / "server.json") == 0o600
        log = s.log()
        assert log.count(f"{s.data_dir} has mode 0755") == 1, log  # once, not per caller
    finally:
        s.stop()


def test_secret_files_are_not_written_through_a_planted_link(tmp_path):
    data = tmp_path / "open"
    data.mkdir()
    os.chmod(data, 0o777)  # an existing folder others can write to: left as it is
    bait = tmp_path / "bait"
    bait.write_text("")
    (data / f"runtime.{os.getpid()}.tmp").symlink_to(bait)  # the old temporary name
    paths.write_runtime({"token": "s3cret"}, data)
    assert bait.read_text() == ""
    assert paths.read_runtime(data) == {"token": "s3cret"}
    assert mode(data / "runtime.json") == 0o600 and not (data / "runtime.json").is_symlink()


def test_new_data_dir_is_created_private(tmp_path):
    data = tmp_path / "new" / "data"
    paths.ensure_private_dir(data)
    assert mode(data) == 0o700


# ---------------------------------------------------------------- 3: stable URL and token


@pytest.fixture
def plain_server(tmp_path) -> Iterator:
    """Starts ``python -m flash_jupyter.server`` with only the options given (no explicit
    ports or token, unlike conftest's Server); stops what it started at the end."""
    procs: list[subprocess.Popen] = []
    data = tmp_path / "data"
    data.mkdir(mode=0o700)

    def start(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict]:
        ready = data / f"ready-{secrets.token_hex(4)}.json"
        full = {**os.environ, "FLASH_JUPYTER_SPARE_WORKERS": "0", **(env or {})}
        full.pop("FLASH_JUPYTER_URL", None)
        if "FLASH_JUPYTER_TOKEN" not in (env or {}):
            full.pop("FLASH_JUPYTER_TOKEN", None)
        with open(data / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flash_jupyter.server", "--data-dir", str(data),
                 "--exit-with-parent", str(os.getpid()), "--ready-file", str(ready), *args],
                env=full, stdout=log, stderr=log,
            )  # fmt: skip
        procs.append(proc)
        wait_for(lambda: ready.exists() or proc.poll() is not None, timeout=30,
                 what="control plane ready")  # fmt: skip
        assert proc.poll() is None, (data / "server.log").read_text()[-3000:]
        return proc, json.loads((data / "runtime.json").read_text())

    def stop(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    start.stop = stop
    start.data = data
    yield start
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def port_of(info: dict) -> int:
    return urlparse(info["url"]).port


def test_restart_keeps_url_wire_port_and_token(plain_server):
    data = plain_server.data
    p1, first = plain_server()
    saved = json.loads((data / "server.json").read_text())
    assert mode(data / "server.json") == 0o600
    assert (saved["port"], saved["wire_port"], saved["token"]) == (
        port_of(first), first["wire_port"], first["token"],
    )  # fmt: skip
    plain_server.stop(p1)

    p2, second = plain_server()
    assert second["pid"] != first["pid"]
    assert (second["url"], second["wire_port"], second["token"]) == (
        first["url"], first["wire_port"], first["token"],
    )  # fmt: skip

    # An outside HTTP caller configured against the first run still gets in.
    def answers() -> bool:
        try:
            r = httpx.get(first["url"] + "/v1/info", timeout=2,
                          headers={"Authorization": f"Bearer {first['token']}"})  # fmt: skip
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    wait_for(answers, timeout=20, what="HTTP API with the old URL and token")
    plain_server.stop(p2)

    p3, third = plain_server("--new-token")
    assert third["token"] != first["token"]
    assert (third["url"], third["wire_port"]) == (first["url"], first["wire_port"])
    plain_server.stop(p3)
    p4, fourth = plain_server()
    assert fourth["token"] == third["token"], "the new token is the one kept from then on"
    plain_server.stop(p4)


def test_taken_port_falls_back_and_explicit_options_win(plain_server):
    data = plain_server.data
    p1, first = plain_server()
    plain_server.stop(p1)
    port = port_of(first)

    with socket.socket() as squatter:  # someone else listens on the saved port meanwhile
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        p2, second = plain_server()
        assert port_of(second) != port
        assert (second["wire_port"], second["token"]) == (first["wire_port"], first["token"])
        assert f"port {port}" in (data / "server.log").read_text()
        plain_server.stop(p2)
    assert json.loads((data / "server.json").read_text())["port"] == port  # still preferred
    p3, third = plain_server()
    assert third["url"] == first["url"]
    plain_server.stop(p3)

    new_port, new_wire = free_port(), free_port()
    p4, fourth = plain_server("--port", str(new_port), "--wire-port", str(new_wire),
                              "--token=explicit-token")  # fmt: skip
    assert (port_of(fourth), fourth["wire_port"], fourth["token"]) == (
        new_port, new_wire, "explicit-token",
    )  # fmt: skip
    plain_server.stop(p4)

    p5, fifth = plain_server(env={"FLASH_JUPYTER_TOKEN": "from-the-environment"})
    assert fifth["token"] == "from-the-environment"
    assert port_of(fifth) == new_port, "the ports last asked for are kept"
    plain_server.stop(p5)


def test_new_token_conflicts_with_an_explicit_token(plain_server):
    out = subprocess.run(
        [sys.executable, "-m", "flash_jupyter.server", "--data-dir", str(plain_server.data),
         "--new-token", "--token=abc"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "--new-token cannot be used with" in out.stderr
    assert not (plain_server.data / "runtime.json").exists()


def test_cli_start_new_token(tmp_path):
    home = tmp_path / "home"
    exe = Path(sys.executable).with_name("flash-jupyter")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flash_jupyter.cli"]
    env = {**os.environ, "FLASH_JUPYTER_HOME": str(home), "FLASH_JUPYTER_SPARE_WORKERS": "0"}
    env.pop("FLASH_JUPYTER_URL", None)
    env.pop("FLASH_JUPYTER_TOKEN", None)

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *args], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip

    try:
        assert cli("start").returncode == 0
        first = paths.read_runtime(home)
        busy = cli("start", "--new-token")  # a running one keeps its token: say so
        assert busy.returncode == 1 and "shutdown" in busy.stderr
        assert paths.read_runtime(home)["token"] == first["token"]
        assert cli("shutdown").returncode == 0
        assert cli("start", "--new-token").returncode == 0
        second = paths.read_runtime(home)
        assert second["token"] != first["token"] and second["url"] == first["url"]
    finally:
        cli("shutdown")

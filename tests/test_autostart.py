"""With no FLASH_JUPYTER_URL, the first use starts one detached, machine-local control plane,
found by every later process through the runtime file in FLASH_JUPYTER_HOME."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import wait_for

from flash_jupyter import Endpoint
from flash_jupyter import client as fj_client


def pid_alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its parent, is not)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def servers_for(home: Path) -> list[int]:
    """Pids of control plane processes serving this data dir."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flash_jupyter.server" in argv and str(home).encode() in argv:
            found.append(int(d.name))
    return found


def shutdown(home: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("flash-jupyter")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flash_jupyter.cli"]
    env = {**os.environ, "FLASH_JUPYTER_HOME": str(home)}
    env.pop("FLASH_JUPYTER_URL", None)
    env.pop("FLASH_JUPYTER_TOKEN", None)
    return subprocess.run([*cmd, "shutdown"], env=env, capture_output=True, text=True, timeout=30)


def test_first_use_starts_one_shared_control_plane(monkeypatch, tmp_path, name):
    home = tmp_path / "home"
    monkeypatch.delenv("FLASH_JUPYTER_URL", raising=False)
    monkeypatch.delenv("FLASH_JUPYTER_TOKEN", raising=False)
    monkeypatch.setenv("FLASH_JUPYTER_HOME", str(home))
    fj_client.reset_client()
    assert not (home / "runtime.json").exists()
    started_pid = None
    try:
        client = fj_client.get_client()
        runtime = home / "runtime.json"
        assert runtime.exists()
        assert stat.S_IMODE(runtime.stat().st_mode) == 0o600
        assert stat.S_IMODE(home.stat().st_mode) == 0o700
        info = json.loads(runtime.read_text())
        started_pid = int(info["pid"])
        assert started_pid != os.getpid() and pid_alive(started_pid)
        assert info["token"] and client.token == info["token"]
        assert servers_for(home) == [started_pid]

        @Endpoint(name=name, idle_timeout=5)
        def parent_pid():
            import os

            return os.getppid()

        assert parent_pid() == started_pid  # its worker is a child of that control plane

        # Another process finds the same control plane through the runtime file.
        script = textwrap.dedent(
            f"""
            import json
            from flash_jupyter import Endpoint
            from flash_jupyter.client import get_client

            @Endpoint(name={name!r}, idle_timeout=5)
            def parent_pid():
                import os
                return os.getppid()

            print(json.dumps({{"worker_parent": parent_pid(),
                               "server": get_client().info["pid"]}}))
            """
        )
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr
        seen = json.loads(out.stdout.strip().splitlines()[-1])
        assert seen == {"worker_parent": started_pid, "server": started_pid}
        assert json.loads(runtime.read_text())["pid"] == started_pid
        assert servers_for(home) == [started_pid]  # no second control plane
    finally:
        fj_client.reset_client()
        t0 = time.monotonic()
        result = shutdown(home)
        took = time.monotonic() - t0
        if started_pid is not None:
            wait_for(lambda: not pid_alive(started_pid), timeout=20, what="control plane stopped")
    assert result.returncode == 0, result.stderr
    assert str(started_pid) in result.stdout
    # Stopping a control plane with one idle-ish worker takes well under its 10 s patience.
    assert took < 8, f"flash-jupyter shutdown took {took:.1f} s"
    assert not (home / "runtime.json").exists()
    assert servers_for(home) == []

"""A real Jupyter process for the tests (``jupyter server`` or ``jupyter lab``), started the
same way everywhere: on 127.0.0.1 with a free port, its own token, its own config, data,
runtime and root folders under the test's tmp folder, and none of the caller's
``FLASH_JUPYTER_*`` variables (each test says which control plane the server should find).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from conftest import free_port


@dataclass
class JupyterApp:
    """A running Jupyter server process and how to reach it."""

    port: int
    token: str
    root: Path
    log_path: Path
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, chars: int = 4000) -> str:
        """The end of its output, for a failure's message."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (Jupyter shuts its kernels down), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_jupyter(
    module: str,
    tmp: Path,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> JupyterApp:
    """``python -m <module>`` (``jupyter_server`` or ``jupyterlab``) with its folders under
    ``tmp`` (``config``, ``data``, ``runtime``, ``root``; a caller may fill ``tmp/config`` or
    ``tmp/root`` first), the caller's environment without ``FLASH_JUPYTER_*`` plus ``env``,
    and ``args`` after the common ones; returns once ``/api/status`` answers."""
    folders = {d: tmp / d for d in ("config", "data", "runtime", "root")}
    for d in folders.values():
        d.mkdir(parents=True, exist_ok=True)
    port, token = free_port(), secrets.token_hex(16)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FLASH_JUPYTER_")}
    full_env |= {
        "JUPYTER_CONFIG_DIR": str(folders["config"]),
        "JUPYTER_DATA_DIR": str(folders["data"]),
        "JUPYTER_RUNTIME_DIR": str(folders["runtime"]),
        **(env or {}),
    }
    argv = [sys.executable, "-m", module, "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={folders['root']}", f"--IdentityProvider.token={token}",
            "--ServerApp.open_browser=False", *args]  # fmt: skip
    if os.geteuid() == 0:
        argv.append("--allow-root")
    log_path = tmp / f"{module}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=folders["root"]
        )
    app = JupyterApp(port, token, folders["root"], log_path, proc)
    try:
        wait_up(app, timeout)
    except BaseException:
        app.stop()
        raise
    return app


def wait_up(app: JupyterApp, timeout: float) -> None:
    """Until ``/api/status`` answers 200; fails at once, with the log, if the process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if app.proc.poll() is not None:
            raise AssertionError(f"{app.proc.args[2]} exited ({app.proc.returncode}):\n{app.log()}")
        try:
            r = httpx.get(f"{app.url}/api/status",
                          headers={"Authorization": f"token {app.token}"}, timeout=2)  # fmt: skip
            if r.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{app.proc.args[2]} did not answer /api/status:\n{app.log()}")
        time.sleep(0.1)

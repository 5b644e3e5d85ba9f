"""The first milliseconds of a control plane, before the heavy imports.

Binding the sockets and starting the spare worker come first, with only the standard
library loaded: the spare (an interpreter importing the worker) then starts while this
process imports asyncio, SQLite and the control plane, and is ready about when they are.
``flash-jupyter serve`` and ``python -m flash_jupyter.server`` both enter here.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .. import envvars


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flash-jupyter serve", description="Run the control plane.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="HTTP port (default: the data dir's saved one, else any free port; 0: a new one)",
    )
    p.add_argument(
        "--wire-port",
        type=int,
        default=None,
        help="binary wire port (default: the saved one, else any; 0: a new one)",
    )
    p.add_argument(
        "--token",
        default=envvars.get("FLASH_JUPYTER_TOKEN"),
        help="bearer token (default: $FLASH_JUPYTER_TOKEN, else the data dir's saved one)",
    )
    p.add_argument(
        "--new-token",
        action="store_true",
        help="make a new random token instead of the saved one, and keep it from now on",
    )
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument(
        "--idle-shutdown",
        type=float,
        default=None,
        help="stop after this many seconds with no workers, no queued jobs and no clients",
    )
    p.add_argument(
        "--provider",
        choices=("local", "ray"),
        default=None,
        help="where workers run: local processes, or actors on a Ray cluster "
        "(default: $FLASH_JUPYTER_PROVIDER, else local)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="the Ray cluster for --provider ray: auto, HOST:6379 or ray://HOST:10001 "
        "(default: $RAY_ADDRESS, else auto)",
    )
    p.add_argument(
        "--advertise-host",
        default=None,
        help="the address workers on other machines connect to (default: "
        "$FLASH_JUPYTER_ADVERTISE_HOST, else --host, or this node's IP when --host is 0.0.0.0)",
    )
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID")
    p.add_argument("--ready-file", type=Path, default=None)
    return p


def bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(512)
    s.setblocking(False)
    return s


def exclusive(data_dir: Path) -> Any:
    """Hold the data dir's lock for this process's life: one control plane per data dir."""
    import fcntl

    f = open(data_dir / "serve.lock", "a+")  # noqa: SIM115 - held until shutdown
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        from .. import paths

        other = paths.read_runtime(data_dir) or {}
        raise SystemExit(
            f"flash-jupyter: a control plane already runs on {data_dir} "
            f"(pid {other.get('pid', '?')}, {other.get('url', '?')})"
        ) from None
    return f


def spawn_spare(data_dir: Path, host: str, port: int, token: str) -> subprocess.Popen | None:
    if not envvars.get("FLASH_JUPYTER_SPARE_WORKERS"):
        return None
    from ..credentials import spare_credential

    nonce = secrets.token_hex(8)
    env = envvars.worker_env(
        dict(os.environ),
        json.dumps({"spare": True, "host": host, "port": port, "nonce": nonce}),
        spare_credential(token, nonce),
    )
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "spare.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flash_jupyter.worker"],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    proc._flash_nonce = nonce  # type: ignore[attr-defined]
    return proc


def listen(host: str, asked: int | None, saved: Any, what: str) -> tuple[socket.socket, int]:
    """A listener on the port asked for, else on the saved one, else on any free port.

    Returns it with the port to save: a saved port that someone else holds now is kept for
    the next start, and this run takes a free one (and says so).
    """
    if asked is not None:
        sock = bind(host, asked)
        return sock, sock.getsockname()[1]
    if isinstance(saved, int) and 0 < saved < 65536:
        try:
            return bind(host, saved), saved
        except OSError as e:
            sock = bind(host, 0)
            print(
                f"flash-jupyter: the saved {what} {saved} is not available ({e.strerror}); "
                f"using {what} {sock.getsockname()[1]} for this run",
                file=sys.stderr,
                flush=True,
            )
            return sock, saved
    sock = bind(host, 0)
    return sock, sock.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    p = parser()
    a = p.parse_args(argv)
    if a.new_token and a.token:
        p.error("--new-token cannot be used with --token or FLASH_JUPYTER_TOKEN")
    provider = a.provider or envvars.get("FLASH_JUPYTER_PROVIDER")
    if provider not in ("local", "ray"):
        p.error(f"FLASH_JUPYTER_PROVIDER={provider!r} is not a provider; use local or ray")
    options: dict[str, Any] = {}
    if provider == "ray":
        options = {
            "address": a.ray_address or envvars.get("RAY_ADDRESS") or "auto",
            "advertise_host": a.advertise_host or envvars.get("FLASH_JUPYTER_ADVERTISE_HOST"),
        }
    elif a.ray_address or a.advertise_host:
        p.error("--ray-address and --advertise-host go with --provider ray")
    from .. import paths

    data_dir = paths.ensure_private_dir(Path(a.data_dir or paths.home()))
    lock = exclusive(data_dir)
    # The token and ports stay the same across restarts (server.json), unless asked otherwise.
    saved = paths.read_settings(data_dir)
    keep = None if a.new_token else saved.get("token")
    token = a.token or (keep if isinstance(keep, str) and keep else secrets.token_urlsafe(24))
    http_sock, http_port = listen(a.host, a.port, saved.get("port"), "port")
    wire_sock, wire_port = listen(a.host, a.wire_port, saved.get("wire_port"), "wire port")
    spare = None
    if provider == "local":  # the local provider's first spare worker process
        spare = spawn_spare(data_dir, a.host, wire_sock.getsockname()[1], token)
    paths.update_settings(data_dir, host=a.host, port=http_port, wire_port=wire_port, token=token)

    from .app import serve

    serve(
        host=a.host,
        token=token,
        data_dir=data_dir,
        idle_shutdown=a.idle_shutdown,
        parent_pid=a.exit_with_parent,
        ready_file=a.ready_file,
        http_sock=http_sock,
        wire_sock=wire_sock,
        lock=lock,
        spare=spare,
        provider=provider,
        provider_options=options,
    )

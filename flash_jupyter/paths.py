"""Where flash-jupyter keeps its files, and the runtime file that finds the control plane."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def home() -> Path:
    """The data dir: ``FLASH_JUPYTER_HOME``, else the user's data dir."""
    env = os.environ.get("FLASH_JUPYTER_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "darwin":
        base = Path("~/Library/Application Support").expanduser()
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser()
    return base / "flash-jupyter"


def ensure_private_dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, 0o700)
    return p


def runtime_file(data_dir: Path | None = None) -> Path:
    return (data_dir or home()) / "runtime.json"


def write_runtime(info: dict[str, Any], data_dir: Path) -> Path:
    """Write the runtime file atomically, readable by the user alone."""
    path = runtime_file(data_dir)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(info, f)
    os.replace(tmp, path)
    return path


def read_runtime(data_dir: Path | None = None) -> dict[str, Any] | None:
    try:
        return json.loads(runtime_file(data_dir).read_text())
    except (OSError, ValueError):
        return None


def boot_id() -> str:
    """Identifies this machine's current boot: equal boot ids can share /dev/shm files."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        import socket

        return socket.gethostname()


def spool_dir(data_dir: Path) -> Path:
    """Shared-memory spool for large buffers (tmpfs when the OS has one).

    One per data dir, stable across restarts: queued jobs keep referring to their files.
    """
    import hashlib

    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else data_dir / "spool"
    tag = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:10]
    return ensure_private_dir(base / f"flash-jupyter-{os.getuid()}-{tag}")

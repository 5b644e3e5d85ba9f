"""Dependency environments: one virtual environment per distinct set of dependencies.

Keyed by a hash of the Python version and the dependency list, built once (under a file
lock, so two workers never build the same one twice) and shared by every worker that needs
it: the "pre-installed in the image" of Runpod. The environment sees what the control
plane's interpreter sees (a .pth file lists its package folders), after its own packages,
so flash-jupyter and the serializer are there, at the same versions, without reinstalling.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path


class EnvironmentError_(RuntimeError):
    """Building a dependency environment failed; the message carries pip's last lines."""


def env_key(dependencies: tuple[str, ...]) -> str:
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    # The environment layers on top of this interpreter's environment (see _parent_paths).
    key = json.dumps([sorted(dependencies), sys.prefix])
    return f"{py}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _parent_paths() -> list[str]:
    """Where this interpreter finds packages (site-packages, editable installs), so a
    dependency environment sees flash-jupyter and its serializer at the same versions."""
    stdlib = {os.path.realpath(p) for p in (sysconfig.get_paths()["stdlib"],
                                            sysconfig.get_paths()["platstdlib"])}  # fmt: skip
    out = []
    for p in sys.path:
        if not p or not os.path.isdir(p):
            continue
        real = os.path.realpath(p)
        if real in stdlib or real.endswith("lib-dynload") or real in out:
            continue
        out.append(real)
    return out


def ensure_environment(
    data_dir: Path, dependencies: tuple[str, ...], system_dependencies: tuple[str, ...] = ()
) -> str:
    """Return the python executable of the environment for ``dependencies``, building it
    if needed."""
    missing = [d for d in system_dependencies if shutil.which(d) is None]
    if missing:
        raise EnvironmentError_(
            f"system dependencies not installed on this host: {', '.join(missing)} "
            f"(the local provider does not install system packages; install them first)"
        )
    if not dependencies:
        return sys.executable
    root = data_dir / "envs"
    root.mkdir(parents=True, exist_ok=True)
    target = root / env_key(dependencies)
    python = target / "bin" / "python"
    ready = target / ".ready"
    with open(root / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists():
            return str(python)
        if target.exists():
            shutil.rmtree(target)
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(target)],
            check=True,
            capture_output=True,
        )
        site_dir = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        # After the environment's own packages: what the control plane's interpreter sees.
        Path(site_dir, "_flash_jupyter_parent.pth").write_text("\n".join(_parent_paths()) + "\n")
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install",
               "--disable-pip-version-check", "--no-input", *dependencies]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            shutil.rmtree(target, ignore_errors=True)
            raise EnvironmentError_(f"installing dependencies {list(dependencies)} failed:\n{tail}")
        ready.write_text(json.dumps({"dependencies": list(dependencies)}))
        return str(python)

"""Dependency environments: one virtual environment per distinct set of dependencies.

Keyed by a hash of the Python version and the dependency list, built once (under a file
lock, so two workers never build the same one twice) and shared by every worker that needs
it: the "pre-installed in the image" of Runpod. The environment sees the base interpreter's
site-packages, so flash-jupyter and the serializer are there without reinstalling.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


class EnvironmentError_(RuntimeError):
    """Building a dependency environment failed; the message carries pip's last lines."""


def env_key(dependencies: tuple[str, ...]) -> str:
    py = f"py{sys.version_info[0]}{sys.version_info[1]}"
    h = hashlib.sha256(json.dumps(sorted(dependencies)).encode()).hexdigest()[:12]
    return f"{py}-{h}"


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
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(target)],
            check=True,
            capture_output=True,
        )
        cmd = [sys.executable, "-m", "pip", "--python", str(python), "install",
               "--disable-pip-version-check", "--no-input", *dependencies]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            shutil.rmtree(target, ignore_errors=True)
            raise EnvironmentError_(f"installing dependencies {list(dependencies)} failed:\n{tail}")
        ready.write_text(json.dumps({"dependencies": list(dependencies)}))
        return str(python)

"""The Ray actor that holds one worker's place on a node (the Ray provider's remote half).

It runs on the node Ray placed it on, with the resources it asked for: Ray sets
``CUDA_VISIBLE_DEVICES`` for it, and the worker process it starts (``python -m
flash_jupyter.worker``, as the local provider starts one) inherits the variable, so the
worker sees exactly the GPUs Ray gave the actor. The worker is a process of its own, not a
thread of the actor: it cancels jobs with SIGINT on its main thread and exits when the wire
drops, which an actor's threads cannot do.

Imports only the standard library, Ray, and flash-jupyter's ``envvars``, ``paths`` and
``exit_reason``: this module is what the nodes load.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from typing import Any

import ray

from .. import envvars, paths
from .exit_reason import exit_reason


def _gpu_names(ids: list[str]) -> list[str]:
    """The driver's names of these GPUs (``nvidia-smi -i``), or [] without a driver."""
    smi = shutil.which("nvidia-smi")
    if not smi or not ids:
        return []
    try:
        out = subprocess.run(
            [smi, "-i", ",".join(ids), "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.strip().splitlines() if line.strip()]


def _reads(marker: tuple[str, str] | None) -> bool:
    """Whether the file at ``marker[0]`` holds ``marker[1]`` (the spool is shared)."""
    if not marker:
        return False
    path, nonce = marker
    try:
        with open(path) as f:
            return f.read(len(nonce) + 1) == nonce
    except OSError:
        return False


def log_dir() -> str:
    """Where a node keeps its workers' logs (what they print outside any job)."""
    return os.path.join(tempfile.gettempdir(), f"flash-jupyter-ray-{os.getuid()}", "logs")


class WorkerActor:
    """One worker's place: ``placed`` (where and with what), ``spawn``, ``wait``, ``signal``.

    Threaded (``max_concurrency``): ``wait`` blocks while ``signal`` must still answer."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.log_path = ""

    def placed(self, marker: tuple[str, str] | None) -> dict[str, Any]:
        """Where Ray put this actor and the devices it got (names from the driver).
        ``marker``: (path, nonce) of the control plane's spool marker; this node shares the
        spool when it reads that nonce there."""
        ctx = ray.get_runtime_context()
        ids = [str(g) for g in ray.get_gpu_ids()]
        return {
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(),
            "gpu_ids": ids,
            "gpu_names": _gpu_names(ids),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "same_host": _reads(marker),
            "python": sys.executable,
        }

    def environment(self, deps: list[str], data_dir: str | None, endpoint: str) -> list[Any]:
        """The endpoint's dependency environment on this node, built now if it is not there
        (``providers/environments.py``, as the local provider builds it, in ``data_dir`` or
        the node's own data directory): [its python, "pre-installed" or "installed at
        request time"]."""
        from pathlib import Path

        from .environments import prepare

        env = prepare(Path(data_dir) if data_dir else paths.home(), deps, (), (endpoint,))
        return [env.python, env.source]

    def spawn(
        self, worker: str, credential: str, user_env: dict[str, str], name: str, python: str
    ) -> int:
        """Start the worker process; its pid. Ray's ``CUDA_VISIBLE_DEVICES`` wins over the
        endpoint's ``env`` (the worker must see the devices it was given, no others)."""
        user_env = {k: v for k, v in user_env.items() if k != "CUDA_VISIBLE_DEVICES"}
        env = envvars.worker_env({**os.environ, **user_env}, worker, credential)
        folder = log_dir()
        os.makedirs(folder, exist_ok=True)
        self.log_path = os.path.join(folder, f"{name}.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [python or sys.executable, "-m", "flash_jupyter.worker"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        return self.proc.pid

    def wait(self) -> tuple[int | None, str]:
        """Block until the worker process exits: (return code, why in words)."""
        assert self.proc is not None
        rc = self.proc.wait()
        return rc, exit_reason(rc, self.log_path)

    def signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signum)
            except ProcessLookupError:
                pass

    def ping(self) -> bool:
        return True


RemoteWorkerActor = ray.remote(max_concurrency=4)(WorkerActor)

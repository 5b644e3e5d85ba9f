"""Workers as OS processes on this machine.

GPUs: on a host with NVIDIA GPUs, each worker gets the devices it asked for through
``CUDA_VISIBLE_DEVICES``, matched by the names ``nvidia-smi`` reports. Where the host has no
GPU of an acceptable type, the worker runs on the CPU and is labelled emulated
("A100 (emulated on CPU)"), unless ``FLASH_JUPYTER_STRICT_GPU=1`` makes that an error.
Capacity: at most ``max_workers`` processes at once (``FLASH_JUPYTER_MAX_WORKERS``); a
worker that cannot start for lack of a slot or of a free GPU is Throttled.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .. import catalog, credentials, envvars
from ..config import EndpointConfig
from .base import Allocation, PlacementError, WorkerSpec
from .environments import ensure_environment

SPARE_DELAY = 0.5  # seconds after an adoption before the next spare may start
SPARE_PATIENCE = 10.0  # ... and at the latest, busy or not
SPARE_WAIT = 2.0  # at most this long for a spare that is starting up


def detect_gpus() -> list[tuple[int, str, catalog.HardwareType | None]]:
    """(index, nvidia-smi name, catalogue type) for each NVIDIA GPU on this host."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        idx, _, name = line.partition(",")
        if idx.strip().isdigit():
            gpus.append((int(idx), name.strip(), catalog.match_smi_name(name.strip())))
    return gpus


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1][:300] if lines else ""
    except OSError:
        return ""


class LocalProvider:
    name = "local"

    def __init__(
        self,
        data_dir: Path,
        max_workers: int | None = None,
        strict_gpu: bool | None = None,
        gpus: list[tuple[int, str, catalog.HardwareType | None]] | None = None,
    ):
        self.data_dir = data_dir
        self.max_workers = max_workers or (
            envvars.get("FLASH_JUPYTER_MAX_WORKERS") or max(8, 4 * (os.cpu_count() or 2))
        )
        if strict_gpu is None:
            strict_gpu = envvars.get("FLASH_JUPYTER_STRICT_GPU")
        self.strict_gpu = strict_gpu
        self.gpus = detect_gpus() if gpus is None else gpus
        self.free_gpus = {idx for idx, _, _ in self.gpus}
        self.in_use = 0
        self.spare_workers: bool = envvars.get("FLASH_JUPYTER_SPARE_WORKERS")
        self._spare_proc: Any = None
        self._spare_conn: Any = None
        self._spare_pending: Any = None
        self._spare_task: Any = None
        self._spare_ready: Any = None  # an asyncio.Event, made on the loop
        self._closing = False
        self._wire: tuple[str, int] = ("127.0.0.1", 0)
        self._token = ""
        self._quiet: Callable[[], bool] = lambda: True

    # -- placement
    def _gpu_indices_for(self, types: tuple[str, ...]) -> list[int]:
        return [idx for idx, _, hw in self.gpus if hw is not None and hw.name in types]

    def allocate(self, config: EndpointConfig) -> Allocation | None:
        if self.in_use >= self.max_workers:
            return None
        if config.gpu:
            # One type per worker, in the endpoint's order of preference.
            n = config.gpu_count
            host_has = [t for t in config.gpu if len(self._gpu_indices_for((t,))) >= n]
            if host_has:
                for t in host_has:
                    free = [i for i in self._gpu_indices_for((t,)) if i in self.free_gpus]
                    if len(free) >= n:
                        devices = free[:n]
                        self.free_gpus.difference_update(devices)
                        self.in_use += 1
                        label = t + (f" x{n}" if n > 1 else "")
                        return Allocation(label, False, devices, t)
                return None  # the host has them, all busy: Throttled
            if self.strict_gpu:
                have = ", ".join(n for _, n, _ in self.gpus) or "no NVIDIA GPU"
                raise PlacementError(
                    f"endpoint {config.name!r} asks for {config.gpu_count} x "
                    f"{' or '.join(config.gpu)} but this host has {have}; "
                    f"FLASH_JUPYTER_STRICT_GPU=1 forbids emulating it on the CPU"
                )
            self.in_use += 1
            label = config.gpu[0] + (f" x{config.gpu_count}" if config.gpu_count > 1 else "")
            return Allocation(f"{label} (emulated on CPU)", True, [], config.gpu[0])
        self.in_use += 1
        return Allocation(config.cpu or catalog.DEFAULT_CPU, False, [])

    def release(self, allocation: Allocation) -> None:
        self.in_use = max(0, self.in_use - 1)
        self.free_gpus.update(allocation.devices)

    def would_emulate(self, config: EndpointConfig) -> bool:
        """The endpoint asks for a GPU type this host does not have (it would run on CPU)."""
        return bool(config.gpu) and not any(hw and hw.name in config.gpu for _, _, hw in self.gpus)

    # -- processes
    async def prepare(
        self,
        wire: tuple[str, int],
        token: str,
        quiet: Callable[[], bool] | None = None,
        prespawned: Any = None,
    ) -> None:
        """Keep one spare worker process ready (imports done, connected, no endpoint yet).

        A cold start of an endpoint without dependencies adopts it: the spare applies the
        endpoint's environment variables and GPU assignment, and is a worker in
        milliseconds instead of the 100+ ms a fresh interpreter needs. Runpod's FlashBoot
        plays the same role. ``FLASH_JUPYTER_SPARE_WORKERS=0`` turns it off.
        """
        self._wire, self._token = wire, token
        self._quiet = quiet or (lambda: True)
        if prespawned is not None:  # a subprocess.Popen started before the loop existed
            self._adopt_spare(prespawned, self.data_dir / "logs" / "spare.log")
        elif self.spare_workers:
            await self._spawn_spare()

    async def _spawn_spare(self) -> None:
        self._spare_pending = None
        if self._spare_proc is not None or self._closing:
            return
        nonce = secrets.token_hex(8)
        spec = {"spare": True, "host": self._wire[0], "port": self._wire[1], "nonce": nonce}
        credential = credentials.spare_credential(self._token, nonce)
        env = envvars.worker_env(dict(os.environ), json.dumps(spec), credential)
        self._spare_ready = asyncio.Event()
        proc = await self._exec(sys.executable, env, "spare")
        proc._flash_nonce = nonce  # type: ignore[attr-defined]
        self._spare_as_spare(proc)

    def _adopt_spare(self, proc: Any, log_path: Path) -> None:
        self._spare_ready = asyncio.Event()
        proc._flash_watch = asyncio.ensure_future(self._watch(proc, log_path))
        self._spare_as_spare(proc)

    def _spare_as_spare(self, proc: Any) -> None:
        self._spare_proc = proc

        def spare_exit(rc: int | None, reason: str) -> None:
            if self._spare_proc is proc:
                self._spare_proc = self._spare_conn = None
                self._spare_ready.set()  # nobody waits for a dead spare

        proc._flash_on_exit = spare_exit  # type: ignore[attr-defined]

    def spare_ready(self, nonce: str, conn: Any) -> bool:
        """The spare process connected; ``conn`` is how it will be told its endpoint."""
        proc = self._spare_proc
        if (
            proc is not None
            and self._spare_conn is None
            and getattr(proc, "_flash_nonce", None) == nonce
        ):
            self._spare_conn = conn
            self._spare_ready.set()
            return True
        return False

    def spare_lost(self, conn: Any) -> None:
        if self._spare_conn is conn:
            self._spare_conn = None
            if self._spare_proc is not None:
                self.kill(self._spare_proc)

    def close(self) -> None:
        self._closing = True
        if self._spare_proc is not None:
            self.kill(self._spare_proc)

    def _replenish_spare(self, waited: float = 0.0) -> None:
        # Later, not now: a new interpreter would take CPU from the jobs running. Wait for
        # a quiet moment (no job dispatched lately), or SPARE_PATIENCE at most.
        if not self.spare_workers or self._closing or self._spare_proc is not None:
            return
        if waited >= SPARE_DELAY and (self._quiet() or waited >= SPARE_PATIENCE):
            self._spare_pending = None
            self._spare_task = asyncio.ensure_future(self._spawn_spare())
            return
        if self._spare_pending is None or waited:
            loop = asyncio.get_running_loop()
            self._spare_pending = loop.call_later(
                SPARE_DELAY, self._replenish_spare, waited + SPARE_DELAY
            )

    async def start(
        self, spec: WorkerSpec, on_exit: Callable[[int | None, str], Awaitable[None] | None]
    ) -> Any:
        cfg = spec.config
        worker = {
            "id": spec.worker_id,
            "incarnation": spec.incarnation,
            "endpoint": cfg.name,
            "host": spec.wire[0],
            "port": spec.wire[1],
            "hardware": spec.allocation.hardware,
            "max_concurrency": cfg.max_concurrency,
            "spool": spec.spool,
        }
        user_env = dict(cfg.env)
        user_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in spec.allocation.devices)
        # Variables an interpreter or the loader reads at start-up cannot be applied to a
        # running spare; such endpoints get a fresh process.
        needs_env = bool(cfg.dependencies or cfg.system_dependencies) or any(
            k.startswith(("PYTHON", "LD_")) for k in cfg.env
        )
        if not needs_env and self._spare_proc is not None and self._spare_conn is None:
            # A spare is on its way (just after start-up): it will be ready before a fresh
            # interpreter would be.
            try:
                await asyncio.wait_for(self._spare_ready.wait(), SPARE_WAIT)
            except asyncio.TimeoutError:
                pass
        if not needs_env and self._spare_conn is not None:
            proc, conn = self._spare_proc, self._spare_conn
            self._spare_proc = self._spare_conn = None
            self._spare_ready = asyncio.Event()
            proc._flash_on_exit = on_exit  # type: ignore[attr-defined]
            conn.assigned = (spec.worker_id, spec.incarnation)
            conn.send({"op": "assign", "env": user_env, "spec": worker})
            self._replenish_spare()
            return proc
        python = sys.executable
        if needs_env:
            spec.phase("environment")
            python = await asyncio.get_running_loop().run_in_executor(
                None, ensure_environment, self.data_dir, cfg.dependencies, cfg.system_dependencies
            )
        spec.phase("process")
        env = envvars.worker_env({**os.environ, **user_env}, json.dumps(worker), spec.credential)
        proc = await self._exec(python, env, spec.worker_id)
        proc._flash_on_exit = on_exit  # type: ignore[attr-defined]
        self._replenish_spare()
        return proc

    async def _exec(self, python: str, env: dict[str, str], log_name: str) -> Any:
        env.pop("FLASH_JUPYTER_URL", None)
        env.pop("FLASH_JUPYTER_TOKEN", None)  # user code on a worker has no use for it
        logs = self.data_dir / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"{log_name}.log"
        # What a worker prints outside any job (and why it died, if it does) goes here.
        with open(log_path, "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "flash_jupyter.worker",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # an interrupt in the notebook's terminal stays there
            )

        proc._flash_watch = asyncio.ensure_future(self._watch(proc, log_path))
        return proc

    @staticmethod
    async def _watch(proc: Any, log_path: Path) -> None:
        """Wait for a worker process to end; tell whoever owns it now why."""
        if asyncio.iscoroutinefunction(proc.wait):
            rc = await proc.wait()
        else:  # a subprocess.Popen (the spare started before the loop)
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        if rc is None or rc >= 0:
            reason = f"exited with code {rc}"
            if rc:
                last = _last_line(log_path)
                if last:
                    reason += f" ({last})"
        else:
            try:
                reason = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                reason = f"killed by signal {-rc}"
        cb = getattr(proc, "_flash_on_exit", None)
        if cb is not None:
            r = cb(rc, reason)
            if asyncio.iscoroutine(r):
                await r

    def stop(self, handle: Any) -> None:
        try:
            handle.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    def kill(self, handle: Any) -> None:
        try:
            handle.kill()
        except ProcessLookupError:
            pass

    def pid(self, handle: Any) -> int | None:
        return handle.pid

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "max_workers": self.max_workers,
            "in_use": self.in_use,
            "gpus": [
                {"index": i, "name": n, "type": hw.name if hw else None} for i, n, hw in self.gpus
            ],
            "strict_gpu": self.strict_gpu,
            "spare_worker": self._spare_conn is not None,
        }

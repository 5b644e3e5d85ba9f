"""Workers as OS processes on this machine.

GPUs: on a host with NVIDIA GPUs, each worker gets the devices it asked for through
``CUDA_VISIBLE_DEVICES``, matched by the names ``nvidia-smi`` reports. Where the host has no
GPU of an acceptable type, the worker runs on the CPU and is labelled emulated
("A100 (emulated on CPU)"), unless ``FLASH_JUPYTER_STRICT_GPU=1`` makes that an error.
Capacity: at most ``max_workers`` processes at once (``FLASH_JUPYTER_MAX_WORKERS``), spare
workers included; a worker that cannot start for lack of a slot or of a free GPU is
Throttled (after a spare has given its slot up, since a spare is billed to nobody).

Spares: per dependency environment an endpoint has used in this session (and the plain
interpreter), one process started from that environment's Python, connected, which has
imported what the environment's workers imported last time (each worker writes that list
to ``preload/<environment>/<endpoint>.json`` in the data directory) and the endpoints'
``preload`` modules. A cold start adopts it (``assign``) instead of starting an interpreter
and importing torch again. See docs/ARCHITECTURE.md, "Spare workers".
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
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import catalog, credentials, envvars
from ..config import MODULE_RE, EndpointConfig
from .base import Allocation, PlacementError, WorkerSpec
from .environments import PRE_INSTALLED, mark_used, prepare
from .exit_reason import exit_reason

SPARE_DELAY = 0.5  # seconds after an adoption before the next spare may start
SPARE_PATIENCE = 10.0  # ... and at the latest, busy or not
SPARE_WAIT = 2.0  # at most this long for a spare that is starting up
LOG_LOOK = 0.2  # seconds between looks at the sizes of the live processes' logs
PLAIN = "plain"  # the environment of endpoints without dependencies: this interpreter


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


def rotate_log(path: Path, cap: int) -> bool:
    """Keep a worker's log under ``cap`` bytes, newest output kept: when ``NAME.log`` holds
    more than half the cap, its newest half-cap bytes (from a line's start) become
    ``NAME.log.1`` (replacing the older one) and ``NAME.log`` is emptied. The process keeps
    writing to it: its descriptor is in append mode, so it writes at the new end.

    A write that lands between the copy and the truncation is lost (as with logrotate's
    ``copytruncate``): a window of microseconds. True when it rotated."""
    keep = max(1, cap // 2)
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            if size <= keep:
                return False
            f.seek(size - keep)
            tail = f.read()  # to the end now, writes since the stat included
            f.truncate(0)
    except OSError:
        return False
    if len(tail) > keep:  # written while we looked: the newest half-cap still
        tail = tail[-keep:]
    cut = tail.find(b"\n")
    if 0 <= cut < len(tail) - 1:
        tail = tail[cut + 1 :]  # start at a whole line
    older = path.with_name(path.name + ".1")
    tmp = path.with_name(f".{path.name}.1.tmp")
    try:
        tmp.write_bytes(tail)
        os.replace(tmp, older)
    except OSError:
        pass
    return True


class LogRotator:
    """A thread that keeps the logs of the processes this provider started under
    ``FLASH_JUPYTER_WORKER_LOG_BYTES`` (``rotate_log``; ``0``: no cap), looking every
    ``LOG_LOOK`` seconds while they run and once more after they end. Between rotations it
    only stats files; the copying happens on this thread, off the control plane's loop."""

    def __init__(self, cap: int):
        self.cap = cap
        self.live: dict[Path, int] = {}  # log path -> processes writing it now
        self.ended: deque[Path] = deque()  # logs to look at once more
        self.rotations = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, path: Path) -> None:
        if self.cap <= 0:
            return
        self.live[path] = self.live.get(path, 0) + 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="log-rotation")
            self._thread.start()

    def done(self, path: Path) -> None:
        n = self.live.pop(path, 0) - 1
        if n > 0:
            self.live[path] = n
        elif n == 0:
            self.ended.append(path)

    def _run(self) -> None:
        while not self._stop.wait(LOG_LOOK):
            ended = [self.ended.popleft() for _ in range(len(self.ended))]
            for path in (*self.live, *ended):
                if rotate_log(path, self.cap):
                    self.rotations += 1

    def close(self) -> None:
        self._stop.set()


def _last_written(path: Path) -> Path:
    """The log holding a process's last words: ``NAME.log``, or ``NAME.log.1`` when a
    rotation emptied the first just before it ended (within a few looks)."""
    older = path.with_name(path.name + ".1")
    try:
        if os.path.getsize(path) == 0 and time.time() - os.path.getmtime(older) < 5 * LOG_LOOK:
            return older
    except OSError:
        pass
    return path


@dataclass
class Spare:
    """A worker process kept ready for one environment. It holds a worker slot (capacity)
    but belongs to, and is billed to, no endpoint until a cold start adopts it."""

    env: str  # environment label: "plain" or the environment's folder name (py311-...)
    python: str
    modules: tuple[str, ...]  # what it was asked to import
    paths: tuple[str, ...]  # code folders of the jobs that imported them
    nonce: str = ""
    proc: Any = None
    conn: Any = None  # its wire connection, once it has imported everything and connected
    ready: Any = None  # an asyncio.Event, set when it connects (or dies)
    since: float = field(default_factory=time.time)
    ready_at: float | None = None
    preloaded: tuple[str, ...] = ()  # what it reports it imported
    failed: tuple[str, ...] = ()
    cuda: bool = False  # something it imported initialised CUDA (its devices are fixed)
    holds_slot: bool = True
    task: Any = None  # the asyncio task starting its process

    def view(self) -> dict[str, Any]:
        ready = self.conn is not None
        return {
            "environment": self.env,
            "python": self.python,
            "state": "ready" if ready else "starting",
            "preload": list(self.modules),
            "preloaded": list(self.preloaded) if ready else [],
            "failed": list(self.failed),
            "pid": getattr(self.proc, "pid", None),
            "since": round(self.since, 3),
            "start_s": None if self.ready_at is None else round(self.ready_at - self.since, 3),
            "cuda_initialized": self.cuda,
            "billed": False,
        }


@dataclass
class EnvUse:
    """An environment endpoints used in this session: who, and when last."""

    python: str
    users: dict[str, tuple[str, ...]] = field(default_factory=dict)  # endpoint -> preload=
    last_used: float = 0.0


def _deps_key(cfg: EndpointConfig) -> tuple[str, ...]:
    return tuple(sorted(cfg.dependencies))


def _read_record(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


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
        self.in_use = 0  # worker slots held: workers and spares
        self.spare_workers: bool = envvars.get("FLASH_JUPYTER_SPARE_WORKERS")
        self.spare_limit: int = envvars.get("FLASH_JUPYTER_SPARE_LIMIT")
        self._spares: dict[str, Spare] = {}  # environment -> its spare
        self._envs: dict[str, EnvUse] = {}  # environments used in this session
        self._env_of: dict[tuple[str, ...], str] = {(): PLAIN}  # sorted deps -> environment
        self._pending: dict[str, Any] = {}  # environment -> timer of a spare to start
        self._waiting: dict[str, str] = {}  # environment -> why its spare is not there yet
        self._closing = False
        self._wire: tuple[str, int] = ("127.0.0.1", 0)
        self._token = ""
        self._quiet: Callable[[], bool] = lambda: True
        self.logs = LogRotator(envvars.get("FLASH_JUPYTER_WORKER_LOG_BYTES"))

    # -- placement
    def _gpu_indices_for(self, types: tuple[str, ...]) -> list[int]:
        return [idx for idx, _, hw in self.gpus if hw is not None and hw.name in types]

    def allocate(self, config: EndpointConfig) -> Allocation | None:
        if self.in_use >= self.max_workers and not self._slot_from_spare(config):
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
        for env in list(self._waiting):  # a slot came free: spares that wait for one
            self._replenish(env)

    def _slot_from_spare(self, config: EndpointConfig) -> bool:
        """The host is full and a worker is wanted: a spare gives its slot up. One of another
        environment is stopped (the least recently used); the endpoint's own spare keeps
        running for the start that follows, which adopts it (or stops it)."""
        mine = self._env_of.get(_deps_key(config))
        others = [sp for sp in self._spares.values() if sp.env != mine and sp.holds_slot]
        if others:
            victim = min(others, key=lambda sp: self._last_used(sp.env))
            self._retire(victim, "its slot went to a worker")
            self._waiting[victim.env] = "the host is at capacity"
            return True
        own = self._spares.get(mine) if mine is not None else None
        if own is not None and own.holds_slot:
            own.holds_slot = False  # the worker starting now takes its slot over
            self.in_use -= 1
            return True
        return False

    def would_emulate(self, config: EndpointConfig) -> bool:
        """The endpoint asks for a GPU type this host does not have (it would run on CPU)."""
        return bool(config.gpu) and not any(hw and hw.name in config.gpu for _, _, hw in self.gpus)

    def unmet(self, configs: list[EndpointConfig]) -> None:
        """One machine cannot grow: Throttled workers wait for a slot to come free."""

    # -- processes
    async def prepare(
        self,
        wire: tuple[str, int],
        token: str,
        quiet: Callable[[], bool] | None = None,
        prespawned: Any = None,
    ) -> None:
        """Keep a spare worker process ready (imports done, connected, no endpoint yet).

        At first one, of this interpreter and importing nothing more; then one per
        environment that endpoints use (see the module's docstring). A cold start adopts
        it: the spare applies the endpoint's environment variables and GPU assignment, and
        is a worker in milliseconds instead of the 100+ ms a fresh interpreter needs, plus
        its imports. Runpod's FlashBoot plays the same role.
        ``FLASH_JUPYTER_SPARE_WORKERS=0`` turns spares off.
        """
        self._wire, self._token = wire, token
        self._quiet = quiet or (lambda: True)
        if prespawned is not None:  # a subprocess.Popen started before the loop existed
            spare = self._hold(PLAIN, sys.executable, (), ())
            spare.nonce = getattr(prespawned, "_flash_nonce", "")
            spare.proc = prespawned
            log_path = self.data_dir / "logs" / "spare.log"
            self.logs.add(log_path)
            prespawned._flash_watch = asyncio.ensure_future(self._watch(prespawned, log_path))
            self._as_spare(spare)
        elif self.spare_workers:
            await self._spawn_spare(self._hold(PLAIN, sys.executable, (), ()))

    def _hold(
        self, env: str, python: str, modules: tuple[str, ...], paths: tuple[str, ...]
    ) -> Spare:
        """A spare for ``env`` is on its way: it holds a worker slot from now on."""
        spare = Spare(env, python, modules, paths, ready=asyncio.Event())
        self._spares[env] = spare
        self.in_use += 1
        self._waiting.pop(env, None)
        return spare

    async def _spawn_spare(self, spare: Spare) -> None:
        spare.nonce = secrets.token_hex(8)
        spec = {"spare": True, "host": self._wire[0], "port": self._wire[1],
                "nonce": spare.nonce, "preload": list(spare.modules),
                "paths": list(spare.paths)}  # fmt: skip
        credential = credentials.spare_credential(self._token, spare.nonce)
        env = envvars.worker_env(dict(os.environ), json.dumps(spec), credential)
        log = "spare" if spare.env == PLAIN else f"spare-{spare.env}"
        proc = await self._exec(spare.python, env, log)
        spare.proc = proc
        if self._spares.get(spare.env) is not spare or self._closing:
            self.kill(proc)  # retired while its process was being made
            return
        self._as_spare(spare)

    def _as_spare(self, spare: Spare) -> None:
        def spare_exit(rc: int | None, reason: str) -> None:
            spare.ready.set()  # nobody waits for a dead spare
            if self._spares.get(spare.env) is spare:
                self._forget(spare)

        spare.proc._flash_on_exit = spare_exit  # type: ignore[attr-defined]

    def _forget(self, spare: Spare) -> None:
        """The spare is no longer kept (adopted, retired or dead); its slot is free."""
        if self._spares.get(spare.env) is spare:
            del self._spares[spare.env]
        if spare.holds_slot:
            spare.holds_slot = False
            self.in_use = max(0, self.in_use - 1)

    def _retire(self, spare: Spare, why: str) -> None:
        self._forget(spare)
        spare.ready.set()
        if spare.proc is not None:
            self.kill(spare.proc)

    def spare_ready(self, nonce: str, conn: Any) -> bool:
        """A spare process connected (its imports done); ``conn`` is how it will be told its
        endpoint. What it imported comes with its hello (``conn.spare_report``)."""
        for spare in self._spares.values():
            if spare.nonce == nonce and spare.conn is None and spare.proc is not None:
                report = getattr(conn, "spare_report", None) or {}
                spare.preloaded = tuple(str(n) for n in report.get("preloaded") or ())
                spare.failed = tuple(str(n) for n in report.get("failed") or ())
                spare.cuda = bool(report.get("cuda"))
                spare.conn, spare.ready_at = conn, time.time()
                spare.ready.set()
                return True
        return False

    def spare_lost(self, conn: Any) -> None:
        for spare in list(self._spares.values()):
            if spare.conn is conn:
                self._retire(spare, "lost its connection")

    def close(self) -> None:
        self._closing = True
        self.logs.close()
        for timer in self._pending.values():
            timer.cancel()
        self._pending.clear()
        for spare in list(self._spares.values()):
            self._retire(spare, "the control plane is stopping")

    # -- which spares to keep
    def _last_used(self, env: str) -> float:
        use = self._envs.get(env)
        return use.last_used if use is not None else 0.0

    def _use(self, env: str, python: str, cfg: EndpointConfig) -> None:
        use = self._envs.setdefault(env, EnvUse(python))
        use.users[cfg.name] = cfg.preload
        use.last_used = time.monotonic()

    def _record_path(self, env: str, endpoint: str) -> Path:
        return self.data_dir / "preload" / env / f"{endpoint}.json"

    def _wanted(self, env: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What the spare of ``env`` should import: what each endpoint using it imported
        last time (its workers' record), and their ``preload`` settings; and the code
        folders those imports came from."""
        modules: set[str] = set()
        paths: list[str] = []
        use = self._envs.get(env)
        for endpoint, setting in (use.users if use else {}).items():
            modules.update(setting)
            rec = _read_record(self._record_path(env, endpoint))
            names = rec.get("modules") if isinstance(rec.get("modules"), list) else []
            modules.update(n for n in names if isinstance(n, str) and MODULE_RE.match(n))
            folders = rec.get("paths") if isinstance(rec.get("paths"), list) else []
            paths.extend(p for p in folders if isinstance(p, str) and p not in paths)
        return tuple(sorted(modules)), tuple(paths)

    def _refresh(self, env: str) -> None:
        """The environment's spare imports what its workers import now, or is replaced."""
        if env not in self._envs or self._closing or not self.spare_workers:
            return
        spare = self._spares.get(env)
        if spare is not None and (spare.modules, spare.paths) != self._wanted(env):
            self._retire(spare, "its environment's workers import other modules now")
            spare = None
        if spare is None:
            self._replenish(env)

    def _room_for_spare(self, env: str) -> bool:
        if self.in_use >= self.max_workers:
            self._waiting[env] = (
                f"the host is at capacity ({self.in_use} of {self.max_workers} worker slots)"
            )
            return False
        if len(self._spares) >= self.spare_limit:
            mine = self._last_used(env)
            older = [sp for sp in self._spares.values() if self._last_used(sp.env) < mine]
            if not older:
                self._waiting[env] = f"FLASH_JUPYTER_SPARE_LIMIT={self.spare_limit} spares kept"
                return False
            self._retire(min(older, key=lambda sp: self._last_used(sp.env)), "spare limit")
        return True

    def _replenish(self, env: str, waited: float = 0.0) -> None:
        # Later, not now: a new interpreter would take CPU from the jobs running. Wait for
        # a quiet moment (no job dispatched lately), or SPARE_PATIENCE at most.
        if waited:
            self._pending.pop(env, None)
        if not self.spare_workers or self._closing or env in self._spares or env not in self._envs:
            self._waiting.pop(env, None)
            return
        if waited >= SPARE_DELAY and (self._quiet() or waited >= SPARE_PATIENCE):
            if self._room_for_spare(env):
                modules, paths = self._wanted(env)
                spare = self._hold(env, self._envs[env].python, modules, paths)
                spare.task = asyncio.ensure_future(self._spawn_spare(spare))
            return
        if env not in self._pending:
            self._waiting.setdefault(env, "starting in a quiet moment")
            loop = asyncio.get_running_loop()
            self._pending[env] = loop.call_later(
                SPARE_DELAY, self._replenish, env, waited + SPARE_DELAY
            )

    async def _take_spare(self, env: str, allocation: Allocation) -> Spare | None:
        """The environment's spare, once it is ready (waiting up to SPARE_WAIT for one on
        its way: it will be ready before a fresh interpreter would be), or None."""
        spare = self._spares.get(env)
        if spare is None:
            return None
        if spare.conn is None:
            try:
                await asyncio.wait_for(spare.ready.wait(), SPARE_WAIT)
            except asyncio.TimeoutError:
                pass
            if self._spares.get(env) is not spare or spare.conn is None:
                if not spare.holds_slot and self._spares.get(env) is spare:
                    self._retire(spare, "its slot went to a fresh worker")
                return None
        if spare.cuda and allocation.devices:
            # Its devices were fixed when something it imported initialised CUDA.
            self._retire(spare, "CUDA was initialised while preloading")
            return None
        return spare

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
            "preload": list(cfg.preload),
        }
        user_env = dict(cfg.env)
        user_env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in spec.allocation.devices)
        # Variables an interpreter or the loader reads at start-up cannot be applied to a
        # running spare; such endpoints get a fresh process.
        needs_env = bool(cfg.dependencies or cfg.system_dependencies) or any(
            k.startswith(("PYTHON", "LD_")) for k in cfg.env
        )
        fresh_only = bool(cfg.system_dependencies) or any(
            k.startswith(("PYTHON", "LD_")) for k in cfg.env
        )
        known = self._env_of.get(_deps_key(cfg))  # an environment built in this session
        spare = None
        if known is not None and not fresh_only and self.spare_workers:
            self._use(known, self._envs[known].python if known in self._envs else
                      sys.executable, cfg)  # fmt: skip
            spare = await self._take_spare(known, spec.allocation)
        if spare is not None:
            proc, conn = spare.proc, spare.conn
            self._forget(spare)  # its slot is the worker's allocation now
            if known != PLAIN:  # its environment is built: the spare was started from it
                spec.env_source = PRE_INSTALLED
                mark_used(self.data_dir, known)  # `flash-jupyter envs`: its last use
            spec.phase("process")
            spec.spare = "preloaded" if spare.preloaded else "plain"
            proc._flash_on_exit = on_exit  # type: ignore[attr-defined]
            proc._flash_env = known  # type: ignore[attr-defined]
            worker.update(self._record_spec(known, cfg.name))
            conn.assigned = (spec.worker_id, spec.incarnation)
            conn.send({"op": "assign", "env": user_env, "spec": worker})
            self._refresh(known)
            return proc
        lent = self._spares.get(known) if known is not None else None
        if lent is not None and not lent.holds_slot:
            self._retire(lent, "its slot went to a fresh worker")  # allocate() lent it
        python = sys.executable
        if needs_env:
            spec.phase("environment")
            built = await asyncio.get_running_loop().run_in_executor(
                None, prepare, self.data_dir, cfg.dependencies, cfg.system_dependencies,
                (cfg.name,),
            )  # fmt: skip
            python, spec.env_source = built.python, built.source
        spec.phase("process")
        env_name = PLAIN if python == sys.executable else Path(python).parent.parent.name
        self._env_of[_deps_key(cfg)] = env_name
        self._use(env_name, python, cfg)
        worker.update(self._record_spec(env_name, cfg.name))
        env = envvars.worker_env({**os.environ, **user_env}, json.dumps(worker), spec.credential)
        proc = await self._exec(python, env, spec.worker_id)
        proc._flash_on_exit = on_exit  # type: ignore[attr-defined]
        proc._flash_env = env_name  # type: ignore[attr-defined]
        self._refresh(env_name)
        return proc

    def _record_spec(self, env: str, endpoint: str) -> dict[str, Any]:
        """What a worker needs to keep its import record: where it goes, and the folders the
        modules came from last time (its ``preload`` setting may name modules there)."""
        path = self._record_path(env, endpoint)
        folders = _read_record(path).get("paths")
        return {"imports": str(path), "paths": folders if isinstance(folders, list) else []}

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

        self.logs.add(log_path)
        proc._flash_watch = asyncio.ensure_future(self._watch(proc, log_path))
        return proc

    async def _watch(self, proc: Any, log_path: Path) -> None:
        """Wait for a worker process to end; tell whoever owns it now why."""
        if asyncio.iscoroutinefunction(proc.wait):
            rc = await proc.wait()
        else:  # a subprocess.Popen (the spare started before the loop)
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait)
        reason = exit_reason(rc, _last_written(log_path))
        self.logs.done(log_path)
        cb = getattr(proc, "_flash_on_exit", None)
        if cb is not None:
            r = cb(rc, reason)
            if asyncio.iscoroutine(r):
                await r
        env = getattr(proc, "_flash_env", None)
        if env is not None:  # a worker: its record may have changed what the spare imports
            self._refresh(env)

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
            "spare_worker": any(sp.conn is not None for sp in self._spares.values()),
            "spare_limit": self.spare_limit if self.spare_workers else 0,
            # Spares hold worker slots (in_use counts them) and are billed to nobody.
            "spares": [sp.view() for sp in self._spares.values()] + self._waiting_views(),
        }

    def _waiting_views(self) -> list[dict[str, Any]]:
        return [
            {"environment": env, "state": f"waiting: {why}", "preload": [], "preloaded": [],
             "billed": False}
            for env, why in self._waiting.items()
            if env not in self._spares
        ]  # fmt: skip

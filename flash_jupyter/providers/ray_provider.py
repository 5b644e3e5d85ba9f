"""Workers as Ray actors on the nodes of a Ray cluster (``serve --provider ray``).

Placement: each worker gets a placement group of one bundle (its resources), then an actor
(``ray_actor.WorkerActor``) in it, which starts ``python -m flash_jupyter.worker`` on its node
and waits for it. ``gpu="A100", gpu_count=2`` asks for ``{"GPU": 2, "CPU": 1,
"accelerator_type:A100": 0.001}`` (Ray's accelerator-type resources, fractional as Ray's own
``accelerator_type=`` option asks; a node labelled ``A100-80G`` counts as an A100, as the
catalogue reads the name); a list of GPU types takes the first one a node has free now. A
``cpu=`` type asks for its vCPUs and memory. Ray sets ``CUDA_VISIBLE_DEVICES`` for the actor,
and the worker process inherits it. Once placed, the actor reports the node, the GPU ids and
their names from the driver (``nvidia-smi``); without a driver (a node with GPU resources but
no NVIDIA GPU, as in tests) the worker is labelled emulated.

Throttled: ``allocate`` answers from a snapshot of each node's free resources (refreshed every
``POLL`` s in a thread, minus what this provider asked for since), so the control plane's
ticker may ask often. None when no node can hold the worker now: the slot is ``Throttled``
and is asked again at each tick, so a node that joins is used within a poll. A placement
group that Ray does not grant within ``PENDING_GRACE`` (another user took the resources)
reports the phase ``pending``: the slot shows ``Throttled`` and is not billed until it is
granted.

Autoscaling: the workers that wait ``Throttled`` because no node can hold them (``unmet``,
called by the scheduler at each tick) become a resource request to Ray's autoscaler
(``ray.autoscaler.sdk.request_resources``: the bundles of the workers placed plus those
waiting, sent when it changes, cleared once none waits), so a cluster launcher or KubeRay
cluster adds a node of that type. ``FLASH_JUPYTER_STRICT_GPU=1`` refuses a GPU type no node
has instead (for a cluster of fixed size), and fails a worker whose node has no driver to
name its GPUs rather than run it emulated.

Lifecycle: the worker's exit, the actor's death (node lost, out of memory, ``ray.kill``) or a
failed start end in ``on_exit`` once the actor is confirmed gone and its placement group
removed, so billing covers the whole time the resources were held.

Buffers: a worker gets the shared-memory spool only when its node sees the control plane's
spool folder: the actor reads a marker file (a random nonce) the provider wrote there. Another
machine, or a container on the same machine with its own ``/dev/shm`` (KubeRay pods share the
kernel's boot id, not the folder), does not: its buffers travel inline both ways.

Environments: an endpoint's ``dependencies`` are built on the node by the actor, with the
same builder as the local provider (``providers/environments.py``: uv or pip, cached per
dependency set in the node's data directory, or in the control plane's when the node is this
host); the cold start's ``environment`` phase covers that time. ``system_dependencies``
cannot be installed this way and are refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .. import catalog, envvars
from ..config import EndpointConfig
from .base import Allocation, PlacementError, WorkerSpec
from .ray_actor import RemoteWorkerActor, log_dir

SPOOL_MARKER = ".flash-host"  # in the spool folder: a node that can read it shares the spool
PENDING_GRACE = 0.5  # a placement not granted by then shows the slot Throttled
DEATH_WAIT = 10.0  # seconds to see a killed actor confirmed dead
ACCEL = "accelerator_type:"
ACCEL_SHARE = 0.001  # of a node's accelerator_type resource, as Ray's accelerator_type= asks
GPU_WORKER_CPUS = 1.0  # CPUs reserved beside a GPU worker's GPUs


@dataclass
class RayAllocation(Allocation):
    """An allocation on a Ray cluster: the resources its placement group asks for."""

    demand: dict[str, float] = field(default_factory=dict)
    reserved_at: float = field(default_factory=time.time)
    granted_at: float | None = None  # the placement group was granted (snapshots count it)
    node_id: str | None = None


@dataclass
class RayWorker:
    """The provider's handle on one worker: its placement group, actor and watcher."""

    spec: WorkerSpec
    on_exit: Callable[[int | None, str], Awaitable[None] | None]
    pg: Any = None
    actor: Any = None
    task: Any = None
    spawned: bool = False
    killed: bool = False
    stop_asked: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int | None = None
    name: str = ""  # the actor's name in the namespace (ray.get_actor)
    info: dict[str, Any] = field(default_factory=dict)
    since: float = field(default_factory=time.time)


async def _get(ref: Any) -> Any:
    """A Ray object, awaited without a thread."""
    return await asyncio.wrap_future(ref.future())


def _death_reason(e: BaseException) -> str:
    """Why Ray says an actor died, in one line (its message's explanation, without ids)."""
    text = str(e)
    for marker in ("The actor is dead because", "The actor died because", "The actor"):
        i = text.rfind(marker)
        if i >= 0:
            text = text[i:]
            break
    return "Ray actor died: " + " ".join(text.split())[:400]


def type_of_accelerator(name: str) -> catalog.HardwareType | None:
    """The catalogue's GPU type for a Ray accelerator type (``A100``, ``A100-80G``, ``L4``)."""
    try:
        return catalog.lookup(name, "gpu")
    except ValueError:
        return catalog.match_smi_name(name)


class RayProvider:
    name = "ray"

    def __init__(
        self,
        data_dir: Any = None,
        address: str | None = None,
        advertise_host: str | None = None,
        namespace: str = "flash-jupyter",
        strict_gpu: bool | None = None,
        poll: float | None = None,
    ):
        self.data_dir = data_dir
        self.address = address or "auto"
        self.advertise_host = advertise_host
        self.namespace = namespace
        if strict_gpu is None:
            strict_gpu = envvars.get("FLASH_JUPYTER_STRICT_GPU")
        self.strict_gpu = bool(strict_gpu)
        self.poll = poll if poll is not None else envvars.get("FLASH_JUPYTER_RAY_POLL")
        self.connected = False
        self.error: str | None = None
        self.snapshot_at = 0.0
        self.free: dict[str, dict[str, float]] = {}  # node id -> free resources
        self.total: dict[str, dict[str, float]] = {}  # node id -> all its resources
        self.held: list[RayAllocation] = []  # allocations given out and not released
        self.workers: dict[str, RayWorker] = {}  # "worker id/incarnation" -> handle
        self.waiting: dict[str, str] = {}  # endpoint -> why its workers are Throttled
        self.wire_host: str | None = None
        self.marker: tuple[str, str] | None = None  # (path, nonce) in the spool folder
        self.requested: list[dict[str, float]] = []  # bundles last asked of the autoscaler
        self._poller: Any = None
        self._closing = False

    # -- connection
    async def prepare(
        self,
        wire: tuple[str, int],
        token: str,
        quiet: Callable[[], bool] | None = None,
        prespawned: Any = None,
    ) -> None:
        """Connect to the cluster (in a thread: ``ray.init`` takes a second or more) and
        start the snapshots of its free resources."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._connect)
        except Exception as e:
            self.error = f"could not connect to the Ray cluster at {self.address!r}: {e}"
            raise SystemExit(f"flash-jupyter: {self.error}") from None
        host = wire[0]
        if self.advertise_host:
            self.wire_host = self.advertise_host
        elif host in ("0.0.0.0", "::", ""):
            self.wire_host = ray.util.get_node_ip_address()
        else:
            self.wire_host = host
        await loop.run_in_executor(None, self._snap)
        self.connected = True
        self._poller = asyncio.ensure_future(self._poll())

    def _connect(self) -> None:
        _check_reachable(self.address)  # ray.init retries an address nobody answers forever
        if not ray.is_initialized():
            ray.init(
                address=self.address,
                namespace=self.namespace,
                log_to_driver=False,
                logging_level="WARNING",
                configure_logging=True,
            )

    def _snap(self) -> None:
        """Take a snapshot of each live node's free and total resources."""
        taken = time.time()
        free = ray._private.state.available_resources_per_node()
        total = ray._private.state.total_resources_per_node()
        self.free, self.total, self.snapshot_at = free, total, taken

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(self.poll)
            try:
                await loop.run_in_executor(None, self._snap)
            except Exception as e:  # the cluster is unreachable for now: keep the last one
                self.error = f"Ray: {e}"

    # -- placement
    def _unseen(self) -> list[RayAllocation]:
        """Allocations the last snapshot does not reflect yet (not granted before it)."""
        return [a for a in self.held if a.granted_at is None or a.granted_at >= self.snapshot_at]

    def _fits(self, demand: dict[str, float]) -> bool:
        """Some node has ``demand`` free now, and the cluster as a whole still has it once
        the allocations the snapshot does not show yet are taken off."""
        eps = 1e-9
        if not any(all(free.get(k, 0.0) + eps >= v for k, v in demand.items())
                   for free in self.free.values()):  # fmt: skip
            return False
        unseen = self._unseen()
        for k, v in demand.items():
            have = sum(free.get(k, 0.0) for free in self.free.values())
            taken = sum(a.demand.get(k, 0.0) for a in unseen)
            if have - taken + eps < v:
                return False
        return True

    def _accelerators(self) -> dict[str, list[str]]:
        """Catalogue GPU type -> the cluster's accelerator_type resources that are that type."""
        out: dict[str, list[str]] = {}
        for res in self.total.values():
            for key in res:
                if key.startswith(ACCEL) and "_group_" not in key:
                    hw = type_of_accelerator(key[len(ACCEL) :])
                    if hw is not None and key not in out.setdefault(hw.name, []):
                        out[hw.name].append(key)
        return out

    def demands(self, config: EndpointConfig) -> list[tuple[str | None, dict[str, float]]]:
        """(catalogue type, resources) a worker of the endpoint may ask for, in order."""
        if config.gpu:
            accel = self._accelerators()
            out: list[tuple[str | None, dict[str, float]]] = []
            for t in config.gpu:
                for key in accel.get(t, []):
                    out.append((t, {"CPU": GPU_WORKER_CPUS, "GPU": float(config.gpu_count),
                                    key: ACCEL_SHARE}))  # fmt: skip
            return out
        hw = catalog.lookup(config.cpu or catalog.DEFAULT_CPU, "cpu")
        return [(None, {"CPU": float(hw.vcpus), "memory": float(hw.memory_gb << 30)})]

    def allocate(self, config: EndpointConfig) -> Allocation | None:
        options = self.demands(config) if self.connected else []
        if config.gpu and self.connected and self.strict_gpu and not options:
            have = sorted(self._accelerators()) or ["no GPU type"]
            raise PlacementError(
                f"endpoint {config.name!r} asks for {config.gpu_count} x "
                f"{' or '.join(config.gpu)} but the nodes of the Ray cluster have "
                f"{', '.join(have)}; FLASH_JUPYTER_STRICT_GPU=1 forbids waiting for a node "
                f"with one to join"
            )
        if config.system_dependencies:
            raise PlacementError(
                f"endpoint {config.name!r} has system_dependencies, which the Ray provider "
                f"cannot install on a node; build them into the nodes' image and remove them"
            )
        if not self.connected:
            self.waiting[config.name] = "connecting to the Ray cluster"
            return None
        for type_name, demand in options:
            if self._fits(demand):
                self.waiting.pop(config.name, None)
                if type_name is None:
                    label = config.cpu or catalog.DEFAULT_CPU
                else:
                    label = type_name + (f" x{config.gpu_count}" if config.gpu_count > 1 else "")
                alloc = RayAllocation(label, False, [], type_name, demand=demand)
                self.held.append(alloc)
                return alloc
        self.waiting[config.name] = self._why_not(config, options)
        return None

    def _why_not(self, config: EndpointConfig, options: list) -> str:
        if config.gpu:
            want = f"{config.gpu_count} x {' or '.join(config.gpu)}"
            if not options:
                return f"no node of the Ray cluster has {' or '.join(config.gpu)} GPUs"
            return f"no node has {want} free now"
        return f"no node has {options[0][1]['CPU']:g} CPUs and the memory of {config.cpu} free"

    def release(self, allocation: Allocation) -> None:
        self.held = [a for a in self.held if a is not allocation]

    def unmet(self, configs: list[EndpointConfig]) -> None:
        """Workers waiting Throttled for a node that can hold them (one config each): ask
        Ray's autoscaler for room for them beside the workers placed, when that changes
        (the request replaces the last one; an empty one clears it)."""
        if not self.connected or self._closing:
            return
        wanted = [self.hint(cfg) for cfg in configs]
        bundles = [dict(a.demand) for a in self.held] + wanted if wanted else []
        if bundles == self.requested:
            return
        self.requested = bundles
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(None, _request_resources, bundles)
        fut.add_done_callback(self._hint_sent)

    def _hint_sent(self, fut: Any) -> None:
        e = fut.exception()
        if e is not None:
            self.error = f"Ray autoscaler request failed: {type(e).__name__}: {e}"
            self.requested = []  # try again at the next tick

    def hint(self, config: EndpointConfig) -> dict[str, float]:
        """The resources one worker of the endpoint needs, for the autoscaler: its first
        option, or for a GPU type no node has, ``accelerator_type:<type>`` as Ray names it."""
        options = self.demands(config)
        if options:
            return dict(options[0][1])
        accel = ACCEL + _ray_accelerator_name(config.gpu[0])
        return {"CPU": GPU_WORKER_CPUS, "GPU": float(config.gpu_count), accel: ACCEL_SHARE}

    def would_emulate(self, config: EndpointConfig) -> bool:
        return False  # known once placed: the node's driver names the devices

    # -- workers
    async def start(
        self, spec: WorkerSpec, on_exit: Callable[[int | None, str], Awaitable[None] | None]
    ) -> RayWorker:
        alloc = spec.allocation
        assert isinstance(alloc, RayAllocation)
        name = f"flash-{spec.worker_id}-{spec.incarnation}-{os.getpid()}"
        h = RayWorker(spec, on_exit, name=name)
        h.pg = placement_group([alloc.demand], strategy="STRICT_PACK", name=name)
        self.workers[f"{spec.worker_id}/{spec.incarnation}"] = h
        h.task = asyncio.ensure_future(self._run(h))
        return h

    async def _run(self, h: RayWorker) -> None:
        """The worker's whole life: placement, actor, process, exit; then ``on_exit``."""
        spec, alloc = h.spec, h.spec.allocation
        assert isinstance(alloc, RayAllocation)
        rc: int | None = None
        reason = "stopped before it was placed"
        try:
            granted = asyncio.ensure_future(_get(h.pg.ready()))
            wake = asyncio.ensure_future(h.wake.wait())
            done, _ = await asyncio.wait({granted, wake}, timeout=PENDING_GRACE,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            if not done:
                spec.waiting = f"waiting for the Ray cluster to grant {_demand_text(alloc)}"
                spec.phase("pending")  # Throttled, not billed, until granted
                await asyncio.wait({granted, wake}, return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            if h.killed:
                granted.cancel()
                return
            await granted
            alloc.granted_at = time.time()
            cfg = spec.config
            spec.phase("process")  # Ray starts the actor's process
            options: dict[str, Any] = {
                "num_cpus": alloc.demand.get("CPU", 0.0),
                "num_gpus": alloc.demand.get("GPU", 0.0),
                "resources": {k: v for k, v in alloc.demand.items()
                              if k not in ("CPU", "GPU", "memory")},
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    h.pg, placement_group_bundle_index=0),
                "name": h.name,
            }  # fmt: skip
            if "memory" in alloc.demand:
                options["memory"] = alloc.demand["memory"]
            h.actor = RemoteWorkerActor.options(**options).remote()
            h.info = await _get(h.actor.placed.remote(self._marker(spec.spool)))
            if h.killed:
                return
            self._placed(spec, alloc, h.info)
            if alloc.emulated and self.strict_gpu:
                reason = (f"the node {h.info.get('hostname')} ({h.info.get('node_ip')}) gives "
                          f"GPU resources but no NVIDIA driver names them; "
                          f"FLASH_JUPYTER_STRICT_GPU=1 forbids running emulated")  # fmt: skip
                return
            python = ""
            if cfg.dependencies:  # built on the node, in this data dir when it is this host
                spec.phase("environment")
                data_dir = str(self.data_dir) if alloc.same_host and self.data_dir else None
                python, spec.env_source = await _get(h.actor.environment.remote(
                    list(cfg.dependencies), data_dir, cfg.name))  # fmt: skip
                if h.killed:
                    return
                spec.phase("process")
            else:
                spec.phase("process")  # the hardware it got is known now: views follow
            worker = {
                "id": spec.worker_id,
                "incarnation": spec.incarnation,
                "endpoint": cfg.name,
                "host": self.wire_host or spec.wire[0],
                "port": spec.wire[1],
                "hardware": alloc.hardware,
                "max_concurrency": cfg.max_concurrency,
                "spool": spec.spool if alloc.same_host else None,
                "preload": list(cfg.preload),
            }
            spawn = h.actor.spawn.remote(
                json.dumps(worker), spec.credential, dict(cfg.env), spec.worker_id, python
            )
            h.pid = await _get(spawn)
            h.spawned = True
            if h.stop_asked:
                h.actor.signal.remote(int(signal.SIGTERM))
            rc, reason = await _get(h.actor.wait.remote())
        except ray.exceptions.RayActorError as e:
            reason = _death_reason(e)
        except asyncio.CancelledError:
            reason = "the control plane is stopping"
        except Exception as e:  # runtime_env build failed, placement group removed, ...
            reason = f"could not start on the Ray cluster: {type(e).__name__}: {e}"
        finally:
            await self._end(h)
            self.workers.pop(f"{spec.worker_id}/{spec.incarnation}", None)
            r = h.on_exit(rc, reason)
            if asyncio.iscoroutine(r):
                await r

    def _marker(self, spool: str | None) -> tuple[str, str] | None:
        """The spool's marker file (written once): a node that reads its nonce there shares
        the spool with this control plane."""
        if not spool:
            return None
        if self.marker is None:
            path, nonce = os.path.join(spool, SPOOL_MARKER), secrets.token_hex(16)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(nonce)
            except OSError:
                return None
            self.marker = (path, nonce)
        return self.marker

    def _placed(self, spec: WorkerSpec, alloc: RayAllocation, info: dict[str, Any]) -> None:
        """The devices the actor got, as its node's driver names them: the label, the
        type (and so the price), emulated when the node has no driver to name them."""
        alloc.node_id = info.get("node_id")
        alloc.same_host = bool(info.get("same_host"))
        ids = info.get("gpu_ids") or []
        alloc.devices = [int(i) for i in ids if str(i).isdigit()]
        cfg = spec.config
        if not cfg.gpu:
            return
        names = info.get("gpu_names") or []
        types = {hw.name for hw in map(catalog.match_smi_name, names) if hw is not None}
        n = len(ids) or cfg.gpu_count
        if len(types) == 1:
            got = types.pop()
            alloc.type_name = got
            alloc.hardware = got + (f" x{n}" if n > 1 else "")
            alloc.emulated = False
        else:  # no driver to ask (a node with GPU resources but no NVIDIA GPU): emulated
            base = alloc.type_name or cfg.gpu[0]
            alloc.hardware = base + (f" x{n}" if n > 1 else "") + " (emulated on CPU)"
            alloc.emulated = True

    async def _end(self, h: RayWorker) -> None:
        """Kill the actor, wait until Ray says it is dead, remove the placement group."""
        if h.actor is not None:
            try:
                ray.kill(h.actor, no_restart=True)
            except Exception:
                pass
            deadline = time.monotonic() + DEATH_WAIT
            while time.monotonic() < deadline:
                try:
                    await asyncio.wait_for(_get(h.actor.ping.remote()), 1.0)
                except ray.exceptions.RayActorError:
                    break
                except Exception:
                    pass
                await asyncio.sleep(0.02)
        if h.pg is not None:
            try:
                remove_placement_group(h.pg)
            except Exception:
                pass

    def stop(self, handle: RayWorker) -> None:
        handle.stop_asked = True
        if handle.spawned and handle.actor is not None:
            handle.actor.signal.remote(int(signal.SIGTERM))
        elif handle.actor is None:
            self.kill(handle)  # not placed yet: nothing to stop gracefully

    def kill(self, handle: RayWorker) -> None:
        handle.killed = True
        handle.wake.set()
        if handle.actor is not None:
            try:
                ray.kill(handle.actor, no_restart=True)
            except Exception:
                pass

    def pid(self, handle: RayWorker) -> int | None:
        return handle.pid

    def close(self) -> None:
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
        if self.marker is not None:
            try:
                os.unlink(self.marker[0])
            except OSError:
                pass
        if self.requested:
            try:
                _request_resources([])  # what this control plane asked for goes with it
            except Exception:
                pass

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "address": self.address,
            "connected": self.connected,
            "error": self.error,
            "wire_host": self.wire_host,
            "nodes": [
                {"node_id": nid, "total": _plain(res), "free": _plain(self.free.get(nid, {}))}
                for nid, res in self.total.items()
            ],
            "workers": [
                {
                    "worker": h.spec.worker_id,
                    "incarnation": h.spec.incarnation,
                    "state": "placed" if h.info else "placing",
                    "actor": h.name,
                    "node_id": h.info.get("node_id"),
                    "node_ip": h.info.get("node_ip"),
                    "hostname": h.info.get("hostname"),
                    "gpu_ids": h.info.get("gpu_ids"),
                    "gpu_names": h.info.get("gpu_names"),
                    "cuda_visible_devices": h.info.get("cuda_visible_devices"),
                    "same_host": h.info.get("same_host"),
                    "hardware": h.spec.allocation.hardware,
                    "resources": _plain(getattr(h.spec.allocation, "demand", {})),
                    "pid": h.pid,
                }
                for h in self.workers.values()
            ],
            "waiting": dict(self.waiting),
            "strict_gpu": self.strict_gpu,
            "autoscaler_request": [_plain(b) for b in self.requested],
            "logs": log_dir(),
            "spare_worker": False,
            "spares": [],
        }


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ConnectionError when nothing listens at a ``HOST:PORT`` or ``ray://HOST:PORT``
    address (``auto`` is Ray's to find)."""
    rest = address.split("://", 1)[-1]
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return
    host = host.strip("[]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"nothing answers at {host}:{port} ({e.strerror or e}); start the cluster "
            f"(ray start --head) or give its address with --ray-address / RAY_ADDRESS"
        ) from None


def _request_resources(bundles: list[dict[str, float]]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def _ray_accelerator_name(type_name: str) -> str:
    """Ray's accelerator-type name for a catalogue GPU type (``A100``, ``H100``, ``L4``,
    ``L40S``); a type Ray has no name for keeps the catalogue's, spaces as dashes."""
    return type_name.replace(" ", "-")


def _plain(res: dict[str, float]) -> dict[str, float]:
    """Resources without Ray's per-placement-group entries."""
    return {k: v for k, v in res.items() if "_group_" not in k and not k.startswith("node:")}


def _demand_text(alloc: RayAllocation) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in alloc.demand.items() if k != "memory") + (
        f", memory={alloc.demand['memory'] / (1 << 30):g} GiB" if "memory" in alloc.demand else ""
    )

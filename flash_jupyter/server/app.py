"""Run the control plane: the wire server, the HTTP API and the worker provider on one loop.

``flash-jupyter serve`` calls ``serve()`` in the foreground; the client starts the same
thing detached (``python -m flash_jupyter.server``) on first use. The wire listener comes
up first and the runtime file is written at once; the HTTP stack is imported in a thread a
moment later, so a cold first call does not wait for Starlette to load.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .. import __version__, paths
from ..providers import get_provider
from .boot import bind, exclusive
from .control import ControlPlane
from .store import Store
from .wire_server import Connection

HTTP_DELAY = 0.25
HTTP_PATIENCE = 2.0  # load the HTTP stack by then even if jobs keep the loop busy


def _load_http() -> tuple[Any, Any]:
    import uvicorn

    from .http_app import build_app

    return uvicorn, build_app


async def run_server(
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    data_dir: Path | None = None,
    wire_port: int = 0,
    idle_shutdown: float | None = None,
    parent_pid: int | None = None,
    ready_file: Path | None = None,
    http_sock: socket.socket | None = None,
    wire_sock: socket.socket | None = None,
    lock: Any = None,
    spare: Any = None,
    provider: str = "local",
    provider_options: dict[str, Any] | None = None,
) -> None:
    data_dir = paths.ensure_private_dir(Path(data_dir or paths.home()))
    lock = lock or exclusive(data_dir)
    token = token or secrets.token_urlsafe(24)
    instance = secrets.token_hex(4)
    http_sock = http_sock or bind(host, port)
    wire_sock = wire_sock or bind(host, wire_port)
    http_port = http_sock.getsockname()[1]
    wport = wire_sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    spool = paths.spool_dir(data_dir)
    info = {
        "pid": os.getpid(),
        "url": f"http://{url_host}:{http_port}",
        "wire_host": host,
        "wire_port": wport,
        "spool": str(spool),
        "boot_id": paths.boot_id(),
        "instance": instance,
        "data_dir": str(data_dir),
        "version": __version__,
        "started": time.time(),
    }
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(*_: Any) -> None:
        stop.set()

    # First thing: a SIGTERM that arrives during start-up still stops us cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, request_stop)
        except (NotImplementedError, RuntimeError):
            pass
    http_future: asyncio.Future = loop.create_future()

    def load_http(waited: float = 0.0) -> None:
        if not (cp.quiet(0.1) or waited >= HTTP_PATIENCE):
            loop.call_later(0.05, load_http, waited + 0.05)
            return
        # Short GIL slices while the import thread runs: the loop keeps answering promptly.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)

        def loaded(r: asyncio.Future) -> None:
            sys.setswitchinterval(switch)
            http_future.set_result(r.result())

        loop.run_in_executor(None, _load_http).add_done_callback(loaded)

    # The HTTP stack loads after the wire is up, in a thread, in a quiet moment: a cold first
    # call (wire only) does not wait for it, nor share the interpreter lock with it.
    loop.call_later(HTTP_DELAY, load_http)
    store = Store(data_dir / "flash.db")
    workers = get_provider(provider, data_dir=data_dir, **(provider_options or {}))
    cp = ControlPlane(store, workers, token=token, wire_addr=(host, wport), spool=str(spool),
                      spare=spare)  # fmt: skip
    await cp.start()
    public = {k: info[k] for k in ("spool", "boot_id", "instance", "version", "wire_port")}
    wire_server = await loop.create_server(lambda: Connection(cp, public).proto, sock=wire_sock)
    runtime = {**info, "token": token}
    paths.write_runtime(runtime, data_dir)
    if ready_file is not None:
        paths.write_private_json(ready_file, runtime)

    async def start_http() -> Any:
        uvicorn, build_app = await http_future
        server = uvicorn.Server(
            uvicorn.Config(
                build_app(cp, token, public), log_level="warning", lifespan="off",
                access_log=False, timeout_graceful_shutdown=2,
            )
        )  # fmt: skip
        # The control plane owns SIGINT/SIGTERM (it must stop its workers and close the
        # bills); uvicorn's serve() would take them over and re-raise them at its end.
        await server._serve(sockets=[http_sock])

    async def watchdogs() -> None:
        quiet_since = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if parent_pid and not _alive(parent_pid):
                stop.set()
            if idle_shutdown:
                busy = bool(cp.clients) or any(
                    w.live or ep.queue for ep in cp.endpoints.values() for w in ep.workers.values()
                )
                if busy:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > idle_shutdown:
                    stop.set()

    http_task = asyncio.ensure_future(start_http())
    # What start-up made lives as long as the process: keep the collector from walking it
    # again and again (full collections are the control plane's longest pauses).
    import gc

    gc.freeze()
    wd = asyncio.ensure_future(watchdogs())
    await stop.wait()
    wd.cancel()
    wire_server.close()
    await cp.shutdown()
    http_task.cancel()
    try:
        await asyncio.wait_for(http_task, timeout=5)
    except (asyncio.TimeoutError, asyncio.CancelledError, Exception):
        pass
    store.close()
    _remove_runtime(data_dir)
    cp.clean_spool()
    lock.close()


def _remove_runtime(data_dir: Path) -> None:
    current = paths.read_runtime(data_dir)
    if current and current.get("pid") == os.getpid():
        try:
            paths.runtime_file(data_dir).unlink()
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def serve(**kw: Any) -> None:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(run_server(**kw))


def main(argv: list[str] | None = None) -> None:
    from .boot import main as boot

    boot(argv)


if __name__ == "__main__":
    sys.exit(main())

"""``flash-jupyter``: run and inspect the control plane from a shell.

flash-jupyter serve [--host H --port P --token T --new-token --data-dir D]  foreground
                    [--provider local|ray --ray-address A --advertise-host H]
flash-jupyter start [--new-token] | shutdown                     the machine-local one
flash-jupyter env                                                export lines for curl
flash-jupyter status [NAME]                                      endpoints, workers, cost
flash-jupyter logs NAME [--tail N]
flash-jupyter scale NAME MIN,MAX | stop NAME | delete NAME
flash-jupyter billing
flash-jupyter budget [LIMIT|off] [--endpoint NAME]                the spending guard
flash-jupyter build PATH [--set NAME.K=V] | build --deps a,b   environments ahead of time
flash-jupyter envs [prune [--all]]                               environments kept
flash-jupyter deploy PATH | undeploy NAME|PATH | dev PATH        from notebook to app
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from . import __version__, envvars, paths
from .status_text import format_budget, format_status, parse_budget


def _client() -> Any:
    from .client import get_client

    return get_client()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from .server.app import main as serve_main

        serve_main(argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="flash-jupyter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the control plane in the foreground (see serve --help)")
    s = sub.add_parser("start", help="start the machine-local control plane (detached)")
    s.add_argument(
        "--new-token",
        action="store_true",
        help="start it with a new random token, kept from then on (it must not be running)",
    )
    sub.add_parser("shutdown", help="stop the machine-local control plane")
    sub.add_parser("env", help="print FLASH_JUPYTER_URL and FLASH_JUPYTER_TOKEN exports")
    s = sub.add_parser("status", help="endpoints, workers, states and cost")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("logs", help="recent output of an endpoint")
    s.add_argument("name")
    s.add_argument("--tail", type=int, default=100)
    s = sub.add_parser("scale", help="set an endpoint's workers min,max")
    s.add_argument("name")
    s.add_argument("workers", help="MIN,MAX, or N for 0,N (as the workers= setting)")
    s = sub.add_parser("stop", help="scale an endpoint to zero now")
    s.add_argument("name")
    s = sub.add_parser("delete", help="delete an endpoint (cancels its queue)")
    s.add_argument("name")
    sub.add_parser("billing", help="what has been billed, per endpoint")
    s = sub.add_parser(
        "budget",
        help="show or set the spending limit of the session (or of one endpoint)",
        description="Without LIMIT: show the budget. LIMIT in US dollars sets it; off clears "
        "it. At the limit new jobs are refused, running ones finish, idle workers stop.",
    )
    s.add_argument("limit", nargs="?", help="US dollars (e.g. 2.50), or off")
    s.add_argument("--endpoint", help="the limit of this endpoint instead of the session's")
    s.add_argument("--json", action="store_true")
    from .app import commands as app_commands  # build, envs, deploy, undeploy, dev

    app_commands.add_parsers(sub)
    a = p.parse_args(argv)
    from .errors import FlashError

    try:
        return _run(a)
    except (FlashError, envvars.EnvVarError) as e:  # one line: the message says what to do
        print(f"flash-jupyter: {e}", file=sys.stderr)
        return 1


def _run(a: argparse.Namespace) -> int:
    from .app import commands as app_commands

    if a.cmd == "start":
        from .client import start_local

        if a.new_token:
            from .protocol import pid_alive

            running = paths.read_runtime()
            if running and pid_alive(int(running.get("pid", 0))):
                print(
                    f"flash-jupyter: a control plane already runs (pid {running['pid']}) and "
                    "keeps its token: `flash-jupyter shutdown` first, then `start --new-token`",
                    file=sys.stderr,
                )
                return 1
            if envvars.is_set("FLASH_JUPYTER_TOKEN"):
                print("flash-jupyter: --new-token cannot be used with FLASH_JUPYTER_TOKEN",
                      file=sys.stderr)  # fmt: skip
                return 2
        info = start_local(extra_args=["--new-token"] if a.new_token else [])
        print(f"control plane at {info['url']} (pid {info['pid']})")
        return 0
    if a.cmd == "shutdown":
        info = paths.read_runtime()
        if not info:
            print("no control plane is running")
            return 0
        from .protocol import pid_alive

        pid = int(info["pid"])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                is_ours = b"flash_jupyter" in f.read()
        except OSError:
            is_ours = pid_alive(pid)  # no /proc: trust the runtime file
        if not is_ours:
            print("no control plane is running (stale runtime file)")
            return 0
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            print("no control plane is running")
            return 0
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            print(f"control plane (pid {pid}) is still stopping", file=sys.stderr)
            return 1
        print(f"stopped control plane (pid {pid})")
        return 0

    if a.cmd == "env":
        c = _client()
        print(f"export FLASH_JUPYTER_URL={c.url}")
        print(f"export FLASH_JUPYTER_TOKEN={c.token}")
        return 0
    if a.cmd in app_commands.COMMANDS:
        return app_commands.run(a)

    if a.cmd == "budget" and a.limit is not None:  # checked before connecting
        try:
            limit = parse_budget(a.limit)
        except ValueError as e:
            print(f"flash-jupyter: {e}", file=sys.stderr)
            return 2
    if a.cmd == "scale":  # checked before connecting: "N" means (0, N), as workers=N does
        from .config import WorkersTextError, parse_workers_text

        try:  # a range the server would refuse exits 1 (below), as its refusals do
            wmin, wmax = parse_workers_text(a.workers)
        except WorkersTextError as e:
            print(f"flash-jupyter: {e}", file=sys.stderr)
            return 2
    c = _client()
    if a.cmd == "status":
        eps = [c.endpoint(a.name)] if a.name else c.endpoints()
        if a.json:
            print(json.dumps(eps, indent=2))
        else:
            spares = None if a.name else c.spares()
            print(format_status(eps, None if a.name else c.billing(), spares))
    elif a.cmd == "logs":
        for e in c.logs(a.name, a.tail):
            sys.stdout.write(e["text"])
    elif a.cmd == "scale":
        print(json.dumps(c.scale(a.name, wmin, wmax)))
    elif a.cmd == "stop":
        print(json.dumps(c.stop(a.name)))
    elif a.cmd == "delete":
        print(json.dumps(c.delete(a.name)))
    elif a.cmd == "billing":
        print(json.dumps(c.billing(), indent=2))
    elif a.cmd == "budget":
        view = c.set_budget(limit, a.endpoint) if a.limit is not None else c.budget()
        print(json.dumps(view, indent=2) if a.json else format_budget(view, a.endpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())

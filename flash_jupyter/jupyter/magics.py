"""``%%flash`` and ``%flash``: run notebook cells on remote workers.

    %load_ext flash_jupyter

    %%flash gpu=A100 workers=0,2 idle_timeout=30 name=prep
    z = normalise(data)        # normalise and data travel from the notebook
    z[:5]                      # shown as the cell's result; z comes back

The magics speak to the control plane only through ``flash_jupyter.client``.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .. import envvars, errors
from ..catalog import money
from ..client import get_client
from ..config import (
    EndpointConfig,
    Setting,
    default_endpoint_name,
    parse_workers_text,
    settings_from_tokens,
    settings_help,
)
from ..job import Job
from ..status_text import format_budget, format_status, parse_budget
from . import receipts, usage
from .cell_job import CellJob, CellPlan, finish_cell, pickle_cell, plan_cell
from .remote import RemoteValue
from .remote_names import RemoteNames

# A magic-only setting: how big a value may be and still come back.
LIMIT = Setting("limit", None, "int", "bytes: values bigger than this stay on the worker "
                "(default 64 MiB)", "limit=BYTES")  # fmt: skip


def parse_tokens(tokens: list[str]) -> dict[str, Any]:
    """``k=v`` tokens of a magic line into settings (the endpoint settings and ``limit``)."""
    return settings_from_tokens(tokens, extra=(LIMIT,))


# %flash's commands and their usage (the order is the help's).
_COMMANDS = {
    "status": "%flash status",
    "endpoints": "%flash endpoints",
    "logs": "%flash logs NAME",
    "stop": "%flash stop NAME",
    "scale": "%flash scale NAME MIN,MAX",
    "warm": "%flash warm NAME",
    "config": "%flash config [key=value ...] [receipts=on|off]",
    "budget": "%flash budget [LIMIT|off] [--endpoint NAME]",
    "cost": "%flash cost",
}
_NEEDS_NAME = {"logs", "stop", "scale", "warm"}


def _names(v: str | None) -> list[str] | None:
    return None if v is None else [n for n in re.split(r"[,\s]+", v) if n]


@magics_class
class FlashMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.defaults: dict[str, Any] = {}
        self.remote = RemoteNames()
        self.deployed: dict[str, tuple] = {}  # endpoint -> the changes last sent for it
        self.session = envvars.get("JPY_SESSION_NAME") or f"kernel-{os.getpid()}"
        self.lost_notes: list[str] = []  # remote names lost since the kernel started, and why
        self._listening: Any = None  # the client whose state_lost notices we hear

    # ------------------------------------------------------------------ %%flash
    @magic_arguments("%flash")  # usage line: "%%flash ..." (the formatter adds one %)
    @argument("settings", nargs="*", help="key=value settings; on an endpoint that exists, "
              "only those given change (the others stay as they are): " + settings_help(
                  extra=(LIMIT,)))  # fmt: skip
    @argument("--noblock", action="store_true", help="return a handle at once")
    @argument("-o", "--output", default="_flash_job", help="name for the --noblock handle")
    @argument("--out", default=None, help="bring back only these names (a,b)")
    @argument("--keep", default=None, help="keep these names on the worker (a,b)")
    @argument("--local", action="store_true", help="also run the cell here, to compare")
    @cell_magic("flash")
    def flash_cell(self, line: str, cell: str) -> Any:
        """Run this cell on a remote worker of an endpoint (default name: notebook).

        The cell's free names are taken from the notebook (data, functions, classes,
        lambdas; modules are imported again by name on the worker); the names it binds come
        back when they are picklable and under the size limit, and otherwise stay in this
        notebook's namespace on the worker, shown here as a remote proxy that later cells
        on the same endpoint can use. Output streams into this cell while it runs; the
        last expression is the cell's result; interrupting the kernel cancels the job.
        """
        __tracebackhide__ = True
        args = parse_argstring(self.flash_cell, line)
        settings = parse_tokens(args.settings)
        live = receipts.wanted()
        plan, job = self._submit(cell, settings, args, progress=live)
        if args.noblock:
            # The notice first, whole: the job's output starts streaming with the handle.
            print(f"running as {args.output} (job {job.id[:8]} on {plan.endpoint})", flush=True)
            self.shell.user_ns[args.output] = CellJob(job, plan, self._finish)
            if live:
                receipts.track_noblock(job)
            return None
        receipt = receipts.Receipt(plan.endpoint) if live else None
        value = self._finish(job, plan, None, receipt)
        if args.local:
            self._compare_locally(cell, plan)
        if DisplayHook.semicolon_at_end_of_expression(cell):
            return None  # `x;` shows nothing, as in any cell (the names still came back)
        return value

    def _config(self, given: dict[str, Any]) -> tuple[EndpointConfig, dict[str, Any], Any]:
        """The endpoint a cell runs on, the changes it asks for, and its ``limit``.

        Settings are changes: on an endpoint that exists, what the cell (or the session's
        defaults) leaves out stays as it is; a new endpoint starts from the defaults. With
        no name, the name follows the hardware and environment asked for, so notebooks
        asking for different ones never share (and never rebuild) each other's workers.
        """
        changes = {**self.defaults, **given}
        limit = changes.pop("limit", None)
        name = changes.pop("name", None) or default_endpoint_name(changes)
        return EndpointConfig.build(name, **changes), changes, limit

    def _cell_filename(self, cell: str) -> str:
        """The cell's source in linecache under IPython's name for it ("Cell In[n]"), so a
        traceback, remote or not, shows its lines like a local one's. IPython 9 counts the
        running cell before running it: its number is the ExecutionResult's."""
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None) or self.shell.execution_count
        return self.shell.compile.cache(cell, number)

    def _submit(
        self, cell: str, settings: dict[str, Any], args: Any, progress: bool = False
    ) -> tuple[CellPlan, Job]:
        """Send the cell. ``progress``: ask for progress frames (its receipt)."""
        __tracebackhide__ = True
        config, changes, limit = self._config(settings)
        name = config.name
        filename = self._cell_filename(cell)
        plan = plan_cell(cell, session=self.session, endpoint=name, ns=self.shell.user_ns,
                         remote=self.remote, filename=filename, keep=_names(args.keep),
                         out=_names(args.out), limit=limit)  # fmt: skip
        payload = pickle_cell(plan, filename)
        # Only now, with the cell known to be sendable, create or update the endpoint.
        client = get_client()
        if self._listening is not client:
            client.on_state_lost.append(self._on_state_lost)
            self._listening = client
        sent = tuple(sorted((k, repr(v)) for k, v in changes.items()))
        if self.deployed.get(name) != sent or name not in client.deployed:
            client.deploy(config.to_dict(), changes=changes, serves="cells")
            self.deployed[name] = sent
        usage.note(config)
        state = client.submit(name, None, payload, plan.affinity, progress=progress)
        return plan, Job(state, client, f"endpoint {name}")

    def _on_state_lost(self, notice: dict[str, Any]) -> None:
        """The control plane says a worker holding remote names went: mark this notebook's
        proxies lost now (with the reason), not at their next use."""
        who, reason = notice.get("worker", ""), notice.get("reason", "")
        mine = (notice.get("names") or {}).get(self.session) or []
        why = (f"{', '.join(mine) or 'the names of this notebook'} lived on worker {who} "
               f"(endpoint {notice.get('endpoint')}), which is gone: {reason}; run the cells "
               f"that define them again")  # fmt: skip
        gone = self.remote.worker_gone(who, notice.get("incarnation", -1), why)
        for endpoint, names in gone.items():
            lost = ", ".join(names)
            self.lost_notes.append(f"lost {lost} on {endpoint} (worker {who}): {reason}")

    def _finish(self, job: Job, plan: CellPlan, timeout: float | None, live: Any = None) -> Any:
        __tracebackhide__ = True
        return finish_cell(job, plan, self.remote, self.shell.user_ns, self._fetch, timeout,
                           live)  # fmt: skip

    def _fetch(self, proxy: RemoteValue) -> Any:
        settings = {"name": proxy.endpoint, "limit": 1 << 62}  # the endpoint as it is
        args = parse_argstring(self.flash_cell, "")
        plan, job = self._submit(proxy.name, settings, args)
        return self._finish(job, plan, None)

    def _compare_locally(self, cell: str, plan: CellPlan) -> None:
        """Run the cell here too, in a copy of the namespace, and compare what it binds."""
        local_ns = {k: v for k, v in self.shell.user_ns.items() if not isinstance(v, RemoteValue)}
        exec(compile(cell, "<local copy of the cell>", "exec"), local_ns)
        same, differ = [], []
        for n in plan.names.bound:
            try:
                eq = local_ns.get(n) == self.shell.user_ns.get(n)
                eq = bool(eq.all()) if hasattr(eq, "all") else bool(eq)
            except Exception:  # values that do not compare
                eq = False
            (same if eq else differ).append(n)
        print(f"local run: same {', '.join(same) or '-'}; differs {', '.join(differ) or '-'}")

    # ------------------------------------------------------------------ %flash
    @magic_arguments("flash")
    @argument("command", nargs="?", default="status",
              help="status | endpoints | logs NAME | stop NAME | scale NAME MIN,MAX | "
              "warm NAME | config [key=value ...] [receipts=on|off] | "
              "budget [LIMIT|off] [--endpoint NAME] | cost")  # fmt: skip
    @argument("rest", nargs="*")
    @argument("--endpoint", default=None, help="budget: the limit of this endpoint only")
    @argument("--text", action="store_true", help="status: as text, not the live dashboard")
    @line_magic("flash")
    def flash_line(self, line: str) -> Any:
        """Inspect and steer endpoints: %flash status | endpoints | logs NAME | stop NAME |
        scale NAME MIN,MAX | warm NAME | config [key=value ...] [receipts=on|off] |
        budget [LIMIT|off] [--endpoint NAME] | cost

        status: the live dashboard (with ipywidgets; --text, or without it: a text table).
        config: session defaults for %%flash cells (endpoint settings, as on a %%flash
        line); receipts=off|on turns this kernel's live receipts and progress bars off or
        on (a display setting: FLASH_JUPYTER_RECEIPTS=0 does it for every kernel).
        budget: the control plane's spending guard: LIMIT in USD for the session's spend
        (or one endpoint's, --endpoint NAME), off to clear it; no argument: show it.
        cost: what the session billed for the endpoints this notebook used, beside what a
        whole-kernel GPU notebook would have cost since its first GPU cell.
        """
        args = parse_argstring(self.flash_line, line)
        cmd, rest = args.command, args.rest
        if cmd not in _COMMANDS:
            import difflib

            close = difflib.get_close_matches(cmd, _COMMANDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise errors.ConfigError(
                f"unknown %flash command {cmd!r}; {hint}commands: {', '.join(_COMMANDS)}"
            )
        if cmd in _NEEDS_NAME and not rest:
            raise errors.ConfigError(f"%flash {cmd} needs an endpoint name: {_COMMANDS[cmd]}")
        if args.endpoint is not None and cmd != "budget":
            raise errors.ConfigError(f"--endpoint goes with %flash budget: {_COMMANDS['budget']}")
        if cmd == "config":
            self._config_command(rest)
            return None
        if cmd == "budget":
            limit = _budget_limit(rest)  # checked before anything is started
        if cmd == "scale":  # checked before anything is started
            if len(rest) != 2:
                raise errors.ConfigError(f"usage: {_COMMANDS['scale']}")
            try:
                wmin, wmax = parse_workers_text(rest[1])
            except errors.ConfigError as e:  # one kind of error for a magic's bad value
                raise errors.ConfigError(str(e)) from None
        client = get_client()
        if cmd == "status":
            board = None if args.text else _dashboard()
            if board is not None:
                from IPython.display import display

                display(board)
            else:
                print(format_status(client.endpoints(), client.billing(), client.spares()))
            for line in self.remote.summary() + self.lost_notes[-10:]:
                print(line)
            return None
        if cmd == "endpoints":
            for e in client.endpoints():
                h = e["health"]["workers"]
                print(f"{e['name']:24} {e['hardware']:12} ready {h['ready']}  running "
                      f"{h['running']}  cost {money(e['cost'])}")  # fmt: skip
            return None
        if cmd == "budget":
            if limit is not _SHOW:
                view = client.set_budget(limit, args.endpoint)
            else:
                view = client.budget()
            print(format_budget(view, args.endpoint, how="%flash budget"))
            return None
        if cmd == "cost":
            from IPython.display import display

            display(usage.cost_view(client.billing(), client.endpoints()))
            return None
        name = rest[0]
        if cmd == "logs":
            for entry in client.logs(name):
                sys.stdout.write(entry["text"])
        elif cmd == "stop":
            client.stop(name)
            print(f"stopping {name}: its workers (and any remote state on them) go now")
        elif cmd == "scale":
            print(client.scale(name, wmin, wmax))
        elif cmd == "warm":
            args = parse_argstring(self.flash_cell, "")
            live = receipts.wanted()
            plan, job = self._submit("pass", {"name": name}, args, progress=live)
            self._finish(job, plan, None, receipts.Receipt(name) if live else None)
            print(f"{name}: a worker is warm")
        return None

    def _config_command(self, tokens: list[str]) -> None:
        """``%flash config``: endpoint defaults for %%flash cells, and the kernel's display
        setting ``receipts`` (not an endpoint setting: it never reaches the control plane).
        Everything is checked before anything is kept."""
        shown = [t for t in tokens if t.split("=", 1)[0].strip().lower() == "receipts"]
        rest = [t for t in tokens if t not in shown]
        on = None
        for t in shown:
            value = t.split("=", 1)[1].strip().lower() if "=" in t else ""
            if value not in _ON_OFF:
                raise errors.ConfigError(
                    f"receipts takes on or off, not {value!r}: %flash config receipts=off"
                )
            on = _ON_OFF[value]
        new = parse_tokens(rest) if rest else {}
        if new:
            self._config(new)  # validate before keeping
        self.defaults.update(new)
        if on is not None:
            receipts.set_enabled(on)
        print("session defaults for %%flash:", self.defaults or "(none)")
        print(f"receipts: {'on' if receipts.enabled() else 'off'} (live status and progress "
              f"in this kernel: %flash config receipts=on|off)")  # fmt: skip


_ON_OFF = {"on": True, "1": True, "true": True, "yes": True,
           "off": False, "0": False, "false": False, "no": False}  # fmt: skip
_SHOW = object()  # %flash budget with no limit: show it


def _budget_limit(rest: list[str]) -> Any:
    """``%flash budget``'s argument: a limit in USD, None for off, or _SHOW."""
    if not rest:
        return _SHOW
    if len(rest) > 1:
        raise errors.ConfigError(f"usage: {_COMMANDS['budget']}")
    try:
        return parse_budget(rest[0])
    except ValueError as e:
        raise errors.ConfigError(f"{e}: %flash budget 2.50") from None


def _dashboard() -> Any:
    """The live dashboard widget, when ipywidgets and the dashboard are here; else None."""
    try:
        import ipywidgets  # noqa: F401

        from .dashboard import dashboard
    except ImportError:
        return None
    return dashboard()


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(FlashMagics)
    for kind in ("cell", "line"):
        table = ip.magics_manager.magics[kind]
        if "flash" in table:
            table["flash"] = _user_frames_only(table["flash"])


def _user_frames_only(magic: Any) -> Any:
    """The magic, its errors shown with the user's lines only (``errors.at_boundary``):
    the remote frames, the cell line an error found before sending points at, or just the
    message; never our frames nor the ``run_cell_magic(...)`` line IPython makes of a cell."""
    import functools

    @functools.wraps(magic)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return magic(*args, **kwargs)
        except BaseException as e:
            errors.at_boundary(e)
            raise

    return run

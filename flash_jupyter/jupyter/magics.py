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

from .. import errors
from ..client import get_client
from ..config import EndpointConfig
from ..job import Job
from .cell_job import CellJob, CellPlan, finish_cell, pickle_cell, plan_cell
from .remote import RemoteValue
from .remote_names import RemoteNames

DEFAULT_ENDPOINT = "notebook"
_KEYS = {
    "gpu", "cpu", "gpu_count", "workers", "idle_timeout", "name", "deps", "dependencies",
    "env", "timeout", "execution_timeout", "max_concurrency", "limit",
}  # fmt: skip


def parse_tokens(tokens: list[str]) -> dict[str, Any]:
    """``k=v`` tokens of a magic line into settings (env=K=V may repeat)."""
    out: dict[str, Any] = {}
    for tok in tokens:
        if "=" not in tok:
            raise errors.ConfigError(f"expected key=value, got {tok!r} (see %%flash?)")
        k, v = tok.split("=", 1)
        k = k.strip().replace("-", "_")
        if k not in _KEYS:
            raise errors.ConfigError(f"unknown setting {k!r}; known: {', '.join(sorted(_KEYS))}")
        if k == "env":
            ek, sep, ev = v.partition("=")
            if not sep:
                raise errors.ConfigError(f"env needs K=V, got {v!r}")
            out.setdefault("env", {})[ek] = ev
        elif k in ("deps", "dependencies"):
            out["dependencies"] = [d for d in v.split(",") if d]
        elif k == "gpu":
            out["gpu"] = v.split(",") if "," in v else v
        elif k in ("gpu_count", "max_concurrency", "limit"):
            out[k] = int(v)
        elif k in ("idle_timeout", "timeout", "execution_timeout"):
            out["execution_timeout" if k == "timeout" else k] = float(v)
        elif k == "workers":
            out["workers"] = v
        else:
            out[k] = v
    return out


def _names(v: str | None) -> list[str] | None:
    return None if v is None else [n for n in re.split(r"[,\s]+", v) if n]


@magics_class
class FlashMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.defaults: dict[str, Any] = {}
        self.remote = RemoteNames()
        self.deployed: dict[str, str] = {}  # endpoint -> config hash sent
        self.used: dict[str, dict[str, Any]] = {}  # endpoint -> settings of its last cell
        self.session = os.environ.get("JPY_SESSION_NAME") or f"kernel-{os.getpid()}"

    # ------------------------------------------------------------------ %%flash
    @magic_arguments("%flash")  # usage line: "%%flash ..." (the formatter adds one %)
    @argument("settings", nargs="*", help="key=value: gpu, cpu, gpu_count, workers=MIN,MAX, "
              "idle_timeout, name, deps=a,b, env=K=V, timeout, max_concurrency, limit (bytes: "
              "values bigger than this stay on the worker; default 64 MiB)")  # fmt: skip
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
        settings = {**self.defaults, **parse_tokens(args.settings)}
        plan, job = self._submit(cell, settings, args)
        if args.noblock:
            handle = CellJob(job, plan, self._finish)
            self.shell.user_ns[args.output] = handle
            print(f"running as {args.output} (job {job.id[:8]} on {plan.endpoint})")
            return None
        value = self._finish(job, plan, None)
        if args.local:
            self._compare_locally(cell, plan)
        if DisplayHook.semicolon_at_end_of_expression(cell):
            return None  # `x;` shows nothing, as in any cell (the names still came back)
        return value

    def _config(self, settings: dict[str, Any]) -> tuple[EndpointConfig, dict[str, Any]]:
        s = dict(settings)
        name = s.pop("name", DEFAULT_ENDPOINT)
        extra = {"limit": s.pop("limit", None)}
        return EndpointConfig.build(name, **s), extra

    def _cell_filename(self, cell: str) -> str:
        """The cell's source in linecache under IPython's name for it ("Cell In[n]"), so a
        traceback, remote or not, shows its lines like a local one's. IPython 9 counts the
        running cell before running it: its number is the ExecutionResult's."""
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None) or self.shell.execution_count
        return self.shell.compile.cache(cell, number)

    def _submit(self, cell: str, settings: dict[str, Any], args: Any) -> tuple[CellPlan, Job]:
        __tracebackhide__ = True
        config, extra = self._config(settings)
        name = config.name
        self.used[name] = {k: v for k, v in settings.items() if k != "limit"}
        filename = self._cell_filename(cell)
        plan = plan_cell(cell, session=self.session, endpoint=name, ns=self.shell.user_ns,
                         remote=self.remote, filename=filename, keep=_names(args.keep),
                         out=_names(args.out), limit=extra["limit"])  # fmt: skip
        payload = pickle_cell(plan, filename)
        # Only now, with the cell known to be sendable, create or update the endpoint.
        client = get_client()
        if self.deployed.get(name) != config.config_hash or name not in client.deployed:
            client.deploy(config.to_dict())
            self.deployed[name] = config.config_hash
        state = client.submit(name, None, payload, plan.affinity)
        return plan, Job(state, client, f"endpoint {name}")

    def _finish(self, job: Job, plan: CellPlan, timeout: float | None) -> Any:
        __tracebackhide__ = True
        return finish_cell(job, plan, self.remote, self.shell.user_ns, self._fetch, timeout)

    def _settings_of(self, endpoint: str) -> dict[str, Any]:
        """The settings this notebook last used for an endpoint (so that fetching from it or
        warming it never redeploys it with other settings)."""
        return dict(self.used.get(endpoint) or {**self.defaults, "name": endpoint})

    def _fetch(self, proxy: RemoteValue) -> Any:
        settings = {**self._settings_of(proxy.endpoint), "limit": 1 << 62}
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
              "warm NAME | config [key=value ...]")  # fmt: skip
    @argument("rest", nargs="*")
    @line_magic("flash")
    def flash_line(self, line: str) -> Any:
        """Inspect and steer endpoints: %flash status | endpoints | logs NAME | stop NAME |
        scale NAME MIN,MAX | warm NAME | config [key=value ...]"""
        args = parse_argstring(self.flash_line, line)
        cmd, rest = args.command, args.rest
        client = get_client()
        if cmd == "config":
            if rest:
                new = parse_tokens(rest)
                self._config({**self.defaults, **new})  # validate before keeping
                self.defaults.update(new)
            print("session defaults for %%flash:", self.defaults or "(none)")
            return None
        if cmd == "status":
            from ..cli import format_status

            print(format_status(client.endpoints(), client.billing()))
            for line in self.remote.summary():
                print(line)
            return None
        if cmd == "endpoints":
            for e in client.endpoints():
                h = e["health"]["workers"]
                print(f"{e['name']:24} {e['hardware']:12} ready {h['ready']}  running "
                      f"{h['running']}  cost ${e['cost']:.6f}")  # fmt: skip
            return None
        if not rest:
            raise errors.ConfigError(f"%flash {cmd} needs an endpoint name")
        name = rest[0]
        if cmd == "logs":
            for entry in client.logs(name):
                sys.stdout.write(entry["text"])
        elif cmd == "stop":
            client.stop(name)
            print(f"stopping {name}: its workers (and any remote state on them) go now")
        elif cmd == "scale":
            if len(rest) < 2:
                raise errors.ConfigError("usage: %flash scale NAME MIN,MAX")
            lo, sep, hi = rest[1].partition(",")
            wmin, wmax = (int(lo), int(hi)) if sep else (0, int(lo))
            print(client.scale(name, wmin, wmax))
        elif cmd == "warm":
            settings = self._settings_of(name)
            plan, job = self._submit("pass", settings, parse_argstring(self.flash_cell, ""))
            self._finish(job, plan, None)
            print(f"{name}: a worker is warm")
        else:
            raise errors.ConfigError(f"unknown %flash command {cmd!r} (see %flash?)")
        return None


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(FlashMagics)

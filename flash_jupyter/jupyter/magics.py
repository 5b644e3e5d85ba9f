"""``%%flash`` and ``%flash``: run notebook cells on remote workers.

    %load_ext flash_jupyter

    %%flash gpu=A100 workers=0,2 idle_timeout=30 name=prep
    z = normalise(data)        # normalise and data travel from the notebook
    z[:5]                      # shown as the cell's result; z comes back

The magics speak to the control plane only through ``flash_jupyter.client``.
"""

from __future__ import annotations

import contextvars
import os
import re
import sys
import threading
from typing import Any

from IPython.core.displayhook import DisplayHook
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from .. import errors, wire
from ..client import get_client
from ..config import EndpointConfig
from ..endpoint import Job, _decode, _emit
from . import cellcode
from .remote import RemoteValue

DEFAULT_ENDPOINT = "notebook"
# Names IPython keeps in the user namespace that are never the user's data.
_IPYTHON_NAMES = re.compile(r"^(_+|_i+|_i?\d+|_ii+|_oh|_dh|In|Out|get_ipython|exit|quit|_ih)$")
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


def _at_line(exc: BaseException, filename: str, lineno: int) -> BaseException:
    """Point an error found before sending at the cell line that caused it."""
    tb = wire.fake_traceback([{"filename": filename, "lineno": lineno, "name": "<module>"}])
    return exc.with_traceback(tb) if tb is not None else exc


def _names(v: str | None) -> list[str] | None:
    return None if v is None else [n for n in re.split(r"[,\s]+", v) if n]


class CellJob:
    """A ``%%flash --noblock`` cell in flight. Its output keeps streaming into the cell that
    started it, whatever runs meanwhile; ``result()`` waits, brings the names back into the
    notebook and returns the cell's last value."""

    def __init__(self, magics: FlashMagics, job: Job, endpoint: str, plan: dict[str, Any]):
        self._magics, self._job, self.endpoint, self._plan = magics, job, endpoint, plan
        self.id = job.id
        self._streamed = threading.Event()
        # The kernel routes output by a context variable holding the cell it belongs to:
        # a thread running in a copy of this cell's context writes into this cell.
        ctx = contextvars.copy_context()
        threading.Thread(target=ctx.run, args=(self._stream,), daemon=True,
                         name=f"flash-cell-{job.id[:8]}").start()  # fmt: skip

    def _stream(self) -> None:
        events = self._job._state.events
        while True:
            kind, data = events.get()
            if kind == "done":
                events.put((kind, data))  # for result()
                self._streamed.set()
                return
            _emit(kind, data)

    def __repr__(self) -> str:
        return f"<flash cell {self.id[:8]} on {self.endpoint}: {self.status()}>"

    def status(self) -> str:
        return self._job.status()

    def done(self) -> bool:
        return self._job.done()

    def cancel(self) -> None:
        self._job.cancel()

    def result(self, timeout: float | None = None) -> Any:
        __tracebackhide__ = True
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self._streamed.wait(0.2):  # short slices: interrupts get through
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"cell {self.id[:8]} not done after {timeout:g} s")
        except KeyboardInterrupt:
            self.cancel()
            raise
        return self._magics._finish(self._job, self.endpoint, self._plan, timeout)


@magics_class
class FlashMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.defaults: dict[str, Any] = {}
        self.remote: dict[str, dict[str, RemoteValue]] = {}  # endpoint -> name -> proxy
        self.home: dict[str, tuple[str, int, str]] = {}  # endpoint -> (worker, inc, hw)
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
        endpoint, plan, job = self._submit(cell, settings, args)
        if args.noblock:
            handle = CellJob(self, job, endpoint, plan)
            self.shell.user_ns[args.output] = handle
            print(f"running as {args.output} (job {job.id[:8]} on {endpoint})")
            return None
        value = self._finish(job, endpoint, plan, None)
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

    def _submit(self, cell: str, settings: dict[str, Any], args: Any) -> tuple[str, dict, Job]:
        __tracebackhide__ = True
        config, extra = self._config(settings)
        name = config.name
        self.used[name] = {k: v for k, v in settings.items() if k != "limit"}
        names = cellcode.analyse(cell)
        ns = self.shell.user_ns
        mine = self.remote.get(name, {})
        # A proxy stands for the name only while the notebook still holds it: a local
        # `m = ...` or `del m` since then wins, as it would in Python.
        for n in [n for n, p in mine.items() if ns.get(n) is not p]:
            del mine[n]
        # The cell's source in linecache under IPython's name for it ("Cell In[n]"), so a
        # traceback, remote or not, shows its lines like a local one's. IPython 9 counts
        # the running cell before running it: its number is the ExecutionResult's.
        running = getattr(self.shell.displayhook, "exec_result", None)
        number = getattr(running, "execution_count", None) or self.shell.execution_count
        filename = self.shell.compile.cache(cell, number)
        missing = cellcode.undefined(names, ns.keys())
        if missing:
            n = missing[0]
            raise _at_line(NameError(f"name {n!r} is not defined", name=n), filename,
                           names.first_use.get(n, 1))  # fmt: skip
        needs_remote = sorted(n for n in names.loaded if n in mine)
        inputs = {}
        drop: list[str] = []
        for n in sorted(names.loaded - names.bound_first):
            if n in mine or n not in ns or _IPYTHON_NAMES.match(n):
                continue
            v = ns[n]
            if isinstance(v, RemoteValue):  # lost, or held by another endpoint
                drop.append(n)  # no older copy on this worker may stand in for it
                if n in names.bound_anywhere:
                    continue  # the cell may bind it first; if not, NameError there
                why = v.lost or (
                    f"{n} lives on endpoint {v.endpoint} (worker {v.worker}), "
                    f"not on {name}: bring it here with {n}.fetch() first"
                )
                raise _at_line(errors.RemoteStateLost(why, [n]), filename,
                               names.first_use.get(n, 1))  # fmt: skip
            inputs[n] = v
        opts = {"bound": names.bound, "keep": _names(args.keep), "out": _names(args.out),
                "limit": extra["limit"], "filename": filename,
                "needs_remote": needs_remote, "drop": drop}  # fmt: skip
        call = ("cell", self.session, cell, inputs, opts)
        try:
            payload = wire.dumps(call, what="cell")
        except errors.SerializationError as e:
            for n, v in inputs.items():
                try:
                    wire.dumps(v, what=f"notebook variable {n!r}")
                except errors.SerializationError as named:
                    raise _at_line(named, filename, names.first_use.get(n, 1)) from None
            raise _at_line(e, filename, 1) from None
        # Only now, with the cell known to be sendable, create or update the endpoint.
        client = get_client()
        if self.deployed.get(name) != config.config_hash or name not in client.deployed:
            client.deploy(config.to_dict())
            self.deployed[name] = config.config_hash
        affinity = None
        home = self.home.get(name)
        if home and mine:
            affinity = {"worker": home[0], "incarnation": home[1],
                        "strict": bool(needs_remote), "names": needs_remote}  # fmt: skip
        state = client.submit(name, None, payload, affinity)
        return name, {"opts": opts, "names": names}, Job(state, client, f"endpoint {name}")

    def _finish(self, job: Job, endpoint: str, plan: dict, timeout: float | None) -> Any:
        __tracebackhide__ = True
        try:
            outcome = job._wait(timeout)
        except KeyboardInterrupt:
            job.cancel()
            raise
        wid = outcome.get("workerId", "?")
        hw = outcome.get("hardware", "")
        where = f"endpoint {endpoint}"
        err = outcome.get("error") or {}
        if outcome.get("status") == "FAILED" and err.get("type") == "RemoteStateLost":
            self._forget(endpoint, err.get("worker"), err.get("message", ""))
            raise errors.RemoteStateLost(err.get("message", "remote state lost"), err.get("names"))
        try:
            result = _decode(outcome, where)
        except errors.RemoteStateLost as e:
            self._forget(endpoint, wid)
            raise errors.RemoteStateLost(f"{e} (on {where}, worker {wid})", e.names) from None
        inc = int(outcome.get("workerIncarnation") or 0)
        home = self.home.get(endpoint)
        if home and (home[0], home[1]) != (wid, inc):
            lost = self._forget(endpoint, home[0])
            if lost:
                verb = "was" if len(lost) == 1 else "were"
                print(f"note: {', '.join(lost)} {verb} lost with worker {home[0]}", file=sys.stderr)
        self.home[endpoint] = (wid, inc, hw)
        ns = self.shell.user_ns
        mine = self.remote.setdefault(endpoint, {})
        for n, v in result["values"].items():
            ns[n] = v
            mine.pop(n, None)
        for n, info in result["remote"].items():
            proxy = RemoteValue(n, endpoint, wid, inc, hw, info, self._fetch)
            ns[n] = proxy
            mine[n] = proxy
        if "last_remote" in result:
            info = dict(result["last_remote"], mime=result.get("last_mime"))
            return RemoteValue("_", endpoint, wid, inc, hw, info, None)
        return result.get("last")

    def _forget(self, endpoint: str, worker: str | None, why: str = "") -> list[str]:
        """Drop the proxies of names that lived on a worker that is gone."""
        mine = self.remote.get(endpoint, {})
        lost = sorted(n for n, p in mine.items() if worker is None or p.worker == worker)
        for n in lost:
            p = mine.pop(n)
            p.lost = why or f"{n} lived on worker {p.worker}, which is gone"
        self.home.pop(endpoint, None)
        return lost

    def _settings_of(self, endpoint: str) -> dict[str, Any]:
        """The settings this notebook last used for an endpoint (so that fetching from it or
        warming it never redeploys it with other settings)."""
        return dict(self.used.get(endpoint) or {**self.defaults, "name": endpoint})

    def _fetch(self, proxy: RemoteValue) -> Any:
        settings = {**self._settings_of(proxy.endpoint), "limit": 1 << 62}
        args = parse_argstring(self.flash_cell, "")
        endpoint, plan, job = self._submit(proxy.name, settings, args)
        return self._finish(job, endpoint, plan, None)

    def _compare_locally(self, cell: str, plan: dict) -> None:
        """Run the cell here too, in a copy of the namespace, and compare what it binds."""
        local_ns = {k: v for k, v in self.shell.user_ns.items() if not isinstance(v, RemoteValue)}
        exec(compile(cell, "<local copy of the cell>", "exec"), local_ns)
        same, differ = [], []
        for n in plan["names"].bound:
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
            for ep, names in self.remote.items():
                if names:
                    home = self.home.get(ep, ("?", 0, ""))
                    print(f"remote state of this notebook on {home[0]} ({ep}): "
                          f"{', '.join(sorted(names))}")  # fmt: skip
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
            endpoint, plan, job = self._submit(
                "pass", settings, parse_argstring(self.flash_cell, "")
            )
            self._finish(job, endpoint, plan, None)
            print(f"{name}: a worker is warm")
        else:
            raise errors.ConfigError(f"unknown %flash command {cmd!r} (see %flash?)")
        return None


def load_ipython_extension(ip: Any) -> None:
    ip.register_magics(FlashMagics)

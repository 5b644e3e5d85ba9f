"""``flash-jupyter deploy`` and ``undeploy``: every endpoint of a .py file, a package folder or a
notebook registered with the control plane at its settings, with a handler that answers HTTP.

The user's file is read (``discover``: its syntax tree; a plain file's text travels in the
handler) but never imported here: its code runs only on the workers (``handlers.py``).
Flash's naming rules are the control plane's: same name and settings reuse the endpoint,
changed settings update it, a new name creates it.
"""

from __future__ import annotations

import ast
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import errors, wire
from ..config import EndpointConfig
from . import handlers

Echo = Callable[[str], None]

SERVES = {"function": "function", "class": "class", "cell": "cells", "runpod": "function"}
READY_TIMEOUT = 120.0  # seconds deploy waits for `min` workers before moving on


@dataclass
class Target:
    """One endpoint to register: a function, a class, or a notebook's cells of one name."""

    name: str
    kind: str  # "function" | "class" | "cell"
    config: EndpointConfig
    found: list[Any]  # discover.Found records (several for cells sharing an endpoint)
    handler: Any

    @property
    def serves(self) -> str:
        return SERVES[self.kind]

    @property
    def where(self) -> str:
        f = self.found[0]
        if self.kind == "cell":
            cells = ", ".join(str(x.cell_index) for x in self.found)
            return f"{Path(f.file).name} cell{'s' if len(self.found) > 1 else ''} {cells}"
        return f"{f.where} {f.qualname}"


@dataclass
class Deployed:
    """What ``deploy`` did for one endpoint, and how HTTP callers reach it."""

    name: str
    kind: str
    action: str  # "created" | "updated" | "reused"
    config_hash: str
    urls: dict[str, str] = field(default_factory=dict)
    example: dict[str, Any] = field(default_factory=dict)
    curl: str = ""


def discover(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> Any:
    """The static discovery (``app/discover.py``), with a clear error for a bad path."""
    p = Path(path)
    if not p.exists():
        raise errors.ConfigError(f"{path}: no such file or folder (give a .py file, a package "
                                 f"folder or an .ipynb)")  # fmt: skip
    from .discover import discover as find

    return find(p, overrides)


# ---------------------------------------------------------------- targets
def targets(found: list[Any]) -> list[Target]:
    """The endpoints to register: one per function or class; a notebook's cells grouped by
    endpoint name in notebook order (the last cell's configuration: discovery applies each
    cell's settings as changes, as the magic does). A second definition of a name (which
    discovery reports as a problem) is left out."""
    out: dict[str, Target] = {}
    digests: dict[str, str] = {}
    for f in sorted(found, key=lambda f: (str(f.file), f.cell_index or 0, f.line)):
        t = out.get(f.name)
        if t is None:
            out[f.name] = Target(f.name, f.kind, f.config, [f], _handler(f, digests))
        elif f.kind == "cell" and t.kind == "cell":
            t.found.append(f)
            t.config = f.config
            t.handler = handlers.run_cell([x.source or "" for x in t.found], f.file)
    return list(out.values())


def _handler(f: Any, digests: dict[str, str]) -> Any:
    if f.kind == "cell":
        return handlers.run_cell([f.source or ""], f.file)
    file = str(f.file)
    if f.cell_index is not None:  # @Endpoint in a notebook's code cell
        code = notebook_code(Path(file), f.cell_index)
        digest = handlers.digest_of([code])
    elif f.module_name:  # inside a package: imported from there, by its dotted name
        code, digest = None, _package_digest(file, f.module_name, digests)
    else:  # a plain file: its text as deployed travels with the handler
        code = Path(file).read_text(encoding="utf-8")
        digest = handlers.digest_of([code])
    if f.kind == "runpod":  # a Runpod worker file: its start() config's handler
        from ..runpod_worker.handler import RunpodHandler

        return RunpodHandler(file, f.module_name, code, digest)
    make = handlers.call_method if f.kind == "class" else handlers.call_function
    return make(file, f.module_name, f.qualname, code, digest)


def _package_digest(file: str, module_name: str, digests: dict[str, str]) -> str:
    """A fingerprint of the whole top-level package (or module): an edit anywhere in it
    reaches warm workers at their next request."""
    parent = handlers.package_root(file, module_name)
    top = parent / module_name.split(".")[0]
    key = str(top)
    if key not in digests:
        files = sorted(top.rglob("*.py")) if top.is_dir() else [Path(file)]
        digests[key] = handlers.digest_of(
            f"{p.relative_to(parent)}\n{p.read_text(encoding='utf-8', errors='replace')}"
            for p in files
        )
    return digests[key]


def notebook_code(nb: Path, cell_index: int) -> str:
    """The code an ``@Endpoint`` defined in a notebook's cell needs, without the notebook's
    other work: from every ordinary code cell up to and including that one, the imports, the
    function and class definitions, and assignments of literal constants (``%%flash`` cells
    and everything else, training loops included, are left out)."""
    from .discover import _cell_text, _python_of_cell

    cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
    parts: list[str] = []
    for i, cell in enumerate(cells[: cell_index + 1]):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        text = _cell_text(cell)
        code = None if text.lstrip().startswith("%%flash") else _python_of_cell(text)
        if code is None:
            continue
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, _KEEP) or (isinstance(node, ast.Assign) and _literal(node.value)):
                parts.append(f"# cell {i + 1}, line {node.lineno}\n{ast.unparse(node)}")
    return "\n\n".join(parts) + "\n"


_KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------- deploy
def register(client: Any, t: Target) -> dict[str, Any]:
    """Create, update or reuse the endpoint with its HTTP handler; the control plane's answer
    (``action``: created, updated or reused)."""
    payload = wire.dumps(t.handler, what=f"the handler of endpoint {t.name!r}")
    return client.deploy(t.config.to_dict(), payload, serves=t.serves)


def deploy(
    path: str | Path,
    *,
    echo: Echo = print,
    build: bool = True,
    wait: bool = True,
    client: Any = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[Deployed]:
    """Find the endpoints of ``path``, build their environments, register them, bring up
    their ``min`` workers, and print how to call each one over HTTP. Endpoints that a
    problem blocks are listed first; the others deploy, then ``ConfigError`` says so."""
    if client is None:
        from ..client import get_client

        client = get_client()
    plan, answers, problems = register_all(
        path, client, echo=echo, build=build, overrides=overrides
    )
    done: list[Deployed] = []
    for t, answer in zip(plan, answers, strict=True):
        example = example_input(t)
        done.append(
            Deployed(t.name, t.kind, answer["action"], answer["config_hash"],
                     job_urls(client.url, t.name), example, curl_line(client.url, t.name, example))
        )  # fmt: skip
    bring_up(client, plan, echo, wait)
    echo("")
    for d in done:
        echo(f"{d.name} ({d.kind}):")
        for label, url in d.urls.items():
            echo(f"  {label:<8} {url}")
        echo(f"  {d.curl}")
    echo("")
    echo('The curl lines read the token from $FLASH_JUPYTER_TOKEN: eval "$(flash-jupyter env)"')
    if problems:
        raise errors.ConfigError(f"{_count(problems, 'problem')} kept endpoints from being "
                                 f"deployed (listed first): fix them and deploy again")  # fmt: skip
    return done


def _count(items: list[Any], word: str) -> str:
    return f"{len(items)} {word}{'s' if len(items) != 1 else ''}"


def register_all(
    path: str | Path,
    client: Any,
    *,
    echo: Echo = print,
    build: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Target], list[dict[str, Any]], list[str]]:
    """Discover, build and register (what ``deploy`` and the dev server share): the targets,
    the control plane's answers (a line printed per endpoint with its action), and the
    problems that kept endpoints out (printed first)."""
    found = discover(path, overrides)
    report_problems(found, echo)
    if not found.endpoints:
        if found.problems:
            raise errors.ConfigError(f"{path}: nothing to deploy "
                                     f"({_count(found.problems, 'problem')} above)")  # fmt: skip
        raise errors.ConfigError(f"{path}: no @Endpoint functions or classes, no %%flash "
                                 f"cells and no runpod.serverless.start(...) call "
                                 f"found")  # fmt: skip
    plan = targets(found.endpoints)
    if build:
        build_environments([f for t in plan for f in t.found], echo, client)
    answers = []
    width = max(len(t.name) for t in plan)
    for t in plan:
        answer = register(client, t)
        echo(f"{t.name:<{width}}  {answer['action']:<7}  {t.kind:<8}  {t.where}")
        answers.append(answer)
    return plan, answers, list(found.problems)


def report_problems(found: Any, echo: Echo) -> None:
    for n in found.notes:
        echo(f"note: {n}")
    for p in found.problems:
        echo(f"not deployed: {p}")


def build_environments(found: list[Any], echo: Echo, client: Any) -> list[Any]:
    """Install the environments now (``build.build``), where the control plane's workers
    look for them (its data directory), so a cold start installs nothing. A failed build
    stops the deploy with the installer's own message."""
    if not any(f.config.dependencies or f.config.system_dependencies for f in found):
        return []
    data_dir = _control_plane_dir(client)
    if data_dir is None:
        echo("note: environments not pre-built: the control plane uses another data directory "
             "(set FLASH_JUPYTER_HOME to it) or machine; its workers install them at their "
             "first cold start")  # fmt: skip
        return []
    from .build import build

    built = build(found, echo=echo, data_dir=data_dir)
    failed = [b for b in built if b.outcome == "failed"]
    if failed:
        raise errors.ConfigError(f"the environment of {', '.join(b.endpoint for b in failed)} "
                                 f"did not build (above); nothing was deployed")  # fmt: skip
    return built


def _control_plane_dir(client: Any) -> Path | None:
    """This process's data directory when it is the control plane's (their spool folders,
    named after the data directory, match), else None."""
    from .. import paths

    try:
        spool = client.http.get("/v1/info").json().get("spool")
    except Exception:  # no answer: not worth failing the deploy over
        return None
    home = paths.home()
    ours = {str(paths.default_spool_dir(home)), paths.read_settings(home).get("spool")}
    return home if spool and spool in ours else None


def bring_up(client: Any, plan: list[Target], echo: Echo, wait: bool) -> None:
    """Start each endpoint's ``min`` workers; with ``wait``, until they are ready (at most
    ``READY_TIMEOUT`` seconds: a throttled start is reported, not waited for)."""
    wanted = {t.name: t.config.workers_min for t in plan if t.config.workers_min > 0}
    for name, n in wanted.items():
        client.warm(name, workers=n)
    if not wanted or not wait:
        return
    t0 = time.monotonic()
    pending = dict(wanted)
    while pending and time.monotonic() - t0 < READY_TIMEOUT:
        for name, n in list(pending.items()):
            ready = client.health(name)["workers"]["ready"]
            if ready >= n:
                echo(f"{name}: {n} worker{'s' if n > 1 else ''} ready "
                     f"({time.monotonic() - t0:.1f} s)")  # fmt: skip
                del pending[name]
        if pending:
            time.sleep(0.1)
    for name, n in pending.items():
        echo(f"{name}: {n} worker(s) still starting after {READY_TIMEOUT:g} s; "
             f"`flash-jupyter status {name}` says why")  # fmt: skip


def job_urls(url: str, name: str) -> dict[str, str]:
    base = f"{url.rstrip('/')}/v2/{name}"
    return {
        "runsync": f"POST {base}/runsync",
        "run": f"POST {base}/run",
        "status": f"GET  {base}/status/<job id>",
        "stream": f"GET  {base}/stream/<job id>",
        "health": f"GET  {base}/health",
    }


def curl_line(url: str, name: str, example: dict[str, Any]) -> str:
    body = json.dumps({"input": example})
    return (
        f"curl -s -X POST {url.rstrip('/')}/v2/{name}/runsync "
        f'-H "Authorization: Bearer $FLASH_JUPYTER_TOKEN" '
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


# ---------------------------------------------------------------- example inputs
_EXAMPLES: dict[str, Any] = {
    "int": 1,
    "float": 1.0,
    "str": "text",
    "bool": True,
    "list": [],
    "dict": {},
    "None": None,
}


def example_value(annotation: str | None) -> Any:
    """An example value for a parameter annotated ``annotation`` (its source text)."""
    if not annotation:
        return 1
    text = annotation.strip().strip("'\"")
    for wrapper in ("Optional[", "typing.Optional["):
        if text.startswith(wrapper) and text.endswith("]"):
            text = text[len(wrapper) : -1]
    text = text.split("|")[0].strip()
    base = text.split("[")[0].strip().rsplit(".", 1)[-1]
    base = {"List": "list", "Dict": "dict", "Sequence": "list", "Mapping": "dict"}.get(base, base)
    return _EXAMPLES.get(base, 1)


def is_missing(default: Any) -> bool:
    """No literal default (discovery's ``MISSING``)."""
    from .discover import MISSING

    return default is MISSING


def params_example(params: list[Any] | None) -> dict[str, Any]:
    """Keyword arguments for a call: every plain parameter, its default when it has one."""
    out: dict[str, Any] = {}
    for p in params or []:
        name = getattr(p, "name", "")
        if not name or name.startswith("*") or name in ("self", "cls"):
            continue
        kind = str(getattr(p, "kind", "") or "").lower()
        if "var" in kind or "positional_only" in kind:
            continue
        if not is_missing(p.default):
            out[name] = p.default
        elif p.default_source is None:  # required
            out[name] = example_value(p.annotation)
    return out


def example_input(t: Target) -> dict[str, Any]:
    f = t.found[0]
    if t.kind in ("function", "runpod"):  # runpod: the keys its handler reads from input
        return params_example(getattr(f, "params", None))
    if t.kind == "class":
        methods = f.methods or {}
        method = next(iter(methods), "__call__")
        example: dict[str, Any] = {"method": method, "args": params_example(methods.get(method))}
        init = params_example(f.init)
        if init:
            example["init"] = init
        return example
    return {n: 1 for n in cell_inputs([x.source or "" for x in t.found])}


def cell_inputs(sources: list[str]) -> list[str]:
    """The names a notebook's cells read before binding them: the variables a request gives."""
    import builtins

    from ..jupyter.cellcode import analyse

    free: list[str] = []
    bound: set[str] = set()
    for src in sources:
        try:
            names = analyse(src)
        except SyntaxError:
            continue
        local = names.bound_anywhere - set(names.bound)  # parameters, comprehension names
        for n in sorted(names.loaded, key=lambda n: names.first_use.get(n, 0)):
            if n in bound or n in names.bound_first or n in free or n in local:
                continue
            if not hasattr(builtins, n):
                free.append(n)
        bound.update(names.bound)
    return free


# ---------------------------------------------------------------- undeploy
def undeploy(
    targets_: list[str] = (), *, all: bool = False, echo: Echo = print, client: Any = None
) -> list[str]:
    """Delete endpoints: each NAME, every endpoint found in each PATH, or ``all`` of them.
    Returns the names deleted; a NAME that does not exist is an error after the others go."""
    if client is None:
        from ..client import get_client

        client = get_client()
    names: list[str] = []
    explicit: set[str] = set()
    if all:
        names = [e["name"] for e in client.endpoints()]
    for t in targets_:
        p = Path(t)
        if p.exists() and (p.is_dir() or p.suffix in (".py", ".ipynb")):
            names += [x.name for x in targets(discover(p).endpoints)]
        else:
            names.append(t)
            explicit.add(t)
    deleted: list[str] = []
    missing: list[str] = []
    for n in dict.fromkeys(names):
        try:
            client.delete(n)
        except errors.ControlPlaneError as e:
            if " 404 " in str(e):
                if n in explicit:
                    missing.append(n)
                else:
                    echo(f"{n}: not deployed")
                continue
            raise
        deleted.append(n)
        echo(f"{n}: deleted")
    if not names:
        echo("nothing to undeploy")
    if missing:
        raise errors.ConfigError(f"no endpoint named {', '.join(map(repr, missing))} "
                                 f"(`flash-jupyter status` lists them)")  # fmt: skip
    return deleted

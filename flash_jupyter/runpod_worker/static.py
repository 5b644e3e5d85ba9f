"""Recognise a Runpod serverless worker file from its syntax tree, without running it.

A Runpod worker file calls ``runpod.serverless.start(config)`` (under any of the usual import
spellings: ``import runpod``, ``import runpod as rp``, ``from runpod import serverless``,
``from runpod.serverless import start``), usually at the end of the file or under
``if __name__ == "__main__":``. ``config`` is a dict written in the call or bound to a name
first. What deploy needs to know before any worker runs is read from it here:

- the handler, when it is a function defined at the top of the file (async, a generator);
- ``return_aggregate_stream`` as written;
- ``concurrency_modifier``: the endpoint's ``max_concurrency`` must be known when it is
  registered (the control plane hands a worker that many jobs at once), so the modifier must
  return a number this can read: ``lambda c: 4``, or a ``def`` whose ``return`` statements
  all give whole numbers (or names bound to them at the top of the file: the largest counts).
  Anything else (Runpod's own example adjusts the number to the request rate) gives
  ``modifier`` without ``concurrency``: the caller asks for ``--set NAME.max_concurrency=N``;
- the keys the handler reads from ``job["input"]``, for an example request;
- ``requirements``: the ``requirements.txt`` beside the file, as a list of requirements.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..app.discover import dotted_name

START = "runpod.serverless.start"
REQUIREMENTS = "requirements.txt"


@dataclass(frozen=True)
class InputKey:
    """A key the handler reads from ``job["input"]``: ``inp["k"]`` (required) or
    ``inp.get("k", default)`` (``has_default``; ``default`` when it is a literal)."""

    name: str
    has_default: bool = False
    default: Any = None


@dataclass(frozen=True)
class RunpodFile:
    line: int  # of the start() call
    handler: str | None  # the handler's name, when it is a function defined at the top
    is_async: bool = False
    is_generator: bool = False
    aggregate: bool | None = False  # return_aggregate_stream; None: not a literal
    modifier: str | None = None  # concurrency_modifier's source text, when given
    concurrency: int | None = None  # the most jobs at once it allows, when readable
    inputs: list[InputKey] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read(tree: ast.Module, text: str) -> RunpodFile | None:
    """The file's ``runpod.serverless.start`` call and what its config says, or None when it
    has none."""
    aliases = _aliases(tree)
    if not aliases:
        return None
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call) and _resolve(n.func, aliases) == START
    ]  # fmt: skip
    if not calls:
        return None
    call = min(calls, key=lambda n: (n.lineno, n.col_offset))
    defs, consts = _top_defs(tree)
    notes: list[str] = []
    arg = (
        call.args[0]
        if call.args
        else next((k.value for k in call.keywords if k.arg == "config"), None)
    )
    items = _config_items(arg, tree)
    if items is None:
        src = ast.get_source_segment(text, arg) if arg is not None else ""
        notes.append(
            f"runpod.serverless.start({src or ''}): the config is not a dict written in the "
            "file, so its handler and concurrency_modifier are only known when a worker runs "
            "it (max_concurrency stays 1 unless --set gives it)"
        )
        items = {}
    handler, is_async, is_gen, inputs = None, False, False, []
    h = items.get("handler")
    if isinstance(h, ast.Name) and isinstance(
        defs.get(h.id), (ast.FunctionDef, ast.AsyncFunctionDef)
    ):
        fn = defs[h.id]
        handler, is_async = fn.name, isinstance(fn, ast.AsyncFunctionDef)
        is_gen = any(isinstance(n, (ast.Yield, ast.YieldFrom)) for n in _own_nodes(fn))
        inputs = _input_keys(fn)
    aggregate: bool | None = False
    if "return_aggregate_stream" in items:
        try:
            aggregate = bool(ast.literal_eval(items["return_aggregate_stream"]))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            aggregate = None
    modifier = concurrency = None
    m = items.get("concurrency_modifier")
    if m is not None and not (isinstance(m, ast.Constant) and m.value is None):
        modifier = ast.get_source_segment(text, m) or ast.unparse(m)
        concurrency = _ceiling(m, defs, consts)
    return RunpodFile(
        line=call.lineno, handler=handler, is_async=is_async, is_generator=is_gen,
        aggregate=aggregate, modifier=modifier, concurrency=concurrency, inputs=inputs,
        notes=notes,
    )  # fmt: skip


# ------------------------------------------------------------------ names
def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to runpod modules or attributes: ``{"rp": "runpod", "start":
    "runpod.serverless.start"}``."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "runpod" or a.name.startswith("runpod."):
                    if a.asname:
                        out[a.asname] = a.name
                    else:  # `import runpod.serverless` binds runpod
                        out["runpod"] = "runpod"
        elif (
            isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
            and (node.module == "runpod" or node.module.startswith("runpod."))
        ):  # fmt: skip
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _resolve(node: ast.AST, aliases: dict[str, str]) -> str | None:
    dotted = dotted_name(node)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    base = aliases.get(head)
    if base is None:
        return None
    return f"{base}.{rest}" if rest else base


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements that run when the file runs: the module's, and those in its if/try/with
    blocks (``if __name__ == "__main__":`` included), not those inside functions."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.With, ast.For, ast.While)):
            yield from _top_level(node.body)
            yield from _top_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody):
                yield from _top_level(part)
            for hnd in node.handlers:
                yield from _top_level(hnd.body)


def _top_defs(tree: ast.Module) -> tuple[dict[str, ast.AST], dict[str, Any]]:
    """Top-level functions (and names bound to lambdas), and names bound to literals."""
    defs: dict[str, ast.AST] = {}
    consts: dict[str, Any] = {}
    for node in _top_level(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defs[node.name] = node
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            t = node.targets[0]
            if not isinstance(t, ast.Name):
                continue
            if isinstance(node.value, ast.Lambda):
                defs[t.id] = node.value
                continue
            try:
                consts[t.id] = ast.literal_eval(node.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                consts.pop(t.id, None)
    return defs, consts


def _config_items(arg: ast.AST | None, tree: ast.Module) -> dict[str, ast.expr] | None:
    """The config's keys and value nodes: a dict in the call, or a name bound to one (with
    later ``config["key"] = value`` lines); None when it is something else."""
    if isinstance(arg, ast.Dict):
        return _dict_items(arg)
    if not isinstance(arg, ast.Name):
        return None
    items: dict[str, ast.expr] | None = None
    for node in sorted(
        (n for n in ast.walk(tree) if isinstance(n, ast.Assign)), key=lambda n: n.lineno
    ):
        for t in node.targets:
            if isinstance(t, ast.Name) and t.id == arg.id:
                items = _dict_items(node.value) if isinstance(node.value, ast.Dict) else None
            elif (
                isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                and t.value.id == arg.id and items is not None
                and isinstance(t.slice, ast.Constant) and isinstance(t.slice.value, str)
            ):  # fmt: skip
                items[t.slice.value] = node.value
    return items


def _dict_items(d: ast.Dict) -> dict[str, ast.expr]:
    return {
        k.value: v for k, v in zip(d.keys, d.values, strict=True)
        if isinstance(k, ast.Constant) and isinstance(k.value, str)
    }  # fmt: skip


def _own_nodes(fn: ast.AST) -> Iterator[ast.AST]:
    """The nodes of a function's body, not those of functions or classes inside it."""
    stack = list(ast.iter_child_nodes(fn))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


# ------------------------------------------------------------------ concurrency_modifier
def _ceiling(node: ast.expr, defs: dict[str, ast.AST], consts: dict[str, Any]) -> int | None:
    """The most jobs at once a modifier can return, when every value it returns is a whole
    number written in the file; None otherwise."""
    target: ast.AST | None = node
    if isinstance(node, ast.Name):
        target = defs.get(node.id)
    if isinstance(target, ast.Lambda):
        values = [target.body]
    elif isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef)):
        values = [n.value for n in _own_nodes(target) if isinstance(n, ast.Return)]
    else:
        return None
    numbers = [_whole(v, consts) for v in values]
    if not numbers or any(n is None for n in numbers):
        return None
    return max(numbers)  # type: ignore[type-var]


def _whole(node: ast.expr | None, consts: dict[str, Any]) -> int | None:
    value: Any = None
    if isinstance(node, ast.Constant):
        value = node.value
    elif isinstance(node, ast.Name):
        value = consts.get(node.id)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


# ------------------------------------------------------------------ example input
def _input_keys(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[InputKey]:
    """The keys the handler reads from its job's input, in the order it reads them."""
    args = [*fn.args.posonlyargs, *fn.args.args]
    if not args:
        return []
    job = args[0].arg
    nodes = sorted(
        (n for n in _own_nodes(fn) if hasattr(n, "lineno")),
        key=lambda n: (n.lineno, n.col_offset),
    )
    holders: set[str] = set()  # names bound to job["input"]

    def is_input(node: ast.AST) -> bool:
        if isinstance(node, ast.Name):
            return node.id in holders
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            return node.value.id == job and _const(node.slice) == "input"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            return (
                f.attr == "get" and isinstance(f.value, ast.Name) and f.value.id == job
                and bool(node.args) and _const(node.args[0]) == "input"
            )  # fmt: skip
        return False

    found: dict[str, InputKey] = {}
    for node in nodes:
        if isinstance(node, ast.Assign) and is_input(node.value):
            holders.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.Subscript) and is_input(node.value):
            key = _const(node.slice)
            if isinstance(key, str) and isinstance(node.ctx, ast.Load):
                found.setdefault(key, InputKey(key))
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get" and is_input(node.func.value) and node.args
        ):  # fmt: skip
            key = _const(node.args[0])
            if isinstance(key, str) and key not in found:
                default: Any = None
                if len(node.args) > 1:
                    try:
                        default = ast.literal_eval(node.args[1])
                    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                        default = None
                found[key] = InputKey(key, True, default)
    return list(found.values())


def _const(node: ast.AST) -> Any:
    return node.value if isinstance(node, ast.Constant) else None


# ------------------------------------------------------------------ requirements.txt
def requirements(folder: Path) -> tuple[Path, list[str], list[str]] | None:
    """``requirements.txt`` in ``folder``: its path, its requirements (``-r`` files
    followed), and notes on the lines left out (pip options: pip's own settings apply).
    None when there is none."""
    path = folder / REQUIREMENTS
    if not path.is_file():
        return None
    reqs: list[str] = []
    notes: list[str] = []
    _read_requirements(path, reqs, notes, set())
    return path, list(dict.fromkeys(reqs)), notes


def _read_requirements(path: Path, reqs: list[str], notes: list[str], seen: set[Path]) -> None:
    real = path.resolve()
    if real in seen:
        return
    seen.add(real)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{path.name}: cannot be read ({e}); its requirements are left out")
        return
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        line = line.split(" #", 1)[0].split("\t#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-"):
            opt, _, rest = line.partition(" ")
            if opt in ("-r", "--requirement") or opt.startswith(("-r", "--requirement=")):
                name = rest.strip() or opt.removeprefix("--requirement=").removeprefix("-r")
                _read_requirements(path.parent / name, reqs, notes, seen)
            else:
                notes.append(
                    f"{path.name}: {line!r} left out (pip options are not requirements: set "
                    "them in pip's config or PIP_* variables)"
                )
            continue
        if " --" in line:  # per-requirement options (--hash=...)
            line = line.split(" --", 1)[0].strip()
        reqs.append(" ".join(line.split()))

"""Find the endpoints of a .py file, a package folder or a notebook, without running them.

The code is read (``ast``), never imported or executed: a notebook's top-level code may train
a model, and a script's may start a server. What is recognised:

- ``@Endpoint(...)`` on a function, an async function or a class, with ``Endpoint`` imported
  from flash_jupyter under any name (``from flash_jupyter import Endpoint as E``), or reached
  through the module (``@flash_jupyter.Endpoint``, ``import flash_jupyter as fj`` then
  ``@fj.Endpoint``); ``ep = Endpoint(...)`` then ``@ep``; ``x = Endpoint(...)(fn)``;
- in a notebook, ``%%flash`` cells (their first line read as the magic reads it:
  ``magic_line``), after the ``%flash config`` defaults of earlier cells, and ``@Endpoint``
  code in ordinary cells (the notebook is one namespace, its cells read in order);
- a Runpod serverless worker file (it calls ``runpod.serverless.start(...)`` and does not use
  flash_jupyter's ``Endpoint``): one endpoint named after the file (``runpod_worker.static``).

Settings must be literals (``ast.literal_eval``: numbers, strings, tuples, lists, dicts of
them). One that is not (``gpu=GPU_TYPE``) is a problem naming its place and the other way to
give it: ``--set NAME.setting=VALUE`` on the command line (``overrides`` here). Endpoint
names follow the decorator's and the magic's rules (the function's or class's name;
``config.default_endpoint_name`` for a cell without ``name=``).
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BY_NAME, EndpointConfig, settings_from_tokens
from ..errors import ConfigError
from ..magic_line import LineError, endpoint_for, split

_FJ = "flash_jupyter"
_ENDPOINT_MODULES = (_FJ, f"{_FJ}.endpoint")
# The decorator's keywords: every setting but the name (given positionally or as name=).
_KEYWORDS = tuple(s.name for s in BY_NAME.values())
_SKIP_DIRS = {"__pycache__", "node_modules", "site-packages", "build", "dist"}


class _Missing:
    """No default: the parameter is required."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class Param:
    """One parameter of an endpoint's function or method, as written."""

    name: str
    annotation: str | None = None  # its source text ("int", "list[float]")
    default: Any = MISSING  # the literal default; MISSING when none (or not a literal)
    kind: str = "positional_or_keyword"  # inspect's kind names, lower case
    default_source: str | None = None  # the default's source text, literal or not

    @property
    def required(self) -> bool:
        return self.default_source is None and self.kind in (
            "positional_only", "positional_or_keyword", "keyword_only"
        )  # fmt: skip


@dataclass(frozen=True)
class Found:
    """One endpoint found in a file (see the module's docstring)."""

    name: str  # the endpoint's name, as the decorator or the magic would choose it
    kind: str  # "function", "class" or "cell"
    settings: dict[str, Any]  # the literal settings as given, --set overrides applied
    config: EndpointConfig  # built from them by the decorator's (or the magic's) rules
    file: Path  # absolute
    qualname: str | None  # the function or class (None for a cell)
    module_name: str | None  # dotted, when found in a package folder (import it from root)
    cell_index: int | None  # a notebook's cell, counting from 0 (messages count from 1)
    source: str | None  # a cell's code without its %%flash line
    line: int  # of the decorator (or the %%flash line): 1-based, in the file or the cell
    params: list[Param] = field(default_factory=list)  # a function's
    methods: dict[str, list[Param]] = field(default_factory=dict)  # a class's public ones
    init: list[Param] = field(default_factory=list)  # a class's constructor (no self)
    is_async: bool = False  # an async def
    root: Path | None = None  # the folder module_name imports from (a package's parent)
    magic_line: str | None = None  # a cell's %%flash line, as written

    @property
    def where(self) -> str:
        """Its place as messages name it: ``app.py:12`` or ``nb.ipynb cell 4 line 1``."""
        return _place(self.file, self.cell_index, self.line)


@dataclass
class Discovery:
    endpoints: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # each blocks its endpoint
    notes: list[str] = field(default_factory=list)  # worth saying, blocks nothing


class OverrideError(ConfigError):
    """A ``--set`` value is not ``NAME.setting=value``; the message says why."""


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``["train.gpu=A100", "train.workers=1,3"]`` as ``{"train": {"gpu": "A100", "workers":
    (1, 3)}}``: values read as ``%%flash`` reads them (``config.settings_from_tokens``)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, rest = item.partition("=")
        name, dot, key = target.rpartition(".")
        if not sep or not dot or not name or not key:
            raise OverrideError(
                f"--set {item!r}: write NAME.setting=VALUE, e.g. --set train.gpu=A100"
            )
        try:
            settings = settings_from_tokens([f"{key}={rest}"])
        except ConfigError as e:
            raise OverrideError(f"--set {item!r}: {e}") from None
        slot = out.setdefault(name, {})
        for k, v in settings.items():
            if k == "env" and isinstance(slot.get("env"), dict):
                slot["env"] = {**slot["env"], **v}
            else:
                slot[k] = v
    return out


def discover(
    path: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> Discovery:
    """The endpoints of ``path`` (a .py file, a folder of them, or an .ipynb), with what
    stops any of them from being configured. ``overrides``: settings by endpoint name (the
    ``--set`` option; ``parse_overrides``), over what the file says."""
    p = Path(path).expanduser()
    d = Discovery()
    if not p.exists():
        d.problems.append(f"{path}: no such file or folder")
        return d
    p = p.resolve()
    reader = _Reader(d, dict(overrides or {}))
    if p.is_dir():
        files = _python_files(p)
        if not files:
            d.notes.append(f"{_show(p)}: no .py files in this folder")
        root = p.parent if (p / "__init__.py").exists() else p
        for f in files:
            reader.python_file(f, _module_name(f, root), root)
    elif p.suffix == ".ipynb":
        reader.notebook(p)
    elif p.suffix == ".py" or p.is_file():
        reader.python_file(p, None, None)
    reader.finish()
    return d


# ------------------------------------------------------------------ files


def _python_files(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            n for n in dirnames
            if not n.startswith(".") and n not in _SKIP_DIRS
            and not os.path.exists(os.path.join(dirpath, n, "pyvenv.cfg"))
        )  # fmt: skip
        out += [Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def _module_name(f: Path, root: Path) -> str:
    parts = list(f.relative_to(root).with_suffix("").parts)
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _show(p: Path) -> str:
    """A path as messages show it: relative to the working directory when inside it."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _place(file: Path, cell: int | None, line: int) -> str:
    if cell is None:
        return f"{_show(file)}:{line}"
    return f"{_show(file)} cell {cell + 1} line {line}"


def _cell_text(cell: Mapping[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


# IPython syntax a cell may hold, blanked (to `pass`, same indentation) so the rest parses.
_IPY_LINE = re.compile(r"^(\s*)(%|!|\w[\w.,\s]*=\s*[%!]|\?|[\w.]+\?\??\s*$)")
_FLASH_CONFIG = re.compile(r"^\s*%flash\s+config\b(.*)$")


def _python_of_cell(text: str) -> str | None:
    """A code cell as Python (line numbers kept), or None for a cell magic whose body is
    not Python (``%%bash``, ``%%html``...)."""
    lines = text.split("\n")
    if lines and lines[0].lstrip().startswith("%%"):
        magic = lines[0].lstrip()[2:].split(None, 1)[0] if lines[0].strip() != "%%" else ""
        if magic not in ("time", "timeit", "capture", "prun", "flash"):
            return None
        lines[0] = ""
    out = []
    for ln in lines:
        m = _IPY_LINE.match(ln)
        out.append(f"{m.group(1)}pass" if m and ln.strip() else ln)
    return "\n".join(out)


# ------------------------------------------------------------------ reading


class _Scope:
    """What names mean in one module (or a whole notebook): ``Endpoint`` under which names,
    flash_jupyter under which, and ``ep = Endpoint(...)`` instances."""

    def __init__(self) -> None:
        self.endpoint_names: set[str] = set()
        self.module_names: set[str] = set()  # dotted: "flash_jupyter", "fj"
        self.instances: dict[str, ast.Call] = {}
        self.defs: dict[str, ast.AST] = {}

    def imports(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in _ENDPOINT_MODULES or a.name.startswith(_FJ + "."):
                        # `import flash_jupyter.endpoint` binds flash_jupyter (the dotted
                        # path works); `import flash_jupyter.endpoint as e` binds e.
                        self.module_names.add(a.asname or a.name)
                        if a.asname is None:
                            self.module_names.add(_FJ)
            elif isinstance(node, ast.ImportFrom) and node.module in _ENDPOINT_MODULES:
                for a in node.names:
                    if a.name == "Endpoint":
                        self.endpoint_names.add(a.asname or a.name)
                    elif a.name == "*":
                        self.endpoint_names.add("Endpoint")

    def is_endpoint(self, node: ast.AST) -> bool:
        """``Endpoint``, ``fj.Endpoint``, ``flash_jupyter.endpoint.Endpoint`` (the class)."""
        if isinstance(node, ast.Name):
            return node.id in self.endpoint_names
        if isinstance(node, ast.Attribute) and node.attr == "Endpoint":
            dotted = dotted_name(node.value)
            return dotted is not None and (
                dotted in self.module_names
                or (dotted in _ENDPOINT_MODULES and _FJ in self.module_names)
            )
        return False

    def endpoint_call(self, node: ast.AST) -> ast.Call | None:
        """The ``Endpoint(...)`` call a decorator (or a callee) stands for, if it is one."""
        if isinstance(node, ast.Call) and self.is_endpoint(node.func):
            return node
        if isinstance(node, ast.Name) and node.id in self.instances:
            return self.instances[node.id]
        return None


def dotted_name(node: ast.AST) -> str | None:
    """``a.b.c`` for a name or an attribute chain of names; None for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _top_level(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    """Statements run at import: the module's, and those inside its if/try/with blocks."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.With, ast.AsyncWith, ast.For, ast.While)):
            yield from _top_level(node.body)
            yield from _top_level(getattr(node, "orelse", []))
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            for part in (node.body, node.orelse, node.finalbody):  # type: ignore[attr-defined]
                yield from _top_level(part)
            for h in node.handlers:  # type: ignore[attr-defined]
                yield from _top_level(h.body)


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef, text: str, drop_first: bool) -> list[Param]:
    a = fn.args
    out: list[Param] = []
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults))
    defaults += list(a.defaults)
    kinds = ["positional_only"] * len(a.posonlyargs) + ["positional_or_keyword"] * len(a.args)
    rows = list(zip(positional, defaults, kinds, strict=True))
    if a.vararg:
        rows.append((a.vararg, None, "var_positional"))
    rows += [(arg, d, "keyword_only") for arg, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
    if a.kwarg:
        rows.append((a.kwarg, None, "var_keyword"))
    if drop_first and rows and rows[0][2] in ("positional_only", "positional_or_keyword"):
        rows = rows[1:]
    for arg, default, kind in rows:
        ann = None
        if arg.annotation is not None:
            ann = ast.get_source_segment(text, arg.annotation) or ast.unparse(arg.annotation)
        value, src = MISSING, None
        if default is not None:
            src = ast.get_source_segment(text, default) or ast.unparse(default)
            try:
                value = ast.literal_eval(default)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = MISSING
        out.append(Param(arg.arg, ann, value, kind, src))
    return out


def _methods(cls: ast.ClassDef, text: str) -> tuple[dict[str, list[Param]], list[Param]]:
    methods: dict[str, list[Param]] = {}
    init: list[Param] = []
    for node in cls.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        decos = {dotted_name(d) for d in node.decorator_list}
        static = "staticmethod" in decos
        params = _params(node, text, drop_first=not static)
        if node.name == "__init__":
            init = params
        elif not node.name.startswith("_"):
            methods[node.name] = params
    return methods, init


class _Reader:
    def __init__(self, d: Discovery, overrides: dict[str, dict[str, Any]]):
        self.d = d
        self.overrides = overrides
        self.used_overrides: set[str] = set()

    # -- sources
    def python_file(self, f: Path, module: str | None, root: Path | None) -> None:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            self.d.problems.append(f"{_show(f)}: cannot be read ({e})")
            return
        try:
            tree = ast.parse(text, filename=str(f))
        except SyntaxError as e:
            self.d.problems.append(
                f"{_show(f)}:{e.lineno}: not valid Python ({e.msg}); fix it to find its endpoints"
            )
            return
        scope = _Scope()
        scope.imports(tree)
        self.module(tree, text, scope, f, None, module, root)
        if not scope.endpoint_names and not scope.module_names:  # no @Endpoint: Runpod's?
            self.runpod_file(tree, text, f, module, root)

    def notebook(self, f: Path) -> None:
        try:
            nb = json.loads(f.read_text(encoding="utf-8"))
            cells = nb["cells"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.d.problems.append(f"{_show(f)}: not a notebook this can read ({e})")
            return
        scope = _Scope()  # one namespace for the whole notebook
        defaults: dict[str, Any] = {}  # %flash config, as the magic keeps them
        cell_configs: dict[str, EndpointConfig] = {}  # per endpoint, as cells change it
        parsed: list[tuple[int, str, ast.Module]] = []
        for i, cell in enumerate(cells):
            if not isinstance(cell, dict) or cell.get("cell_type") != "code":
                continue
            text = _cell_text(cell)
            if text.lstrip().startswith("%%flash"):
                self.flash_cell(f, i, text, defaults, cell_configs)
                continue
            for n, ln in enumerate(text.split("\n"), 1):
                m = _FLASH_CONFIG.match(ln)
                if m:
                    self.flash_config(f, i, n, m.group(1), defaults)
            code = _python_of_cell(text)
            if code is None:
                continue
            try:
                tree = ast.parse(code)
            except SyntaxError as e:
                if "Endpoint" in text:
                    self.d.problems.append(
                        f"{_place(f, i, e.lineno or 1)}: not valid Python ({e.msg}); fix it "
                        "to find the endpoints in this cell"
                    )
                continue
            scope.imports(tree)
            parsed.append((i, code, tree))
        for i, code, tree in parsed:
            self.module(tree, code, scope, f, i, None, None)

    # -- %%flash cells
    def flash_config(
        self, f: Path, cell: int, line: int, text: str, defaults: dict[str, Any]
    ) -> None:
        tokens = [t for t in text.split() if t.split("=", 1)[0].strip().lower() != "receipts"]
        if any(_expanded(t) for t in tokens):
            self.d.problems.append(
                f"{_place(f, cell, line)}: %flash config {text.strip()} uses a variable "
                "($name or {expression}), which only the kernel can expand: write the values"
            )
            return
        try:
            defaults.update(settings_from_tokens(tokens))
        except ConfigError as e:
            self.d.problems.append(f"{_place(f, cell, line)}: %flash config: {e}")

    def flash_cell(
        self,
        f: Path,
        i: int,
        text: str,
        defaults: dict[str, Any],
        cell_configs: dict[str, EndpointConfig],
    ) -> None:
        first, _, body = text.lstrip().partition("\n")
        lead = text[: len(text) - len(text.lstrip())].count("\n")
        line = lead + 1
        where = _place(f, i, line)
        try:
            tokens = split(first[len("%%flash") :])
        except LineError as e:
            self.d.problems.append(f"{where}: {e}")
            return
        # key=value tokens the kernel would expand ($name, {expression}): not literals.
        expanded = [t for t in tokens if "=" in t and not t.startswith("-") and _expanded(t)]
        if any(_setting_of(t) == "name" for t in expanded):
            self.d.problems.append(
                f"{where}: the endpoint's name is not a literal (the kernel expands $name and "
                "{expression} in a magic line): write name=... in the %%flash line"
            )
            return
        literal = " ".join(["%%flash", *(t for t in tokens if t not in expanded)])
        try:
            name, changes = endpoint_for(literal)
        except LineError as e:
            self.d.problems.append(f"{where}: {e}")
            return
        missing = [t for t in expanded if _setting_of(t) not in self.overrides.get(name, {})]
        for t in missing:
            key = _setting_of(t)
            self.d.problems.append(
                f"{where}: {t} is not a literal (the kernel expands $name and {{expression}} "
                f"in a magic line): write the value in the %%flash line, or set it with "
                f"--set {name}.{key}={_example(key)}"
            )
        if missing:
            return
        given = {**defaults, **changes}
        given.pop("limit", None)
        extra = self._override(name)
        settings = {**given, **extra}
        try:
            prev = cell_configs.get(name)
            if prev is not None:  # settings are changes of the endpoint the notebook has
                config = prev.changed(**settings)
            else:
                config = EndpointConfig.build(name, **settings)
        except ConfigError as e:
            self.d.problems.append(f"{where}: endpoint {name!r}: {e}")
            return
        cell_configs[name] = config
        self.d.endpoints.append(Found(
            name=name, kind="cell", settings=settings, config=config, file=f, qualname=None,
            module_name=None, cell_index=i, source=body, line=line, magic_line=first,
        ))  # fmt: skip

    # -- decorators
    def module(
        self,
        tree: ast.Module,
        text: str,
        scope: _Scope,
        f: Path,
        cell: int | None,
        module: str | None,
        root: Path | None,
    ) -> None:
        for node in _top_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                scope.defs[node.name] = node
        for node in _top_level(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for deco in node.decorator_list:
                    if scope.is_endpoint(deco):  # @Endpoint without (...)
                        self.d.problems.append(
                            f"{_place(f, cell, deco.lineno)}: @Endpoint needs parentheses: "
                            f"@Endpoint() or @Endpoint(gpu=...)"
                        )
                        continue
                    call = scope.endpoint_call(deco)
                    if call is not None:
                        self.endpoint(call, node, deco.lineno, text, f, cell, module, root)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                value = node.value
                if scope.is_endpoint(value.func):  # ep = Endpoint(...): used as @ep later
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            scope.instances[t.id] = value
                    continue
                call = scope.endpoint_call(value.func)
                if call is not None and len(value.args) == 1 and not value.keywords:
                    target = value.args[0]
                    tname = target.id if isinstance(target, ast.Name) else dotted_name(target)
                    tnode = scope.defs.get(tname or "")
                    if tnode is None:
                        self.d.problems.append(
                            f"{_place(f, cell, node.lineno)}: Endpoint(...)({ast.unparse(target)}) "
                            "wraps something not defined at the top of this file: decorate the "
                            "function or class where it is defined"
                        )
                        continue
                    self.endpoint(call, tnode, node.lineno, text, f, cell, module, root)

    def endpoint(
        self,
        call: ast.Call,
        target: ast.AST,
        line: int,
        text: str,
        f: Path,
        cell: int | None,
        module: str | None,
        root: Path | None,
    ) -> None:
        assert isinstance(target, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        where = _place(f, cell, line)
        settings: dict[str, Any] = {}
        bad: list[tuple[str, str]] = []  # (setting, its source) not literal
        name_node: ast.expr | None = None
        if len(call.args) > 1:
            self.d.problems.append(
                f"{where}: Endpoint takes the name as its only positional argument; give "
                "the settings as keywords (gpu=..., workers=...)"
            )
            return
        if call.args:
            name_node = call.args[0]
        for kw in call.keywords:
            if kw.arg is None:
                bad.append(("**", ast.get_source_segment(text, kw.value) or "..."))
                continue
            if kw.arg == "name":
                name_node = kw.value
                continue
            try:
                settings[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                src = ast.get_source_segment(text, kw.value) or ast.unparse(kw.value)
                bad.append((kw.arg, src))
        name = target.name
        if name_node is not None:
            try:
                given = ast.literal_eval(name_node)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                given = MISSING
                src = ast.get_source_segment(text, name_node) or ast.unparse(name_node)
                bad.append(("name", src))
            if given is not MISSING and given is not None:
                name = given
        extra = self._override(str(name))
        given_by_set = set(extra)
        if "name" in extra:
            name = extra.pop("name")
        blocked = False
        for key, src in bad:
            if key == "**":
                self.d.problems.append(
                    f"{where}: **{src} cannot be read without running the file: write the "
                    f"settings in the decorator, or give them with --set {name}.SETTING=VALUE"
                )
                blocked = True
            elif key not in given_by_set:
                self.d.problems.append(
                    f"{where}: {key}={src} is not a literal: write the value in the decorator, "
                    f"or set it with --set {name}.{key}={_example(key)}"
                )
                blocked = True
        if blocked:
            return
        settings.update(extra)
        unknown = [k for k in settings if k not in _KEYWORDS]
        kind = "class" if isinstance(target, ast.ClassDef) else "function"
        try:
            if unknown:
                raise ConfigError(f"Endpoint() has no setting {', '.join(map(repr, unknown))}"
                                  f" (settings: {', '.join(_KEYWORDS[1:])})")  # fmt: skip
            config = EndpointConfig.build(name, **settings)
        except ConfigError as e:
            self.d.problems.append(f"{where}: endpoint {name!r}: {e}")
            return
        params: list[Param] = []
        methods: dict[str, list[Param]] = {}
        init: list[Param] = []
        if isinstance(target, ast.ClassDef):
            methods, init = _methods(target, text)
        else:
            params = _params(target, text, drop_first=False)
        self.d.endpoints.append(Found(
            name=name, kind=kind, settings=settings, config=config, file=f,
            qualname=target.name, module_name=module, cell_index=cell, source=None, line=line,
            params=params, methods=methods, init=init,
            is_async=isinstance(target, ast.AsyncFunctionDef), root=root,
        ))  # fmt: skip

    # -- Runpod worker files
    def runpod_file(
        self, tree: ast.Module, text: str, f: Path, module: str | None, root: Path | None
    ) -> None:
        """A file that calls ``runpod.serverless.start(...)``: one endpoint, named after
        the file, whose handler is the one the file gives Runpod (``runpod_worker``)."""
        from ..runpod_worker import static

        info = static.read(tree, text)
        if info is None:
            return
        where = _place(f, None, info.line)
        name = (module or "").rpartition(".")[2] or f.stem
        settings: dict[str, Any] = {}
        reqs = static.requirements(f.parent)
        if reqs is not None:
            path, deps, notes = reqs
            if deps:
                settings["dependencies"] = deps
            self.d.notes += [f"{_show(path.parent)}{os.sep}{n}" for n in notes]
        for n in info.notes:
            self.d.notes.append(f"{where}: {n}")
        extra = self._override(name)
        given_by_set = set(extra)
        if "name" in extra:
            name = extra.pop("name")
        if info.concurrency is not None:
            settings["max_concurrency"] = info.concurrency
        elif info.modifier is not None and "max_concurrency" not in given_by_set:
            self.d.problems.append(
                f"{where}: concurrency_modifier={info.modifier} does not return a number "
                f"written in the file (it is only known when the file runs): give the most "
                f"jobs one worker may run at once with --set {name}.max_concurrency=N; the "
                f"worker still asks {info.modifier} before each job, within that"
            )
            return
        settings.update(extra)
        deps = settings.get("dependencies") or ()
        if not any(_requirement_name(d) == "runpod" for d in deps) and not _importable("runpod"):
            self.d.notes.append(
                f"{where}: the runpod package is not installed here and the file's "
                f"requirements.txt does not list it: add runpod to it (or --set "
                f"{name}.deps=runpod), or the worker cannot run the file"
            )
        try:
            config = EndpointConfig.build(name, **settings)
        except ConfigError as e:
            hint = f" (name it with --set {f.stem}.name=NAME)" if "name" in str(e) else ""
            self.d.problems.append(f"{where}: endpoint {name!r}: {e}{hint}")
            return
        params = [
            Param(k.name, None, k.default if k.has_default else MISSING, "keyword_only",
                  repr(k.default) if k.has_default else None)
            for k in info.inputs
        ]  # fmt: skip
        self.d.endpoints.append(Found(
            name=name, kind="runpod", settings=settings, config=config, file=f,
            qualname=info.handler or "handler", module_name=module, cell_index=None,
            source=None, line=info.line, params=params, is_async=info.is_async, root=root,
        ))  # fmt: skip

    # -- overrides and checks
    def _override(self, name: str) -> dict[str, Any]:
        extra = self.overrides.get(name)
        if extra is None:
            return {}
        self.used_overrides.add(name)
        return dict(extra)

    def finish(self) -> None:
        d = self.d
        d.endpoints.sort(key=lambda e: (str(e.file), e.cell_index or 0, e.line))
        for name in self.overrides:
            if name not in self.used_overrides:
                known = sorted({e.name for e in d.endpoints}) or ["none found"]
                d.problems.append(
                    f"--set {name}.…: no endpoint named {name!r} here (endpoints: "
                    f"{', '.join(known)})"
                )
        # One name, one endpoint. Cells share one as they do in the notebook; two functions
        # (or a function and cells) on one endpoint work from Python, each call carrying its
        # function, but only one can answer HTTP, and different settings would fight.
        seen: dict[str, Found] = {}
        for e in d.endpoints:
            other = seen.setdefault(e.name, e)
            if other is e or (e.kind == "cell" and other.kind == "cell"):
                continue
            if e.config != other.config:
                d.problems.append(
                    f"{e.where}: endpoint {e.name!r} is also {other.where} ({_what(other)}) "
                    "with other settings: give one of them another name="
                )
            else:
                d.notes.append(
                    f"{e.where}: endpoint {e.name!r} is also {other.where} ({_what(other)}); "
                    "from Python both work, but HTTP can call only one: give one another name="
                )


def _requirement_name(req: str) -> str:
    """``runpod>=1.7; python_version>'3.9'`` -> ``runpod`` (normalised as pip compares)."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    return re.sub(r"[-_.]+", "-", m.group(1)).lower() if m else ""


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _what(e: Found) -> str:
    return "a %%flash cell" if e.kind == "cell" else f"{e.kind} {e.qualname}"


def _expanded(token: str) -> bool:
    """IPython expands ``$name`` and ``{expression}`` in a magic's line (``$$`` is a $)."""
    t = token.replace("$$", "")
    return bool(re.search(r"\$[A-Za-z_]|\{[^{}]*\}", t))


def _setting_of(token: str) -> str:
    """The setting a ``key=value`` token names (aliases as their setting: deps ->
    dependencies), or the key as typed when it names none."""
    key = token.split("=", 1)[0].strip().replace("-", "_")
    for s in BY_NAME.values():
        if key == s.name or key in s.aliases:
            return s.name
    return key


def _example(key: str) -> str:
    """A value for ``--set NAME.key=...`` in a message: from the setting's own example."""
    s = BY_NAME.get(key)
    if s is None:
        return "VALUE"
    example = (s.example or "").split(" or ")[0]
    return example.partition("=")[2] or "VALUE"

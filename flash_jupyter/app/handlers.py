"""The HTTP handlers of deployed endpoints: what answers ``/v2/NAME/run`` on a worker.

``flash-jupyter deploy`` never imports the user's file (its top-level code may load a model,
need a GPU, or have side effects), so a handler carries only *where* the code is: the file,
its dotted module name inside a package, the function's or class's qualified name, and for a
plain file its source text as deployed. The handler is pickled by reference to this module
(every worker has flash_jupyter) and, on the worker, imports the user's code once per process
and calls the undecorated function. The worker calls a handler with the request's ``input``
as keyword arguments; it awaits what a handler returns when it is awaitable and streams a
generator's items as chunks (``/v2/NAME/stream/ID``).

Only the standard library is imported here: the worker loads this module at its first job.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import json
import sys
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..worker.cells import exec_cell

# Per worker process: the user's modules by (file, module name, digest of the code), and a
# class endpoint's instances by (class, init arguments).
_modules: dict[tuple[str, str | None, str], types.ModuleType] = {}
_instances: dict[tuple[int, str], Any] = {}

CLASS_INPUT = '{"method": "NAME", "args": {...}, "init": {...}}'


def digest_of(texts: Iterable[str]) -> str:
    """A short fingerprint of the code a handler runs: a new one makes a new handler (and the
    workers load the code again), the same one reuses what a worker has loaded."""
    h = hashlib.blake2b(digest_size=8)
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


class _UserCode:
    """Where a function or class is: ``file`` (absolute), ``module_name`` (dotted, when the
    file is inside a package: imported by that name from the package's parent folder),
    ``qualname``; ``code``: a plain file's text as deployed (what runs is what was
    deployed, and a worker on another machine needs no copy of the file)."""

    kind = "code"

    def __init__(
        self,
        file: str | Path,
        module_name: str | None,
        qualname: str,
        code: str | None = None,
        digest: str | None = None,
    ):
        self.file = str(file)
        self.module_name = module_name
        self.qualname = qualname
        self.code = code
        self.digest = digest or (digest_of([code]) if code is not None else "")

    def __repr__(self) -> str:
        where = self.module_name or Path(self.file).name
        return f"<{type(self).__name__} {where}:{self.qualname}>"

    def target(self) -> Any:
        """The undecorated function or class, its module imported on first use."""
        obj: Any = load_module(self.file, self.module_name, self.code, self.digest)
        for part in self.qualname.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise LookupError(
                    f"{self.file} has no {self.qualname!r} any more: it changed since it was "
                    f"deployed; run `flash-jupyter deploy {self.file}` again"
                ) from None
        return undecorated(obj)


class FunctionHandler(_UserCode):
    """A function endpoint over HTTP: the request's ``input`` are its keyword arguments."""

    kind = "function"

    def __call__(self, **input: Any) -> Any:
        return jsonable_later(self.target()(**input))


class ClassHandler(_UserCode):
    """A class endpoint over HTTP. ``input``: ``{"method": NAME, "args": {...}, "init":
    {...}}``: ``init`` the constructor's keyword arguments (one instance per worker and per
    ``init``, kept for later requests), ``args`` the method's. Without ``method``, the
    class's ``__call__`` runs if it defines one; otherwise the error lists the methods."""

    kind = "class"

    def __call__(self, **input: Any) -> Any:
        extra = sorted(set(input) - {"method", "args", "init"})
        if extra:
            raise TypeError(
                f"a class endpoint's input is {CLASS_INPUT}, not {', '.join(map(repr, extra))}: "
                f'put the method\'s keyword arguments under "args"'
            )
        method, args, init = input.get("method"), input.get("args") or {}, input.get("init") or {}
        for key, value in (("args", args), ("init", init)):
            if not isinstance(value, dict):
                raise TypeError(f'"{key}" must be an object of keyword arguments, not {value!r}')
        cls = self.target()
        method = choose_method(cls, method)
        try:
            key = json.dumps(init, sort_keys=True)
        except (TypeError, ValueError):
            key = repr(sorted(init.items()))
        inst_key = (id(cls), key)
        inst = _instances.get(inst_key)
        if inst is None:
            inst = _instances[inst_key] = cls(**init)
        return jsonable_later(getattr(inst, method)(**args))


def public_methods(cls: type) -> list[str]:
    """The methods an HTTP caller may name: public ones, and ``__call__``."""
    names = [n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n, None))]
    if _defines_call(cls):
        names.insert(0, "__call__")
    return names


def _defines_call(cls: type) -> bool:
    return any("__call__" in vars(k) for k in cls.__mro__ if k is not object)


def choose_method(cls: type, method: Any) -> str:
    """The method a request runs: the one it names, else ``__call__`` if the class has one."""
    methods = public_methods(cls)
    listed = ", ".join(methods) or "(none)"
    if method is None:
        if _defines_call(cls):
            return "__call__"
        raise TypeError(
            f"class {cls.__qualname__} has no __call__: name a method in the input, "
            f'{{"method": "NAME", "args": {{...}}}}; its methods: {listed}'
        )
    if not isinstance(method, str) or method not in methods:
        raise TypeError(f"class {cls.__qualname__} has no public method {method!r}; its "
                        f"methods: {listed}")  # fmt: skip
    return method


class CellHandler:
    """A notebook's ``%%flash`` cells of one endpoint over HTTP: the cells run in notebook
    order in a fresh namespace whose variables are the request's ``input``; the answer is
    ``{"names": {name: value}, "skipped": {name: why}, "last": value}``: the JSON-able
    names the cells bind, those left out and why, and the last cell's last expression
    (``null`` when it has none or it is not JSON)."""

    kind = "cells"

    def __init__(self, sources: str | Iterable[str], file: str | Path | None = None):
        self.sources = (sources,) if isinstance(sources, str) else tuple(sources)
        self.file = str(file) if file else None

    def __repr__(self) -> str:
        return f"<CellHandler {len(self.sources)} cell(s) of {self.file or 'a notebook'}>"

    def __call__(self, **input: Any) -> dict[str, Any]:
        if self.file:
            _put_on_path(str(Path(self.file).parent))
        ns: dict[str, Any] = {"__name__": "__flash_cell__", "__builtins__": builtins}
        ns.update(input)
        bound: list[str] = []
        last: Any = None
        for i, src in enumerate(self.sources):
            filename = f"<cell {i + 1} of {Path(self.file).name if self.file else 'notebook'}>"
            _, last = exec_cell(src, filename, ns)
            for n in bound_names(src):
                if n not in bound:
                    bound.append(n)
        names: dict[str, Any] = {}
        skipped: dict[str, str] = {}
        for n in bound:
            if n not in ns:
                skipped[n] = "deleted by the cell"
                continue
            ok, value, why = to_json(ns[n])
            if ok:
                names[n] = value
            else:
                skipped[n] = why
        ok, last_value, why = to_json(last)
        if not ok:
            skipped["<last expression>"] = why
        return {"names": names, "skipped": skipped, "last": last_value if ok else None}


def bound_names(source: str) -> list[str]:
    """The names a cell binds at top level, in order (as ``%%flash`` sends them back)."""
    from ..jupyter.cellcode import analyse  # pure ast; no IPython

    return list(analyse(source).bound)


# Factories under the names the contract gives (what deploy builds).
def call_function(
    file: str | Path, module_name: str | None, qualname: str, code: str | None = None,
    digest: str | None = None,
) -> FunctionHandler:  # fmt: skip
    return FunctionHandler(file, module_name, qualname, code, digest)


def call_method(
    file: str | Path, module_name: str | None, qualname: str, code: str | None = None,
    digest: str | None = None,
) -> ClassHandler:  # fmt: skip
    return ClassHandler(file, module_name, qualname, code, digest)


def run_cell(source: str | Iterable[str], file: str | Path | None = None) -> CellHandler:
    return CellHandler(source, file)


# ---------------------------------------------------------------- loading the user's code
def undecorated(obj: Any) -> Any:
    """The user's own function or class behind an ``@Endpoint`` (``RemoteFunction.local``'s
    target), or ``obj`` itself."""
    if type(obj).__module__ == "flash_jupyter.endpoint" and hasattr(obj, "_target"):
        return obj._target
    return obj


def _put_on_path(folder: str) -> None:
    # First, as `python file.py` puts its folder: the user's sibling modules win.
    if folder not in sys.path:
        sys.path.insert(0, folder)


def package_root(file: str | Path, module_name: str) -> Path:
    """The folder to put on sys.path so that ``module_name`` imports from ``file``."""
    p = Path(file)
    if p.name == "__init__.py":
        p = p.parent
    return p.parents[len(module_name.split(".")) - 1]


def load_module(file: str, module_name: str | None, code: str | None, digest: str) -> Any:
    """Import the user's module once per worker process (again when its digest changes: a
    redeploy with new code reaches warm workers)."""
    key = (file, module_name, digest)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    if module_name:
        _put_on_path(str(package_root(file, module_name)))
        top = module_name.split(".")[0]
        if any(k[0] == file or (k[1] or "").split(".")[0] == top for k in _modules):
            # New code of a package this worker has imported: forget all of it.
            for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
                del sys.modules[name]
            importlib.invalidate_caches()
        mod = importlib.import_module(module_name)
    else:
        folder = str(Path(file).parent)
        _put_on_path(folder)
        if code is None:
            code = Path(file).read_text(encoding="utf-8")
        stem = Path(file).stem
        name = stem if stem.isidentifier() and stem not in sys.modules else f"_flash_app_{stem}"
        if not name.isidentifier():
            name = "_flash_app_module"
        mod = types.ModuleType(name)
        mod.__file__ = file
        sys.modules[name] = mod  # before it runs: dataclasses and pickling look it up
        try:
            exec(compile(code, file, "exec"), mod.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    for k in [k for k in _modules if k[0] == file and k[1] == module_name]:
        del _modules[k]
    _modules[key] = mod
    return mod


# ---------------------------------------------------------------- JSON out
def jsonable(value: Any) -> Any:
    """``value`` in JSON's terms where there is an obvious one: tuples as lists, NumPy and
    Torch values by ``tolist()``, pydantic models by ``model_dump()``; others as they are
    (the worker then says which type is not JSON)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    for attr in ("tolist", "model_dump"):
        fn = getattr(value, attr, None)
        if callable(fn) and not isinstance(value, type):
            try:
                return jsonable(fn())
            except Exception:
                pass
    return value


def to_json(value: Any) -> tuple[bool, Any, str]:
    """``(ok, value, why not)``: a value an HTTP answer can carry, or the reason it cannot."""
    if isinstance(value, types.ModuleType):
        return False, None, "a module"
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return False, None, f"a {'class' if isinstance(value, type) else 'function'}: not JSON"
    v = jsonable(value)
    try:
        json.dumps(v)
    except (TypeError, ValueError) as e:
        return False, None, f"a {type(value).__module__}.{type(value).__qualname__}: not JSON ({e})"
    return True, v, ""


def jsonable_later(value: Any) -> Any:
    """A handler's result made JSON-able; for a coroutine once awaited, for a generator item by
    item (the worker awaits the one and streams the other), an async generator collected."""
    if isinstance(value, types.GeneratorType):
        return (jsonable(item) for item in value)
    if isinstance(value, types.AsyncGeneratorType):
        return _collect(value)
    if hasattr(value, "__await__"):
        return _then_jsonable(value)
    return jsonable(value)


async def _then_jsonable(aw: Any) -> Any:
    return jsonable(await aw)


async def _collect(agen: Any) -> list[Any]:
    return [jsonable(item) async for item in agen]
